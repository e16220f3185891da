// attention_into: the checks every caller relies on before the kernel runs (shapes, dtypes,
// contiguity, writability, strides inside the mask); the Python layer (_attention.py) turns
// user arguments into these arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "bindings/array_checks.h"
#include "bindings/without_gil.h"
#include "mlmath/mlmath.h"

namespace py = pybind11;

namespace mlmath::bindings {
namespace {

// The dtype attention computes in for storage dtype dt: float32 for bf16 and f16 (the dtype of
// a float mask and of the lse; Note [16-bit storage]), else dt.
DType compute_dtype(DType dt) { return dt == DType::f64 ? DType::f64 : DType::f32; }

// mask: None or a (B, Hq, Lq, Lk) view of non-negative strides, bool or of q's compute dtype
// (q's dtype, float32 for bf16 and f16 q).
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
    if (float_dtype_any_layout(m, fn, "mask") !=
        compute_dtype(float_dtype_any_layout(q, fn, "q", true))) {
      throw py::type_error(std::string(fn) +
                           ": mask must be bool or q's dtype (float32 for bfloat16 or float16 q)");
    }
  }
  require_aligned(m, fn, "mask");
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

// What attention_into and attention_backward_into share, checked: q (B, Hq, Lq, D), k (Bk, Hkv,
// Lk, D) and v (Bv, Hkv, Lk, Dv) with Bk and Bv either B or 1 and Hq a multiple of Hkv, the
// options, and the mask (None or a (B, Hq, Lq, Lk) view of any strides, bool or q's compute
// dtype).  q, k and v are float32, float64, bfloat16 or float16, all three the same.
struct AttentionCall {
  DType dtype;
  std::int64_t B, hq, lq, d, hkv, lk, dv;
  bool k_shared, v_shared;  // one batch of k (of v) for all: Bk == 1 (Bv == 1)
  const void* mask = nullptr;
  bool mask_is_bool = false;
  std::int64_t mask_stride[4] = {0, 0, 0, 0};
  int causal;
  double scale, dropout_p;
  std::uint64_t seed;
  std::int64_t window_left = -1, window_right = -1;  // -1: unlimited
  double softcap = 0;                                // 0: none
  const void* sinks = nullptr;                       // (Hq,) of the compute dtype
  const void* alibi = nullptr;                       // (Hq,) of the compute dtype
  const std::int64_t* kv_len = nullptr;              // (B,) in [0, Lk]
  std::int64_t dropout_bh_offset = 0;
  std::int64_t num_splits = 0;  // >= 0; 0: chosen from the shapes
};

// The options of issue 22, as the kernels take them: window sides >= -1 (-1 unlimited), softcap
// finite and >= 0 (0 none), sinks and alibi_slopes None or contiguous (Hq,) arrays of q's compute
// dtype.
struct AttentionExtras {
  std::int64_t window_left, window_right;
  double softcap;
  py::object sinks, alibi, kv_len;
  std::int64_t dropout_bh_offset, num_splits;
};

// kv_len: None or a contiguous int64 (B,) array of values in [0, Lk] (the kernel reads keys
// below kv_len[b] only: a value past Lk would read outside k and v).
const std::int64_t* check_kv_len(const py::object& x, std::int64_t B, std::int64_t lk,
                                 const char* fn) {
  if (x.is_none()) return nullptr;
  py::array a = x.cast<py::array>();
  if (!py::isinstance<py::array_t<std::int64_t>>(a) || a.ndim() != 1 || a.shape(0) != B ||
      (B > 1 && a.strides(0) != static_cast<py::ssize_t>(sizeof(std::int64_t)))) {
    throw std::invalid_argument(std::string(fn) + ": kv_len must be a contiguous int64 (B,) array");
  }
  require_aligned(a, fn, "kv_len");
  const auto* p = static_cast<const std::int64_t*>(a.data());
  for (std::int64_t b = 0; b < B; ++b) {
    if (p[b] < 0 || p[b] > lk) {
      throw std::invalid_argument(std::string(fn) + ": kv_len values must be in [0, Lk]");
    }
  }
  return p;
}

const void* per_head(const py::object& x, DType dt, std::int64_t hq, const char* fn,
                     const char* name) {
  if (x.is_none()) return nullptr;
  py::array a = x.cast<py::array>();
  require_same_dtype(a, compute_dtype(dt), fn, name);
  require_aligned(a, fn, name);
  if (a.ndim() != 1 || a.shape(0) != hq ||
      (hq > 1 && a.strides(0) != static_cast<py::ssize_t>(a.itemsize()))) {
    throw std::invalid_argument(std::string(fn) + ": " + name +
                                " must be a contiguous (Hq,) array");
  }
  return a.data();
}

void check_extras(AttentionCall& c, const AttentionExtras& e, const char* fn) {
  if (e.window_left < -1 || e.window_right < -1 || !(e.softcap >= 0.0) ||
      !std::isfinite(e.softcap)) {
    throw std::invalid_argument(std::string(fn) + ": bad window or softcap");
  }
  c.window_left = e.window_left, c.window_right = e.window_right, c.softcap = e.softcap;
  c.sinks = per_head(e.sinks, c.dtype, c.hq, fn, "sinks");
  c.alibi = per_head(e.alibi, c.dtype, c.hq, fn, "alibi_slopes");
  c.kv_len = check_kv_len(e.kv_len, c.B, c.lk, fn);
  if (e.dropout_bh_offset < 0) {
    throw std::invalid_argument(std::string(fn) + ": dropout_bh_offset must be >= 0");
  }
  c.dropout_bh_offset = e.dropout_bh_offset;
  if (e.num_splits < 0) throw std::invalid_argument(std::string(fn) + ": num_splits must be >= 0");
  c.num_splits = e.num_splits;
}

AttentionCall check_call(const char* fn, const py::array& q, const py::array& k, const py::array& v,
                         const py::object& mask, int causal, double scale, double dropout_p,
                         std::uint64_t seed) {
  AttentionCall c{};
  c.dtype = float_dtype(q, fn, "q", true);
  require_same_dtype(k, c.dtype, fn, "k");
  require_same_dtype(v, c.dtype, fn, "v");
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4) {
    throw std::invalid_argument(std::string(fn) + ": q, k and v must be 4-D");
  }
  c.B = q.shape(0), c.hq = q.shape(1), c.lq = q.shape(2), c.d = q.shape(3);
  c.hkv = k.shape(1), c.lk = k.shape(2), c.dv = v.shape(3);
  if (k.shape(3) != c.d || v.shape(1) != c.hkv || v.shape(2) != c.lk ||
      (k.shape(0) != c.B && k.shape(0) != 1) || (v.shape(0) != c.B && v.shape(0) != 1) ||
      c.hkv < 1 || c.hq % c.hkv != 0) {
    throw std::invalid_argument(std::string(fn) + ": inconsistent shapes of q, k and v");
  }
  c.k_shared = k.shape(0) == 1;
  c.v_shared = v.shape(0) == 1;
  if (causal < 0 || causal > 2 || !(dropout_p >= 0.0 && dropout_p < 1.0) || !std::isfinite(scale)) {
    throw std::invalid_argument(std::string(fn) + ": bad causal, dropout_p or scale");
  }
  c.causal = causal, c.scale = scale, c.dropout_p = dropout_p, c.seed = seed;
  check_mask(mask, q, c.B, c.hq, c.lq, c.lk, fn, c.mask, c.mask_is_bool, c.mask_stride);
  return c;
}

