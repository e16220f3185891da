// matmul on the packed GEMM core (common/gemm_core.h): strided A and B, batched by offsets.
//
// Note [dot-like shapes]
// With only a few outputs (M N <= kDotMaxOutputs) the GEMM core wastes its tile (an MR x NR
// tile computes one useful entry) and, threaded, meets its team at two barriers per KC block of
// K: a 1 x 10^7 by 10^7 x 1 product took 0.11 s on one thread and 1.35 s on two (NumPy's dot:
// 0.004 s).  Such products are computed as M N dot products instead, K split into fixed chunks
// of kDotChunk (one task each: no barriers), each chunk's partial sums stored and added in chunk
// order, so the result does not depend on the number of threads.
//
// bf16 / f16 (Note [16-bit GEMM] in gemm_core.h): the packing widens A and B to float32, the
// core accumulates in float32 and rounds each C element once; the dot-like path widens its runs
// into float32 buffers and rounds the chunk-ordered sum once.
#include <cstdint>
#include <type_traits>

#include "common/axis_ops.h"
#include "common/gemm_core.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

namespace {

constexpr std::int64_t kDotMaxOutputs = 16;  // M N up to this: dot products (Note [dot-like ...])
constexpr std::int64_t kDotChunk = 8192;     // K per task: 32 KiB of float32 per operand, in L1/L2

// x_k = src[k * stride], k < n, into a contiguous buffer of the compute type (or src itself when
// it is contiguous and of that type).
template <class S, class T>
const T* contiguous_run(const S* src, std::int64_t stride, std::int64_t n, T* buf) {
  if constexpr (std::is_same_v<S, T>) {
    if (stride == 1) return src;
    for (std::int64_t k = 0; k < n; ++k) buf[k] = src[k * stride];
  } else {
    if (stride == 1) {
      using V = Vec<T>;
      constexpr std::int64_t W = V::width;
      std::int64_t k = 0;
      for (; k + W <= n; k += W) V::load(src + k).store(buf + k);
      for (; k < n; ++k) buf[k] = widen(src[k]);
    } else {
      for (std::int64_t k = 0; k < n; ++k) buf[k] = widen(src[k * stride]);
    }
  }
  return buf;
}

// C (c_rs) = A B or C += A B for M N <= kDotMaxOutputs: Note [dot-like shapes].
template <class S>
void gemm_dot_like(const GemmArgs<S>& g, const S* a, const S* bm, S* c) {
  using T = compute_t<S>;
  const std::int64_t M = g.m, N = g.n, K = g.k;
  const std::int64_t chunks = (K + kDotChunk - 1) / kDotChunk;
  Scratch<T> partial(chunks * M * N);  // [chunk][i][j]
  parallel_for(chunks, kDotChunk * M * N, [&](std::int64_t first, std::int64_t last) {
    Scratch<T> a_run(kDotChunk), b_run(kDotChunk);  // strided rows of A / columns of B
    for (std::int64_t ch = first; ch < last; ++ch) {
      const std::int64_t k0 = ch * kDotChunk, kc = K - k0 < kDotChunk ? K - k0 : kDotChunk;
      for (std::int64_t j = 0; j < N; ++j) {
        const T* col = contiguous_run(bm + k0 * g.b_rs + j * g.b_cs, g.b_rs, kc, b_run.data);
        for (std::int64_t i = 0; i < M; ++i) {
          const T* row = contiguous_run(a + i * g.a_rs + k0 * g.a_cs, g.a_cs, kc, a_run.data);
          partial.data[(ch * M + i) * N + j] = row_dot(row, col, kc);
        }
      }
    }
  });
  for (std::int64_t i = 0; i < M; ++i) {
    for (std::int64_t j = 0; j < N; ++j) {
      T sum = 0;
      for (std::int64_t ch = 0; ch < chunks; ++ch) sum += partial.data[(ch * M + i) * N + j];
      S& dst = c[i * g.c_rs + j];
      if constexpr (is_16bit<S>) {
        dst = narrow<S>(sum);  // accumulate is false for 16-bit C (Note [16-bit GEMM])
      } else {
        dst = g.accumulate ? dst + sum : sum;
      }
    }
  }
}

template <class S>
void gemm(const GemmArgs<S>& g) {
  using T = compute_t<S>;
  const bool dot_like = g.m * g.n <= kDotMaxOutputs && g.k > 0;
  for (std::int64_t b = 0; b < g.batch; ++b) {
    if (interrupted()) return;  // Note [interrupts] (dispatch/threads.cpp)
    const S* a = g.a + (g.a_offset ? g.a_offset[b] : 0);
    const S* bm = g.b + (g.b_offset ? g.b_offset[b] : 0);
    S* c = g.c + (g.c_offset ? g.c_offset[b] : 0);
    if (dot_like) {
      gemm_dot_like(g, a, bm, c);
      continue;
    }
    gemm_blocked<T>(
        g.m, g.n, g.k,
        [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
          pack_a_strided(a, g.a_rs, g.a_cs, g.m, i0, mc, k0, kc, dst);
        },
        [&](std::int64_t k0, std::int64_t kc, std::int64_t j0, std::int64_t nc, T* dst) {
          pack_b_strided(bm, g.b_rs, g.b_cs, k0, kc, j0, nc, dst);
        },
        c, g.c_rs, g.accumulate);
  }
}

}  // namespace

void gemm_f32(const GemmArgs<float>& args) { gemm(args); }
void gemm_f64(const GemmArgs<double>& args) { gemm(args); }
void gemm_bf16(const GemmArgs<bf16>& args) { gemm(args); }
void gemm_f16(const GemmArgs<f16>& args) { gemm(args); }

MLMATH_ISA_END
