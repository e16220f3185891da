// attention_into: the checks every caller relies on before the kernel runs (shapes, dtypes,
// contiguity, writability, strides inside the mask); the Python layer (_attention.py) turns
// user arguments into these arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "bindings/array_checks.h"
#include "mlmath/mlmath.h"

namespace py = pybind11;

namespace mlmath::bindings {
namespace {

// mask: None or a (B, Hq, Lq, Lk) view of non-negative strides, bool or of q's dtype.
void check_mask(const py::object& mask, const py::array& q, std::int64_t B, std::int64_t hq,
                std::int64_t lq, std::int64_t lk, const char* fn, const void*& mp,
                bool& mask_is_bool, std::int64_t ms[4]) {
  if (mask.is_none()) return;
  py::array m = mask.cast<py::array>();
  // dtypes compare by value: an unpickled array (dask.distributed) has an equal but distinct
  // dtype object, which an identity test (dtype().is) refused
  if (m.dtype().kind() == 'b') {
    mask_is_bool = true;
  } else {
    if (float_dtype_any_layout(m, fn, "mask") != float_dtype_any_layout(q, fn, "q")) {
      throw py::type_error(std::string(fn) + ": mask must be bool or q's dtype");
    }
  }
  if (m.ndim() != 4 || m.shape(0) != B || m.shape(1) != hq || m.shape(2) != lq ||
      m.shape(3) != lk) {
    throw std::invalid_argument(std::string(fn) + ": mask must be a (B, Hq, Lq, Lk) view");
  }
  for (int i = 0; i < 4; ++i) {
    if (m.strides(i) % static_cast<py::ssize_t>(m.itemsize()) != 0 || m.strides(i) < 0) {
      throw std::invalid_argument(std::string(fn) +
                                  ": mask strides must be non-negative multiples of its item size");
    }
    ms[i] = m.strides(i) / static_cast<py::ssize_t>(m.itemsize());
  }
  mp = m.data();
}

// out (B, Hq, Lq, Dv) [and lse (B, Hq, Lq)] = attention of q (B, Hq, Lq, D) over k (Bk, Hkv, Lk,
// D) and v (Bv, Hkv, Lk, Dv), Bk and Bv either B or 1; mask None or a (B, Hq, Lq, Lk) view of any
// strides, bool or of q's dtype.
void attention_into(const py::array& q, const py::array& k, const py::array& v,
                    const py::object& mask, int causal, double scale, double dropout_p,
                    std::uint64_t seed, py::array& out, const py::object& lse) {
  const char* fn = "attention";
  const DType dt = float_dtype(q, fn, "q");
  require_same_dtype(k, dt, fn, "k");
  require_same_dtype(v, dt, fn, "v");
  require_same_dtype(out, dt, fn, "out");
  require_writeable(out, fn, "out");
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || out.ndim() != 4) {
    throw std::invalid_argument("attention: q, k, v and out must be 4-D");
  }
  const std::int64_t B = q.shape(0), hq = q.shape(1), lq = q.shape(2), d = q.shape(3);
  const std::int64_t hkv = k.shape(1), lk = k.shape(2), dv = v.shape(3);
  if (k.shape(3) != d || v.shape(1) != hkv || v.shape(2) != lk ||
      (k.shape(0) != B && k.shape(0) != 1) || (v.shape(0) != B && v.shape(0) != 1) || hkv < 1 ||
      hq % hkv != 0 || out.shape(0) != B || out.shape(1) != hq || out.shape(2) != lq ||
      out.shape(3) != dv) {
    throw std::invalid_argument("attention: inconsistent shapes");
  }
  if (causal < 0 || causal > 2 || !(dropout_p >= 0.0 && dropout_p < 1.0) || !std::isfinite(scale)) {
    throw std::invalid_argument("attention: bad causal, dropout_p or scale");
  }
  const void* mp = nullptr;
  bool mask_is_bool = false;
  std::int64_t ms[4] = {0, 0, 0, 0};
  check_mask(mask, q, B, hq, lq, lk, fn, mp, mask_is_bool, ms);
  void* lp = nullptr;
  if (!lse.is_none()) {
    py::array l = lse.cast<py::array>();
    require_same_dtype(l, dt, fn, "lse");
    require_writeable(l, fn, "lse");
    if (l.ndim() != 3 || l.shape(0) != B || l.shape(1) != hq || l.shape(2) != lq) {
      throw std::invalid_argument("attention: lse must be (B, Hq, Lq)");
    }
    lp = l.mutable_data();
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    AttentionArgs<T> a{};
    a.q = static_cast<const T*>(q.data());
    a.k = static_cast<const T*>(k.data());
    a.v = static_cast<const T*>(v.data());
    a.batch = B;
    a.hq = hq;
    a.hkv = hkv;
    a.lq = lq;
    a.lk = lk;
    a.d = d;
    a.dv = dv;
    a.k_batch_stride = k.shape(0) == 1 ? 0 : hkv * lk * d;
    a.v_batch_stride = v.shape(0) == 1 ? 0 : hkv * lk * dv;
    a.mask = mp;
    a.mask_is_bool = mask_is_bool;
    for (int i = 0; i < 4; ++i) a.mask_stride[i] = ms[i];
    a.causal = causal;
    a.scale = static_cast<T>(scale);
    a.dropout_p = dropout_p;
    a.seed = seed;
    a.out = static_cast<T*>(out.mutable_data());
    a.lse = static_cast<T*>(lp);
    const KernelTable& kt = kernels();
    py::gil_scoped_release release;
    if constexpr (sizeof(T) == 4) {
      kt.attention_f32(a);
    } else {
      kt.attention_f64(a);
    }
  };
  if (dt == DType::f32) {
    run(float{});
  } else {
    run(double{});
  }
}

// dq, dk, dv = the gradients of attention (q, k, v as for attention_into; k and v both shared
// by every batch or neither), given out, lse (B, Hq, Lq) and grad_out like out.
void attention_backward_into(const py::array& q, const py::array& k, const py::array& v,
                             const py::array& out, const py::array& lse, const py::array& grad_out,
                             const py::object& mask, int causal, double scale, double dropout_p,
                             std::uint64_t seed, py::array& dq, py::array& dk, py::array& dv) {
  const char* fn = "attention_backward";
  const DType dt = float_dtype(q, fn, "q");
  for (const auto& [arr, name] : {std::pair<const py::array*, const char*>{&k, "k"},
                                  {&v, "v"},
                                  {&out, "out"},
                                  {&lse, "lse"},
                                  {&grad_out, "grad_out"},
                                  {&dq, "dq"},
                                  {&dk, "dk"},
                                  {&dv, "dv"}}) {
    require_same_dtype(*arr, dt, fn, name);
  }
  require_writeable(dq, fn, "dq");
  require_writeable(dk, fn, "dk");
  require_writeable(dv, fn, "dv");
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || out.ndim() != 4 || lse.ndim() != 3 ||
      grad_out.ndim() != 4 || dq.ndim() != 4 || dk.ndim() != 4 || dv.ndim() != 4) {
    throw std::invalid_argument("attention_backward: bad array dimensions");
  }
  const std::int64_t B = q.shape(0), hq = q.shape(1), lq = q.shape(2), d = q.shape(3);
  const std::int64_t hkv = k.shape(1), lk = k.shape(2), dvs = v.shape(3);
  auto same = [](const py::array& x, std::initializer_list<std::int64_t> shape) {
    std::int64_t i = 0;
    for (std::int64_t s : shape)
      if (x.shape(i++) != s) return false;
    return true;
  };
  if (!same(k, {k.shape(0), hkv, lk, d}) || !same(v, {k.shape(0), hkv, lk, dvs}) ||
      (k.shape(0) != B && k.shape(0) != 1) || hkv < 1 || hq % hkv != 0 ||
      !same(out, {B, hq, lq, dvs}) || !same(grad_out, {B, hq, lq, dvs}) ||
      !same(lse, {B, hq, lq}) || !same(dq, {B, hq, lq, d}) || !same(dk, {k.shape(0), hkv, lk, d}) ||
      !same(dv, {k.shape(0), hkv, lk, dvs})) {
    throw std::invalid_argument("attention_backward: inconsistent shapes");
  }
  if (causal < 0 || causal > 2 || !(dropout_p >= 0.0 && dropout_p < 1.0) || !std::isfinite(scale)) {
    throw std::invalid_argument("attention_backward: bad causal, dropout_p or scale");
  }
  const void* mp = nullptr;
  bool mask_is_bool = false;
  std::int64_t ms[4] = {0, 0, 0, 0};
  check_mask(mask, q, B, hq, lq, lk, fn, mp, mask_is_bool, ms);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    AttentionBackwardArgs<T> g{};
    AttentionArgs<T>& a = g.fwd;
    a.q = static_cast<const T*>(q.data());
    a.k = static_cast<const T*>(k.data());
    a.v = static_cast<const T*>(v.data());
    a.batch = B;
    a.hq = hq;
    a.hkv = hkv;
    a.lq = lq;
    a.lk = lk;
    a.d = d;
    a.dv = dvs;
    a.k_batch_stride = k.shape(0) == 1 ? 0 : hkv * lk * d;
    a.v_batch_stride = k.shape(0) == 1 ? 0 : hkv * lk * dvs;
    a.mask = mp;
    a.mask_is_bool = mask_is_bool;
    for (int i = 0; i < 4; ++i) a.mask_stride[i] = ms[i];
    a.causal = causal;
    a.scale = static_cast<T>(scale);
    a.dropout_p = dropout_p;
    a.seed = seed;
    a.out = const_cast<T*>(static_cast<const T*>(out.data()));
    a.lse = const_cast<T*>(static_cast<const T*>(lse.data()));
    g.grad_out = static_cast<const T*>(grad_out.data());
    g.dq = static_cast<T*>(dq.mutable_data());
    g.dk = static_cast<T*>(dk.mutable_data());
    g.dv = static_cast<T*>(dv.mutable_data());
    const KernelTable& kt = kernels();
    py::gil_scoped_release release;
    if constexpr (sizeof(T) == 4) {
      kt.attention_backward_f32(g);
    } else {
      kt.attention_backward_f64(g);
    }
  };
  if (dt == DType::f32) {
    run(float{});
  } else {
    run(double{});
  }
}

}  // namespace

void bind_attention(py::module_& m) {
  using namespace pybind11::literals;
  m.def("attention_into", &attention_into, "q"_a, "k"_a, "v"_a, "mask"_a, "causal"_a, "scale"_a,
        "dropout_p"_a, "seed"_a, "out"_a, "lse"_a,
        "out (and lse) = scaled dot-product attention of 4-D q, k, v (see _attention.py)");
  m.def("attention_backward_into", &attention_backward_into, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a,
        "grad_out"_a, "mask"_a, "causal"_a, "scale"_a, "dropout_p"_a, "seed"_a, "dq"_a, "dk"_a,
        "dv"_a, "dq, dk, dv = the gradients of attention (see _attention.py)");
}

}  // namespace mlmath::bindings