bool has_shape(const py::array& x, std::initializer_list<std::int64_t> shape) {
  if (x.ndim() != static_cast<py::ssize_t>(shape.size())) return false;
  py::ssize_t i = 0;
  for (std::int64_t s : shape)
    if (x.shape(i++) != s) return false;
  return true;
}

// The kernel's arguments for a checked call (out and lse left null).
template <class T>
AttentionArgs<T> kernel_args(const AttentionCall& c, const py::array& q, const py::array& k,
                             const py::array& v) {
  AttentionArgs<T> a{};
  a.q = static_cast<const T*>(q.data());
  a.k = static_cast<const T*>(k.data());
  a.v = static_cast<const T*>(v.data());
  a.batch = c.B, a.hq = c.hq, a.hkv = c.hkv, a.lq = c.lq, a.lk = c.lk, a.d = c.d, a.dv = c.dv;
  a.k_batch_stride = c.k_shared ? 0 : c.hkv * c.lk * c.d;
  a.v_batch_stride = c.v_shared ? 0 : c.hkv * c.lk * c.dv;
  a.mask = c.mask;
  a.mask_is_bool = c.mask_is_bool;
  for (int i = 0; i < 4; ++i) a.mask_stride[i] = c.mask_stride[i];
  a.causal = c.causal;
  a.scale = static_cast<typename AttentionArgs<T>::C>(c.scale);
  a.dropout_p = c.dropout_p;
  a.seed = c.seed;
  using C = typename AttentionArgs<T>::C;
  a.window_left = c.window_left, a.window_right = c.window_right;
  a.softcap = static_cast<C>(c.softcap);
  a.sinks = static_cast<const C*>(c.sinks);
  a.alibi = static_cast<const C*>(c.alibi);
  a.kv_len = c.kv_len;
  a.dropout_bh_offset = c.dropout_bh_offset;
  a.num_splits = c.num_splits;
  return a;
}

