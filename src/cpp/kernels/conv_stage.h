// Convolutions of bf16 / f16 data (Note [16-bit storage] in common/half.h) on the float32
// kernels, through float32 staging buffers.
//
// Note [16-bit convolution]
// The float32 convolution kernels (implicit GEMM, shifted rows, depthwise, Winograd, the
// weight and input gradients) read their inputs many times over (each input value feeds up to
// R*S*K products, Winograd transforms mix a tile's values) and keep float32 partial sums
// (the buckets of the weight gradient, col2im's additions, Winograd's inverse transform).  A
// 16-bit convolution therefore widens its inputs to float32 inside the kernel, in chunks of
// whole images (a few MiB each: kStageBytes), runs the float32 kernel on the chunk into a
// float32 result, and rounds each result once into the 16-bit output.  The widening and
// rounding passes are vectorised and read / write each element once, against R*S*C multiply-
// adds per output: for the layers that matter (C*R*S in the hundreds) they cost a few percent.
// The weights (and bias) are widened once per call.  Winograd in float32 is within a few
// float32 roundings of direct convolution, far below one bf16 / f16 rounding, so it is used
// as for float32 (its non-finite check sees the float32 outputs).  The weight gradient adds
// the chunks' float32 partial gradients in chunk order before its one rounding, so the
// result depends only on the shapes.  A caller that adds several results before rounding
// (the gathered paths in _conv.py) passes a float32 output instead (y32 / out32): nothing is
// rounded then.
#pragma once

#include <cstdint>

#include "common/gemm_core.h"
#include "common/parallel.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN
namespace {

// Bytes of float32 staging per chunk of images (inputs and results together).
constexpr std::int64_t kStageBytes = std::int64_t{32} << 20;
// Elements per task of the widening / rounding passes (cost for parallel_for: a cheap pass).
constexpr std::int64_t kStageBlock = std::int64_t{1} << 15;

// dst[i] = src[i] converted, i < n (threads for large n): widened exactly from a 16-bit S to
// float, or rounded once (to nearest even) from float to S.
template <class From, class To>
void convert_into(const From* src, std::int64_t n, To* dst) {
  using V = Vec<float>;
  constexpr std::int64_t W = V::width;
  parallel_for((n + kStageBlock - 1) / kStageBlock, kStageBlock / 64,
               [&](std::int64_t b0, std::int64_t b1) {
                 const std::int64_t i0 = b0 * kStageBlock;
                 const std::int64_t i1 = b1 * kStageBlock < n ? b1 * kStageBlock : n;
                 std::int64_t i = i0;
                 for (; i + W <= i1; i += W) V::load(src + i).store(dst + i);
                 if (i < i1) V::load_partial(src + i, i1 - i, 0.0f).store_partial(dst + i, i1 - i);
               });
}

// Images per chunk when one image stages `per_image` floats (at least one).
inline std::int64_t stage_images(std::int64_t per_image, std::int64_t n) {
  const std::int64_t bytes = per_image * static_cast<std::int64_t>(sizeof(float));
  std::int64_t nb = bytes > 0 ? kStageBytes / bytes : n;
  nb = nb < 1 ? 1 : nb;
  return nb < n ? nb : n;
}

// conv2d of 16-bit data with a float32 kernel `fwd` (conv2d_f32, a Winograd one); the result
// rounded into a.y, or left in float32 in y32 when y32 is not null (Note [16-bit convolution]).
template <class S, class Fwd>
void conv2d_staged(const Conv2dArgs<S>& a, float* y32, const Fwd& fwd) {
  if (a.n == 0 || a.k == 0 || a.ho == 0 || a.wo == 0) return;
  const std::int64_t wsize = a.k * (a.c / a.groups) * a.r * a.s;
  const std::int64_t xs = a.c * a.h * a.w, ys = a.k * a.ho * a.wo;
  const std::int64_t nb = stage_images(xs + (y32 ? 0 : ys), a.n);
  Scratch<float> w32(wsize), b32(a.bias ? a.k : 1), x32(nb * xs), out(y32 ? 1 : nb * ys);
  convert_into(a.weight, wsize, w32.data);
  if (a.bias) convert_into(a.bias, a.k, b32.data);
  for (std::int64_t n0 = 0; n0 < a.n; n0 += nb) {
    if (interrupted()) return;  // Note [interrupts] (dispatch/threads.cpp)
    const std::int64_t cnt = a.n - n0 < nb ? a.n - n0 : nb;
    convert_into(a.x + n0 * xs, cnt * xs, x32.data);
    float* y = y32 ? y32 + n0 * ys : out.data;
    const Conv2dArgs<float> f{
        x32.data,  cnt,        a.c,     a.h,        a.w,
        w32.data,  a.k,        a.r,     a.s,        a.bias ? b32.data : nullptr,
        y,         a.ho,       a.wo,    a.stride_h, a.stride_w,
        a.pad_top, a.pad_left, a.dil_h, a.dil_w,    a.groups};
    fwd(f);
    if (!y32) convert_into(out.data, cnt * ys, a.y + n0 * ys);
  }
}

}  // namespace
MLMATH_ISA_END
