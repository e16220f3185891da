// Binding of the fused cross-entropy kernel.  The Python wrapper
// (python/mlmath_native/_cross_entropy.py) owns the options, reductions and friendly errors; this
// layer re-checks every array and label so that a direct call can never read out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/array_checks.h"
#include "bindings/without_gil.h"
#include "mlmath/mlmath.h"

namespace mlmath::bindings {

namespace {

template <class S>
void run(const py::array& logits, const py::array& target, const py::array& weight,
         std::int64_t ignore_index, double label_smoothing, py::array& loss, const py::object& grad,
         const py::object& grad_scale, double grad_scale_all, AxisLayout s) {
  using T = typename CrossEntropyArgs<S>::T;
  CrossEntropyArgs<S> a{};
  a.shape = s;
  a.logits = static_cast<const S*>(logits.data());
  if (target.dtype().kind() != 'i') {
    a.target_prob = static_cast<const S*>(target.data());
  } else {
    a.target_index = static_cast<const std::int64_t*>(target.data());
  }
  a.weight = static_cast<const T*>(weight.data());
  double wsum = 0;
  for (std::int64_t c = 0; c < s.n; ++c) wsum += static_cast<double>(a.weight[c]);
  a.weight_sum = static_cast<T>(wsum);
  a.ignore_index = ignore_index;
  a.label_smoothing = static_cast<T>(label_smoothing);
  a.loss = static_cast<T*>(loss.mutable_data());
  if (!grad.is_none()) a.grad = static_cast<S*>(grad.cast<py::array>().mutable_data());
  if (!grad_scale.is_none())
    a.grad_scale = static_cast<const T*>(grad_scale.cast<py::array>().data());
  a.grad_scale_all = static_cast<T>(grad_scale_all);
  const KernelTable& k = kernels();
  WithoutGil nogil(Interruptible::yes);
  MLMATH_KERNEL_FOR(k, cross_entropy, S)(a);
  nogil.finish();
}

// loss[e] (and grad, when not None) of every element of logits along `axis`; see
// CrossEntropyArgs for the meaning of each argument.  Probabilities and grad have the logits'
// dtype; weight, loss and grad_scale its compute dtype (float32 for 16-bit logits).
void cross_entropy_into(const py::array& logits, const py::array& target, int axis,
                        const py::array& weight, std::int64_t ignore_index, double label_smoothing,
                        py::array& loss, const py::object& grad, const py::object& grad_scale,
                        double grad_scale_all) {
  const char* fn = "cross_entropy";
  const DType dt = float_dtype(logits, fn, "logits", true);
  const DType compute = dt == DType::f64 ? DType::f64 : DType::f32;
  const AxisLayout s = axis_layout(logits, normalize_axis(logits, axis, fn));
  const std::int64_t elements = s.outer * s.inner;
  if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0)) {
    throw std::invalid_argument("cross_entropy: label_smoothing must be in [0, 1] (got " +
                                std::to_string(label_smoothing) + ")");
  }
  if (target.dtype().kind() != 'i') {
    require_same_dtype(target, dt, fn, "target");
    require_same_shape(logits, target, fn, "target");
  } else {
    if (target.dtype().kind() != 'i' || target.dtype().itemsize() != 8 ||
        !(target.flags() & py::array::c_style)) {
      throw py::type_error("cross_entropy: target must be a C-contiguous int64 or float array");
    }
    require_aligned(target, fn, "target");
    if (target.size() != elements) {
      throw std::invalid_argument("cross_entropy: target has " + std::to_string(target.size()) +
                                  " elements (expected " + std::to_string(elements) + ")");
    }
    const auto* t = static_cast<const std::int64_t*>(target.data());
    for (std::int64_t e = 0; e < elements; ++e) {
      if (t[e] != ignore_index && (t[e] < 0 || t[e] >= s.n)) {
        throw std::invalid_argument("cross_entropy: target holds " + std::to_string(t[e]) +
                                    " at flat position " + std::to_string(e) + " but there are " +
                                    std::to_string(s.n) + " classes");
      }
    }
  }
  require_same_dtype(weight, compute, fn, "weight");
  if (weight.ndim() != 1 || weight.shape(0) != s.n) {
    throw std::invalid_argument("cross_entropy: weight has shape " + shape_str(weight) +
                                " (expected (" + std::to_string(s.n) + ",))");
  }
  require_same_dtype(loss, compute, fn, "loss");
  require_writeable(loss, fn, "loss");
  if (loss.size() != elements) {
    throw std::invalid_argument("cross_entropy: loss has " + std::to_string(loss.size()) +
                                " elements (expected " + std::to_string(elements) + ")");
  }
  if (!grad.is_none()) {
    py::array g = grad.cast<py::array>();
    require_same_dtype(g, dt, fn, "grad");
    require_same_shape(logits, g, fn, "grad");
    require_writeable(g, fn, "grad");
  }
  if (!grad_scale.is_none()) {
    py::array gs = grad_scale.cast<py::array>();
    require_same_dtype(gs, compute, fn, "grad_output");
    if (gs.size() != elements) {
      throw std::invalid_argument("cross_entropy: grad_output has " + std::to_string(gs.size()) +
                                  " elements (expected " + std::to_string(elements) + ")");
    }
  }
  if (elements == 0 || s.n == 0) return;
  with_dtype(dt, [&](auto tag) {
    run<decltype(tag)>(logits, target, weight, ignore_index, label_smoothing, loss, grad,
                       grad_scale, grad_scale_all, s);
  });
}

}  // namespace

void bind_cross_entropy(py::module_& m) {
  using namespace pybind11::literals;
  m.def("cross_entropy_into", &cross_entropy_into, "logits"_a, "target"_a, "axis"_a, "weight"_a,
        "ignore_index"_a, "label_smoothing"_a, "loss"_a, "grad"_a, "grad_scale"_a,
        "grad_scale_all"_a,
        "Per-element cross-entropy losses into `loss`, and the gradient into `grad` unless None");
}

}  // namespace mlmath::bindings