// out (B, Hq, Lq, Dv) [and lse (B, Hq, Lq), of the compute dtype: float32 for 16-bit q] =
// attention of q over k and v (check_call).
void attention_into(const py::array& q, const py::array& k, const py::array& v,
                    const py::object& mask, int causal, double scale, double dropout_p,
                    std::uint64_t seed, const AttentionExtras& extras, py::array& out,
                    const py::object& lse) {
  const char* fn = "attention";
  AttentionCall c = check_call(fn, q, k, v, mask, causal, scale, dropout_p, seed);
  check_extras(c, extras, fn);
  require_same_dtype(out, c.dtype, fn, "out");
  require_writeable(out, fn, "out");
  if (!has_shape(out, {c.B, c.hq, c.lq, c.dv})) {
    throw std::invalid_argument("attention: out must be (B, Hq, Lq, Dv)");
  }
  void* lp = nullptr;
  if (!lse.is_none()) {
    py::array l = lse.cast<py::array>();
    require_same_dtype(l, compute_dtype(c.dtype), fn, "lse");
    require_writeable(l, fn, "lse");
    if (!has_shape(l, {c.B, c.hq, c.lq})) {
      throw std::invalid_argument("attention: lse must be (B, Hq, Lq)");
    }
    lp = l.mutable_data();
  }
  with_dtype(c.dtype, [&](auto tag) {
    using T = decltype(tag);
    AttentionArgs<T> a = kernel_args<T>(c, q, k, v);
    a.out = static_cast<T*>(out.mutable_data());
    a.lse = static_cast<typename AttentionArgs<T>::C*>(lp);
    const auto kernel = MLMATH_KERNEL_FOR(kernels(), attention, T);
    WithoutGil nogil(Interruptible::yes);
    kernel(a);
    nogil.finish();
  });
}

