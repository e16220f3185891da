// Bindings of the softmax family.  Inputs arrive C-contiguous from the Python wrappers
// (python/mlmath_native/_softmax.py), which own the dtype and layout policy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "bindings/array_checks.h"
#include "bindings/without_gil.h"
#include "mlmath/mlmath.h"

namespace mlmath::bindings {

namespace {

// y = softmax(x) or log_softmax(x) along axis; y may be x itself.
void softmax_into(const py::array& x, py::array& y, int axis, bool log) {
  const char* fn = log ? "log_softmax" : "softmax";
  const DType dt = float_dtype(x, fn, "x", true);
  require_same_dtype(y, dt, fn, "out");
  require_same_shape(x, y, fn, "out");
  require_writeable(y, fn, "out");
  const AxisLayout s = axis_layout(x, normalize_axis(x, axis, fn));
  const KernelTable& k = kernels();
  const void* xp = x.data();
  void* yp = y.mutable_data();
  WithoutGil nogil(Interruptible::no);
  with_dtype(dt, [&](auto tag) {
    using S = decltype(tag);
    const auto kernel =
        log ? MLMATH_KERNEL_FOR(k, log_softmax, S) : MLMATH_KERNEL_FOR(k, softmax, S);
    kernel(static_cast<const S*>(xp), static_cast<S*>(yp), s);
  });
  nogil.finish();
}

// out[...] = logsumexp(x) along axis; out has x's shape without that axis (any shape of that
// size is accepted, e.g. with keepdims).
void logsumexp_into(const py::array& x, py::array& out, int axis) {
  const char* fn = "logsumexp";
  const DType dt = float_dtype(x, fn, "x", true);
  require_same_dtype(out, dt, fn, "out");
  require_writeable(out, fn, "out");
  const AxisLayout s = axis_layout(x, normalize_axis(x, axis, fn));
  if (out.size() != s.outer * s.inner) {
    throw std::invalid_argument("logsumexp: out has " + std::to_string(out.size()) +
                                " elements (expected " + std::to_string(s.outer * s.inner) + ")");
  }
  const KernelTable& k = kernels();
  const void* xp = x.data();
  void* op = out.mutable_data();
  WithoutGil nogil(Interruptible::no);
  with_dtype(dt, [&](auto tag) {
    using S = decltype(tag);
    MLMATH_KERNEL_FOR(k, logsumexp, S)(static_cast<const S*>(xp), static_cast<S*>(op), s);
  });
  nogil.finish();
}

// dx = softmax_backward(y, dy) or log_softmax_backward(y, dy) along axis.
void softmax_backward_into(const py::array& y, const py::array& dy, py::array& dx, int axis,
                           bool log) {
  const char* fn = log ? "log_softmax_backward" : "softmax_backward";
  const DType dt = float_dtype(y, fn, "y", true);
  require_same_dtype(dy, dt, fn, "dy");
  require_same_shape(y, dy, fn, "dy");
  require_same_dtype(dx, dt, fn, "out");
  require_same_shape(y, dx, fn, "out");
  require_writeable(dx, fn, "out");
  const AxisLayout s = axis_layout(y, normalize_axis(y, axis, fn));
  const KernelTable& k = kernels();
  const void* yp = y.data();
  const void* dyp = dy.data();
  void* dxp = dx.mutable_data();
  WithoutGil nogil(Interruptible::no);
  with_dtype(dt, [&](auto tag) {
    using S = decltype(tag);
    const auto kernel = log ? MLMATH_KERNEL_FOR(k, log_softmax_backward, S)
                            : MLMATH_KERNEL_FOR(k, softmax_backward, S);
    kernel(static_cast<const S*>(yp), static_cast<const S*>(dyp), static_cast<S*>(dxp), s);
  });
  nogil.finish();
}

// out = exp(x) elementwise with the vector exp (for accuracy tests of the vector layer).
void exp_into(const py::array& x, py::array& out) {
  const DType dt = float_dtype(x, "exp", "x");
  require_same_dtype(out, dt, "exp", "out");
  require_same_shape(x, out, "exp", "out");
  require_writeable(out, "exp", "out");
  const KernelTable& k = kernels();
  const void* xp = x.data();
  void* op = out.mutable_data();
  const std::int64_t n = x.size();
  WithoutGil nogil(Interruptible::no);
  if (dt == DType::f32) {
    k.exp_f32(static_cast<const float*>(xp), static_cast<float*>(op), n);
  } else {
    k.exp_f64(static_cast<const double*>(xp), static_cast<double*>(op), n);
  }
  nogil.finish();
}

// out = x converted between float32 and a 16-bit dtype with the vector layer (for tests).
void convert_into(const py::array& x, py::array& out) {
  const DType from = float_dtype(x, "convert", "x", true);
  const DType to = float_dtype(out, "convert", "out", true);
  require_same_shape(x, out, "convert", "out");
  require_writeable(out, "convert", "out");
  const KernelTable& k = kernels();
  const std::int64_t n = x.size();
  const void* xp = x.data();
  void* op = out.mutable_data();
  if (from == DType::bf16 && to == DType::f32) {
    k.widen_bf16(static_cast<const bf16*>(xp), static_cast<float*>(op), n);
  } else if (from == DType::f16 && to == DType::f32) {
    k.widen_f16(static_cast<const f16*>(xp), static_cast<float*>(op), n);
  } else if (from == DType::f32 && to == DType::bf16) {
    k.narrow_bf16(static_cast<const float*>(xp), static_cast<bf16*>(op), n);
  } else if (from == DType::f32 && to == DType::f16) {
    k.narrow_f16(static_cast<const float*>(xp), static_cast<f16*>(op), n);
  } else {
    throw py::type_error("convert: expected float32 <-> bfloat16 or float16");
  }
}

}  // namespace

void bind_softmax(py::module_& m) {
  using namespace pybind11::literals;
  m.def("softmax_into", &softmax_into, "x"_a, "out"_a, "axis"_a, "log"_a,
        "out = softmax(x) (log=False) or log_softmax(x) along axis; C-contiguous float32, float64, "
        "bfloat16 or float16 arrays");
  m.def("logsumexp_into", &logsumexp_into, "x"_a, "out"_a, "axis"_a,
        "out = logsumexp(x) along axis; out holds x.size / x.shape[axis] elements");
  m.def("softmax_backward_into", &softmax_backward_into, "y"_a, "dy"_a, "out"_a, "axis"_a, "log"_a,
        "out = gradient of (log_)softmax given its output y and the upstream dy");
  m.def("exp_into", &exp_into, "x"_a, "out"_a, "out = exp(x) with the vector exp of the ISA");
  m.def("convert_into", &convert_into, "x"_a, "out"_a,
        "out = x converted float32 <-> bfloat16/float16 by the vector layer (for tests)");
}

}  // namespace mlmath::bindings
