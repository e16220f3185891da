// Binding of the fused linear + cross-entropy kernel.  The Python wrapper
// (python/mlmath_native/_linear_ce.py) owns the options, reductions and friendly errors; this
// layer re-checks every array, stride and label so that a direct call can never read or write
// out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "bindings/array_checks.h"
#include "bindings/without_gil.h"
#include "mlmath/mlmath.h"

namespace mlmath::bindings {

namespace {

constexpr const char* kFn = "linear_cross_entropy";

// Element strides of a 2-D operand: non-negative multiples of the item size (the wrapper copies
// anything else), aligned data.
std::pair<std::int64_t, std::int64_t> matrix_strides(const py::array& a, const char* name) {
  if (a.ndim() != 2) {
    throw std::invalid_argument(std::string(kFn) + ": " + name + " must be 2-D (got shape " +
                                shape_str(a) + ")");
  }
  require_aligned(a, kFn, name);
  const auto item = static_cast<std::int64_t>(a.itemsize());
  std::int64_t s[2];
  for (int d = 0; d < 2; ++d) {
    const auto bytes = static_cast<std::int64_t>(a.strides(d));
    if (bytes < 0 || bytes % item != 0) {
      throw std::invalid_argument(std::string(kFn) + ": " + name +
                                  " must have non-negative strides of whole elements");
    }
    s[d] = bytes / item;
  }
  return {s[0], s[1]};
}

// A 1-D C-contiguous array of `n` elements of dtype `dt`, writeable when `out`.
void require_vector(const py::array& a, DType dt, std::int64_t n, const char* name, bool out) {
  require_same_dtype(a, dt, kFn, name);
  if (a.ndim() != 1 || a.shape(0) != n) {
    throw std::invalid_argument(std::string(kFn) + ": " + name + " has shape " + shape_str(a) +
                                " (expected (" + std::to_string(n) + ",))");
  }
  if (out) require_writeable(a, kFn, name);
}

template <class T>
T* data_or_null(const py::object& o) {
  return o.is_none() ? nullptr : static_cast<T*>(o.cast<py::array>().mutable_data());
}

struct Options {
  std::int64_t ignore_index, chunk;
  double label_smoothing, softcap, inv_temperature;
};

template <class S>
void run(const py::array& hidden, const py::array& weight, const py::object& bias,
         const py::array& target, const py::array& class_weight, const Options& o, py::array& loss,
         py::array& lse, const py::object& logprob, const py::object& entropy,
         const py::object& d_hidden, const py::object& d_weight, const py::object& d_bias,
         const py::object& ce_scale, double ce_scale_all, const py::object& z_scale,
         double z_scale_all) {
  using T = typename LinearCrossEntropyArgs<S>::T;
  LinearCrossEntropyArgs<S> a{};
  a.n = hidden.shape(0);
  a.d = hidden.shape(1);
  a.v = weight.shape(0);
  std::tie(a.hidden_rs, a.hidden_cs) = matrix_strides(hidden, "hidden");
  std::tie(a.weight_rs, a.weight_cs) = matrix_strides(weight, "weight");
  a.hidden = static_cast<const S*>(hidden.data());
  a.weight = static_cast<const S*>(weight.data());
  a.bias = bias.is_none() ? nullptr : static_cast<const S*>(bias.cast<py::array>().data());
  a.target = static_cast<const std::int64_t*>(target.data());
  a.class_weight = static_cast<const T*>(class_weight.data());
  double wsum = 0;
  for (std::int64_t c = 0; c < a.v; ++c) wsum += static_cast<double>(a.class_weight[c]);
  a.class_weight_sum = static_cast<T>(wsum);
  a.ignore_index = o.ignore_index;
  a.label_smoothing = static_cast<T>(o.label_smoothing);
  a.softcap = static_cast<T>(o.softcap);
  a.inv_temperature = static_cast<T>(o.inv_temperature);
  a.chunk = o.chunk;
  a.loss = static_cast<T*>(loss.mutable_data());
  a.lse = static_cast<T*>(lse.mutable_data());
  a.logprob = data_or_null<T>(logprob);
  a.entropy = data_or_null<T>(entropy);
  a.d_hidden = data_or_null<S>(d_hidden);
  a.d_weight = data_or_null<S>(d_weight);
  a.d_bias = data_or_null<S>(d_bias);
  a.ce_scale = data_or_null<const T>(ce_scale);
  a.ce_scale_all = static_cast<T>(ce_scale_all);
  a.z_scale = data_or_null<const T>(z_scale);
  a.z_scale_all = static_cast<T>(z_scale_all);
  const KernelTable& k = kernels();
  WithoutGil nogil(Interruptible::yes);
  MLMATH_KERNEL_FOR(k, linear_cross_entropy, S)(a);
  nogil.finish();
}

// Per-token cross-entropy (loss), logsumexp (lse), and optionally log p(target), entropy and
// the gradients, of softcap(hidden weight^T + bias) * inv_temperature; see LinearCrossEntropyArgs.
void linear_cross_entropy_into(const py::array& hidden, const py::array& weight,
                               const py::object& bias, const py::array& target,
                               const py::array& class_weight, std::int64_t ignore_index,
                               double label_smoothing, double softcap, double inv_temperature,
                               std::int64_t chunk, py::array& loss, py::array& lse,
                               const py::object& logprob, const py::object& entropy,
                               const py::object& d_hidden, const py::object& d_weight,
                               const py::object& d_bias, const py::object& ce_scale,
                               double ce_scale_all, const py::object& z_scale, double z_scale_all) {
  const DType dt = float_dtype_any_layout(hidden, kFn, "hidden", true);
  const DType compute = dt == DType::f64 ? DType::f64 : DType::f32;
  matrix_strides(hidden, "hidden");
  matrix_strides(weight, "weight");
  if (float_dtype_any_layout(weight, kFn, "weight", true) != dt) {
    throw py::type_error(std::string(kFn) + ": weight's dtype differs from hidden's");
  }
  const std::int64_t n = hidden.shape(0), d = hidden.shape(1), v = weight.shape(0);
  if (weight.shape(1) != d) {
    throw std::invalid_argument(std::string(kFn) + ": weight has shape " + shape_str(weight) +
                                " but hidden has " + std::to_string(d) + " features");
  }
  if (!bias.is_none()) require_vector(bias.cast<py::array>(), dt, v, "bias", false);
  if (target.dtype().kind() != 'i' || target.dtype().itemsize() != 8 ||
      !(target.flags() & py::array::c_style) || target.size() != n) {
    throw py::type_error(std::string(kFn) + ": target must be a C-contiguous int64 array of " +
                         std::to_string(n) + " elements");
  }
  require_aligned(target, kFn, "target");
  const auto* t = static_cast<const std::int64_t*>(target.data());
  for (std::int64_t r = 0; r < n; ++r) {
    if (t[r] != ignore_index && (t[r] < 0 || t[r] >= v)) {
      throw std::invalid_argument(std::string(kFn) + ": target holds " + std::to_string(t[r]) +
                                  " at position " + std::to_string(r) + " but there are " +
                                  std::to_string(v) + " classes");
    }
  }
  require_vector(class_weight, compute, v, "weight_classes", false);
  if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0) || !(softcap >= 0.0) ||
      !std::isfinite(softcap) || !(inv_temperature > 0.0) || !std::isfinite(inv_temperature)) {
    throw std::invalid_argument(std::string(kFn) +
                                ": label_smoothing, softcap or temperature out of range");
  }
  require_vector(loss, compute, n, "loss", true);
  require_vector(lse, compute, n, "lse", true);
  if (!logprob.is_none()) require_vector(logprob.cast<py::array>(), compute, n, "logprobs", true);
  if (!entropy.is_none()) require_vector(entropy.cast<py::array>(), compute, n, "entropy", true);
  if (d_hidden.is_none() != d_weight.is_none() || (d_hidden.is_none() && !d_bias.is_none()) ||
      (!d_hidden.is_none() && d_bias.is_none() != bias.is_none())) {
    throw std::invalid_argument(std::string(kFn) + ": gradients must be all given or none");
  }
  if (!d_hidden.is_none()) {
    py::array dh = d_hidden.cast<py::array>(), dw = d_weight.cast<py::array>();
    require_same_dtype(dh, dt, kFn, "d_hidden");
    require_same_dtype(dw, dt, kFn, "d_weight");
    require_writeable(dh, kFn, "d_hidden");
    require_writeable(dw, kFn, "d_weight");
    if (dh.ndim() != 2 || dh.shape(0) != n || dh.shape(1) != d || dw.ndim() != 2 ||
        dw.shape(0) != v || dw.shape(1) != d) {
      throw std::invalid_argument(std::string(kFn) + ": gradient shapes do not match the inputs");
    }
    if (!d_bias.is_none()) require_vector(d_bias.cast<py::array>(), dt, v, "d_bias", true);
  }
  if (!ce_scale.is_none())
    require_vector(ce_scale.cast<py::array>(), compute, n, "grad_output", false);
  if (!z_scale.is_none())
    require_vector(z_scale.cast<py::array>(), compute, n, "grad_output", false);
  if (n == 0 || v == 0) return;
  const Options o{ignore_index, chunk, label_smoothing, softcap, inv_temperature};
  with_dtype(dt, [&](auto tag) {
    run<decltype(tag)>(hidden, weight, bias, target, class_weight, o, loss, lse, logprob, entropy,
                       d_hidden, d_weight, d_bias, ce_scale, ce_scale_all, z_scale, z_scale_all);
  });
}

}  // namespace

void bind_linear_cross_entropy(py::module_& m) {
  using namespace pybind11::literals;
  m.def("linear_cross_entropy_into", &linear_cross_entropy_into, "hidden"_a, "weight"_a, "bias"_a,
        "target"_a, "class_weight"_a, "ignore_index"_a, "label_smoothing"_a, "softcap"_a,
        "inv_temperature"_a, "chunk"_a, "loss"_a, "lse"_a, "logprob"_a, "entropy"_a, "d_hidden"_a,
        "d_weight"_a, "d_bias"_a, "ce_scale"_a, "ce_scale_all"_a, "z_scale"_a, "z_scale_all"_a,
        "Per-token fused linear + cross-entropy losses into `loss` and `lse`; gradients unless "
        "None");
}

}  // namespace mlmath::bindings