// dq, dk, dv = the gradients of attention (q, k, v as for attention_into; k and v both shared
// by every batch or neither), given out, lse (B, Hq, Lq; the compute dtype) and grad_out like
// out.
void attention_backward_into(const py::array& q, const py::array& k, const py::array& v,
                             const py::array& out, const py::array& lse, const py::array& grad_out,
                             const py::object& mask, int causal, double scale, double dropout_p,
                             std::uint64_t seed, const AttentionExtras& extras, py::array& dq,
                             py::array& dk, py::array& dv, const py::object& dsinks) {
  const char* fn = "attention_backward";
  AttentionCall c = check_call(fn, q, k, v, mask, causal, scale, dropout_p, seed);
  check_extras(c, extras, fn);
  void* dsp = nullptr;
  if (!dsinks.is_none()) {
    if (c.sinks == nullptr) throw std::invalid_argument("attention_backward: dsinks without sinks");
    py::array d = dsinks.cast<py::array>();
    require_writeable(d, fn, "dsinks");
    dsp = const_cast<void*>(per_head(dsinks, c.dtype, c.hq, fn, "dsinks"));
  }
  require_same_dtype(lse, compute_dtype(c.dtype), fn, "lse");
  for (const auto& [arr, name] : {std::pair<const py::array*, const char*>{&out, "out"},
                                  {&grad_out, "grad_out"},
                                  {&dq, "dq"},
                                  {&dk, "dk"},
                                  {&dv, "dv"}}) {
    require_same_dtype(*arr, c.dtype, fn, name);
  }
  require_writeable(dq, fn, "dq");
  require_writeable(dk, fn, "dk");
  require_writeable(dv, fn, "dv");
  const std::int64_t bkv = k.shape(0);
  if (c.k_shared != c.v_shared || !has_shape(out, {c.B, c.hq, c.lq, c.dv}) ||
      !has_shape(grad_out, {c.B, c.hq, c.lq, c.dv}) || !has_shape(lse, {c.B, c.hq, c.lq}) ||
      !has_shape(dq, {c.B, c.hq, c.lq, c.d}) || !has_shape(dk, {bkv, c.hkv, c.lk, c.d}) ||
      !has_shape(dv, {bkv, c.hkv, c.lk, c.dv})) {
    throw std::invalid_argument("attention_backward: inconsistent shapes");
  }
  with_dtype(c.dtype, [&](auto tag) {
    using T = decltype(tag);
    using C = typename AttentionArgs<T>::C;
    AttentionBackwardArgs<T> g{};
    g.fwd = kernel_args<T>(c, q, k, v);
    g.fwd.out = const_cast<T*>(static_cast<const T*>(out.data()));
    g.fwd.lse = const_cast<C*>(static_cast<const C*>(lse.data()));
    g.grad_out = static_cast<const T*>(grad_out.data());
    g.dq = static_cast<T*>(dq.mutable_data());
    g.dk = static_cast<T*>(dk.mutable_data());
    g.dv = static_cast<T*>(dv.mutable_data());
    g.dsinks = static_cast<C*>(dsp);
    const auto kernel = MLMATH_KERNEL_FOR(kernels(), attention_backward, T);
    WithoutGil nogil(Interruptible::yes);
    kernel(g);
    nogil.finish();
  });
}

}  // namespace

void bind_attention(py::module_& m) {
  using namespace pybind11::literals;
  py::class_<AttentionExtras>(m, "AttentionExtras",
                              "window, softcap, sinks and ALiBi slopes of an attention call")
      .def(py::init([](std::int64_t wl, std::int64_t wr, double softcap, py::object sinks,
                       py::object alibi, py::object kv_len, std::int64_t bh_offset,
                       std::int64_t num_splits) {
             return AttentionExtras{wl,
                                    wr,
                                    softcap,
                                    std::move(sinks),
                                    std::move(alibi),
                                    std::move(kv_len),
                                    bh_offset,
                                    num_splits};
           }),
           "window_left"_a, "window_right"_a, "softcap"_a, "sinks"_a, "alibi_slopes"_a,
           "kv_len"_a = py::none(), "dropout_bh_offset"_a = 0, "num_splits"_a = 0);
  m.def("attention_into", &attention_into, "q"_a, "k"_a, "v"_a, "mask"_a, "causal"_a, "scale"_a,
        "dropout_p"_a, "seed"_a, "extras"_a, "out"_a, "lse"_a,
        "out (and lse) = scaled dot-product attention of 4-D q, k, v (see _attention.py)");
  m.def("attention_backward_into", &attention_backward_into, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a,
        "grad_out"_a, "mask"_a, "causal"_a, "scale"_a, "dropout_p"_a, "seed"_a, "extras"_a, "dq"_a,
        "dk"_a, "dv"_a, "dsinks"_a,
        "dq, dk, dv (and dsinks) = the gradients of attention (see _attention.py)");
}

}  // namespace mlmath::bindings
