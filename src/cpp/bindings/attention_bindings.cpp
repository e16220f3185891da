// attention_into: the checks every caller relies on before the kernel runs (shapes, dtypes,
// contiguity, writability, strides inside the mask); the Python layer (_attention.py) turns
// user arguments into these arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings/array_checks.h"
#include "mlmath/mlmath.h"

namespace py = pybind11;

namespace mlmath::bindings {
namespace {

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
  if (!mask.is_none()) {
    py::array m = mask.cast<py::array>();
    if (m.dtype().is(py::dtype::of<bool>())) {
      mask_is_bool = true;
    } else {
      float_dtype_any_layout(m, fn, "mask");
      if (!m.dtype().is(q.dtype()))
        throw py::type_error("attention: mask must be bool or q's dtype");
    }
    if (m.ndim() != 4 || m.shape(0) != B || m.shape(1) != hq || m.shape(2) != lq ||
        m.shape(3) != lk) {
      throw std::invalid_argument("attention: mask must be a (B, Hq, Lq, Lk) view");
    }
    for (int i = 0; i < 4; ++i) {
      if (m.strides(i) % static_cast<py::ssize_t>(m.itemsize()) != 0 || m.strides(i) < 0) {
        throw std::invalid_argument(
            "attention: mask strides must be non-negative multiples of its item size");
      }
      ms[i] = m.strides(i) / static_cast<py::ssize_t>(m.itemsize());
    }
    mp = m.data();
  }
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

}  // namespace

void bind_attention(py::module_& m) {
  using namespace pybind11::literals;
  m.def("attention_into", &attention_into, "q"_a, "k"_a, "v"_a, "mask"_a, "causal"_a, "scale"_a,
        "dropout_p"_a, "seed"_a, "out"_a, "lse"_a,
        "out (and lse) = scaled dot-product attention of 4-D q, k, v (see _attention.py)");
}

}  // namespace mlmath::bindings
