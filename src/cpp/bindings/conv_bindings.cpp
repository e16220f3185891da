// Binding of the convolution forward.  The Python wrapper (python/mlmath_native/_conv.py) owns
// the padding forms and modes, output sizes and friendly errors; this layer re-checks shapes so
// that a direct call cannot index outside any array (the kernel bounds-checks x itself).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "bindings/array_checks.h"
#include "bindings/without_gil.h"
#include "mlmath/mlmath.h"

namespace mlmath::bindings {

namespace {

bool is_16bit_dtype(DType dt) { return dt == DType::bf16 || dt == DType::f16; }
template <class T>
constexpr bool is_16bit_type = std::is_same_v<T, bf16> || std::is_same_v<T, f16>;

// The output of a 16-bit convolution may be float32 (for the gathered paths of _conv.py, which
// add several results before one rounding: Note [16-bit convolution] in kernels/conv_stage.h);
// returns whether it is.
bool float32_out(const py::array& out, DType dt, const char* fn, const char* name) {
  if (is_16bit_dtype(dt) && float_dtype(out, fn, name, true) == DType::f32) return true;
  require_same_dtype(out, dt, fn, name);
  return false;
}

void conv2d_into(const py::array& x, const py::array& w, const py::object& bias, py::array& y,
                 std::int64_t stride_h, std::int64_t stride_w, std::int64_t pad_top,
                 std::int64_t pad_left, std::int64_t dil_h, std::int64_t dil_w, std::int64_t groups,
                 int winograd) {
  const char* fn = "conv2d";
  const DType dt = float_dtype(x, fn, "x", true);
  require_same_dtype(w, dt, fn, "w");
  const bool out32 = float32_out(y, dt, fn, "out");
  require_writeable(y, fn, "out");
  if (x.ndim() != 4 || w.ndim() != 4 || y.ndim() != 4) {
    throw std::invalid_argument("conv2d: x, w and out must be 4-D");
  }
  if (groups < 1 || stride_h < 1 || stride_w < 1 || dil_h < 1 || dil_w < 1) {
    throw std::invalid_argument("conv2d: groups, strides and dilations must be >= 1");
  }
  const std::int64_t n = x.shape(0), c = x.shape(1), k = w.shape(0);
  if (w.shape(2) < 1 || w.shape(3) < 1) {  // nothing would write out
    throw std::invalid_argument("conv2d: w has an empty kernel (shape " + shape_str(w) + ")");
  }
  if (w.shape(1) * groups != c || k % groups != 0) {
    throw std::invalid_argument("conv2d: w has shape " + shape_str(w) + " for " +
                                std::to_string(c) + " input channels in " + std::to_string(groups) +
                                " groups");
  }
  if (y.shape(0) != n || y.shape(1) != k) {
    throw std::invalid_argument("conv2d: out has shape " + shape_str(y));
  }
  if (winograd != 0 && winograd != 2 && winograd != 4) {
    throw std::invalid_argument("conv2d: winograd must be 0 (direct), 2 or 4 (the tile size)");
  }
  if (winograd && (w.shape(2) != 3 || w.shape(3) != 3 || stride_h != 1 || stride_w != 1 ||
                   dil_h != 1 || dil_w != 1 || groups != 1)) {
    throw std::invalid_argument(
        "conv2d: winograd needs a 3x3 kernel, stride 1, dilation 1 and groups 1");
  }
  const void* bp = nullptr;
  if (!bias.is_none()) {
    py::array b = bias.cast<py::array>();
    require_same_dtype(b, dt, fn, "bias");
    if (b.ndim() != 1 || b.shape(0) != k) {
      throw std::invalid_argument("conv2d: bias has shape " + shape_str(b));
    }
    bp = b.data();
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Conv2dArgs<T> a{static_cast<const T*>(x.data()),
                    n,
                    c,
                    x.shape(2),
                    x.shape(3),
                    static_cast<const T*>(w.data()),
                    k,
                    w.shape(2),
                    w.shape(3),
                    static_cast<const T*>(bp),
                    static_cast<T*>(y.mutable_data()),
                    y.shape(2),
                    y.shape(3),
                    stride_h,
                    stride_w,
                    pad_top,
                    pad_left,
                    dil_h,
                    dil_w,
                    groups};
    const KernelTable& kt = kernels();
    float* y32 = out32 ? static_cast<float*>(y.mutable_data()) : nullptr;
    if (out32) a.y = nullptr;
    WithoutGil nogil(Interruptible::yes);
    if constexpr (is_16bit_type<T>) {
      (winograd == 4   ? MLMATH_KERNEL_FOR(kt, conv2d_winograd4, T)
       : winograd == 2 ? MLMATH_KERNEL_FOR(kt, conv2d_winograd, T)
                       : MLMATH_KERNEL_FOR(kt, conv2d, T))(a, y32);
    } else if constexpr (sizeof(T) == 4) {
      (winograd == 4   ? kt.conv2d_winograd4_f32
       : winograd == 2 ? kt.conv2d_winograd_f32
                       : kt.conv2d_f32)(a);
    } else {
      (winograd == 4   ? kt.conv2d_winograd4_f64
       : winograd == 2 ? kt.conv2d_winograd_f64
                       : kt.conv2d_f64)(a);
    }
    nogil.finish();
  };
  with_dtype(dt, run);
}

// grad_weight = the weight gradient of conv2d(x, w) with zero padding (x, grad_out given).
void conv2d_grad_weight_into(const py::array& x, const py::array& grad_out, py::array& grad_w,
                             std::int64_t stride_h, std::int64_t stride_w, std::int64_t pad_top,
                             std::int64_t pad_left, std::int64_t dil_h, std::int64_t dil_w,
                             std::int64_t groups) {
  const char* fn = "conv2d_backward";
  const DType dt = float_dtype(x, fn, "x", true);
  require_same_dtype(grad_out, dt, fn, "grad_out");
  require_same_dtype(grad_w, dt, fn, "grad_weight");
  require_writeable(grad_w, fn, "grad_weight");
  if (x.ndim() != 4 || grad_out.ndim() != 4 || grad_w.ndim() != 4 || groups < 1 || dil_h < 1 ||
      dil_w < 1 || stride_h < 1 || stride_w < 1 || pad_top < 0 || pad_left < 0) {
    throw std::invalid_argument("conv2d_backward: bad arrays or sizes for the weight gradient");
  }
  const std::int64_t n = x.shape(0), c = x.shape(1), k = grad_out.shape(1);
  const std::int64_t r = grad_w.shape(2), s = grad_w.shape(3);
  const std::int64_t ho = grad_out.shape(2), wo = grad_out.shape(3);
  if (r < 1 || s < 1) {
    throw std::invalid_argument("conv2d_backward: grad_weight has an empty kernel");
  }
  // every window must start inside the padded input (its far side may reach past x: zeros)
  if (grad_out.shape(0) != n || grad_w.shape(0) != k || grad_w.shape(1) * groups != c ||
      k % groups != 0 || (ho > 0 && (ho - 1) * stride_h > x.shape(2) + 2 * pad_top) ||
      (wo > 0 && (wo - 1) * stride_w > x.shape(3) + 2 * pad_left)) {
    throw std::invalid_argument("conv2d_backward: inconsistent shapes for the weight gradient");
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Conv2dWeightGradArgs<T> a{static_cast<const T*>(x.data()),
                              n,
                              c,
                              x.shape(2),
                              x.shape(3),
                              static_cast<const T*>(grad_out.data()),
                              k,
                              grad_out.shape(2),
                              grad_out.shape(3),
                              static_cast<T*>(grad_w.mutable_data()),
                              r,
                              s,
                              stride_h,
                              stride_w,
                              pad_top,
                              pad_left,
                              dil_h,
                              dil_w,
                              groups};
    const KernelTable& kt = kernels();
    WithoutGil nogil(Interruptible::yes);
    MLMATH_KERNEL_FOR(kt, conv2d_grad_weight, T)(a);
    nogil.finish();
  };
  with_dtype(dt, run);
}

// grad_input = the gradient of the zero-padded input of conv2d (every element written).
void conv2d_grad_input_into(const py::array& grad_out, const py::array& w, py::array& grad_input,
                            std::int64_t stride_h, std::int64_t stride_w, std::int64_t dil_h,
                            std::int64_t dil_w, std::int64_t groups) {
  const char* fn = "conv2d_backward";
  const DType dt = float_dtype(grad_out, fn, "grad_out", true);
  require_same_dtype(w, dt, fn, "w");
  const bool out32 = float32_out(grad_input, dt, fn, "grad_input");
  require_writeable(grad_input, fn, "grad_input");
  if (grad_out.ndim() != 4 || w.ndim() != 4 || grad_input.ndim() != 4 || groups < 1 || dil_h < 1 ||
      dil_w < 1 || stride_h < 1 || stride_w < 1) {
    throw std::invalid_argument("conv2d_backward: bad arrays or sizes for the input gradient");
  }
  const std::int64_t n = grad_out.shape(0), k = grad_out.shape(1), ho = grad_out.shape(2),
                     wo = grad_out.shape(3), c = grad_input.shape(1), r = w.shape(2),
                     s = w.shape(3);
  if (r < 1 || s < 1) {
    throw std::invalid_argument("conv2d_backward: w has an empty kernel");
  }
  // every window must lie inside the padded input
  if (grad_input.shape(0) != n || w.shape(0) != k || w.shape(1) * groups != c || k % groups != 0 ||
      (ho > 0 && (ho - 1) * stride_h + dil_h * (r - 1) + 1 > grad_input.shape(2)) ||
      (wo > 0 && (wo - 1) * stride_w + dil_w * (s - 1) + 1 > grad_input.shape(3))) {
    throw std::invalid_argument("conv2d_backward: inconsistent shapes for the input gradient");
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Conv2dInputGradArgs<T> a{static_cast<const T*>(grad_out.data()),
                             n,
                             k,
                             ho,
                             wo,
                             static_cast<const T*>(w.data()),
                             c,
                             r,
                             s,
                             static_cast<T*>(grad_input.mutable_data()),
                             grad_input.shape(2),
                             grad_input.shape(3),
                             stride_h,
                             stride_w,
                             dil_h,
                             dil_w,
                             groups};
    const KernelTable& kt = kernels();
    float* gx32 = out32 ? static_cast<float*>(grad_input.mutable_data()) : nullptr;
    if (out32) a.grad_input = nullptr;
    WithoutGil nogil(Interruptible::yes);
    if constexpr (is_16bit_type<T>) {
      MLMATH_KERNEL_FOR(kt, conv2d_grad_input, T)(a, gx32);
    } else if constexpr (sizeof(T) == 4) {
      kt.conv2d_grad_input_f32(a);
    } else {
      kt.conv2d_grad_input_f64(a);
    }
    nogil.finish();
  };
  with_dtype(dt, run);
}

// True when no element of x is NaN or +-inf (Note [non-finite inputs] in kernels/conv.cpp).
bool all_finite(const py::array& x) {
  const DType dt = float_dtype(x, "all_finite", "x", true);
  bool finite = true;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const KernelTable& kt = kernels();
    const T* data = static_cast<const T*>(x.data());
    const std::int64_t n = x.size();
    WithoutGil nogil(Interruptible::no);
    MLMATH_KERNEL_FOR(kt, all_finite, T)(data, n, &finite);
    nogil.finish();
  };
  with_dtype(dt, run);
  return finite;
}

}  // namespace

void bind_conv(py::module_& m) {
  using namespace pybind11::literals;
  m.def("conv2d_into", &conv2d_into, "x"_a, "w"_a, "bias"_a, "out"_a, "stride_h"_a, "stride_w"_a,
        "pad_top"_a, "pad_left"_a, "dil_h"_a, "dil_w"_a, "groups"_a, "winograd"_a = 0,
        "out = conv2d(x, w) + bias with zero padding (top, left given; sizes from out)");
  m.def("conv2d_grad_weight_into", &conv2d_grad_weight_into, "x"_a, "grad_out"_a, "grad_weight"_a,
        "stride_h"_a, "stride_w"_a, "pad_top"_a, "pad_left"_a, "dil_h"_a, "dil_w"_a, "groups"_a,
        "grad_weight = the weight gradient of conv2d(x, w) with zero padding");
  m.def("conv2d_grad_input_into", &conv2d_grad_input_into, "grad_out"_a, "w"_a, "grad_input"_a,
        "stride_h"_a, "stride_w"_a, "dil_h"_a, "dil_w"_a, "groups"_a,
        "grad_input = the gradient of conv2d's padded input (GEMM + col2im)");
  m.def("all_finite", &all_finite, "x"_a,
        "True when no element of x (float32/float64/bfloat16/float16, C-contiguous) is NaN or "
        "+-inf");
}

}  // namespace mlmath::bindings
