// Binding of the batched GEMM.  The Python wrapper (python/mlmath_native/_matmul.py) broadcasts
// the batch dimensions and passes element offsets; this layer checks that every element any
// offset and stride can reach lies inside its array before the kernel runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/array_checks.h"
#include "bindings/without_gil.h"
#include "mlmath/mlmath.h"

namespace mlmath::bindings {

namespace {

// Every element that offsets and strides reach for `batch` items of (rows x cols) must lie in
// the memory span of `arr` (in elements, relative to arr.data(), which may have negative
// strides).
void check_reach(const py::array& arr, const char* name, const std::int64_t* offsets,
                 std::int64_t batch, std::int64_t rows, std::int64_t cols, std::int64_t rs,
                 std::int64_t cs) {
  if (rows == 0 || cols == 0) return;
  std::int64_t span_lo = 0, span_hi = 0;
  for (py::ssize_t d = 0; d < arr.ndim(); ++d) {
    if (arr.shape(d) == 0) return;  // an empty array: nothing is read or written
    const std::int64_t step = arr.strides(d) / static_cast<std::int64_t>(arr.itemsize());
    (step < 0 ? span_lo : span_hi) += (arr.shape(d) - 1) * step;
  }
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t o = offsets[b];
    const std::int64_t lo = o + (rs < 0 ? (rows - 1) * rs : 0) + (cs < 0 ? (cols - 1) * cs : 0);
    const std::int64_t hi = o + (rs > 0 ? (rows - 1) * rs : 0) + (cs > 0 ? (cols - 1) * cs : 0);
    if (lo < span_lo || hi > span_hi) {
      throw std::invalid_argument(std::string("matmul: ") + name +
                                  " offsets/strides reach outside the array");
    }
  }
}

// c[...] = a @ b over `batch` items (see GemmArgs); a, b, c are the flat base arrays.
void gemm_into(const py::array& a, const py::array& b, py::array& c, std::int64_t m, std::int64_t n,
               std::int64_t k, std::int64_t a_rs, std::int64_t a_cs, std::int64_t b_rs,
               std::int64_t b_cs, std::int64_t c_rs,
               const py::array_t<std::int64_t, py::array::c_style>& a_off,
               const py::array_t<std::int64_t, py::array::c_style>& b_off,
               const py::array_t<std::int64_t, py::array::c_style>& c_off, bool accumulate,
               bool interruptible) {
  const DType dt = float_dtype_any_layout(a, "matmul", "a", true);
  if (float_dtype_any_layout(b, "matmul", "b", true) != dt) {
    throw py::type_error("matmul: a and b have different dtypes");
  }
  require_aligned(a, "matmul", "a");
  require_aligned(b, "matmul", "b");
  require_same_dtype(c, dt, "matmul", "out");
  require_writeable(c, "matmul", "out");
  const std::int64_t batch = a_off.size();
  if (b_off.size() != batch || c_off.size() != batch || m < 0 || n < 0 || k < 0 || c_rs < n) {
    throw std::invalid_argument("matmul: inconsistent sizes, offsets or strides");
  }
  if (accumulate && (dt == DType::bf16 || dt == DType::f16)) {  // Note [16-bit GEMM]
    throw std::invalid_argument("matmul: accumulate is not supported for 16-bit out");
  }
  check_reach(a, "a", a_off.data(), batch, m, k, a_rs, a_cs);
  check_reach(b, "b", b_off.data(), batch, k, n, b_rs, b_cs);
  check_reach(c, "out", c_off.data(), batch, m, n, c_rs, 1);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    GemmArgs<T> g{m,
                  n,
                  k,
                  static_cast<const T*>(a.data()),
                  a_rs,
                  a_cs,
                  static_cast<const T*>(b.data()),
                  b_rs,
                  b_cs,
                  static_cast<T*>(c.mutable_data()),
                  c_rs,
                  accumulate,
                  batch,
                  a_off.data(),
                  b_off.data(),
                  c_off.data()};
    const KernelTable& kt = kernels();
    WithoutGil nogil(interruptible ? Interruptible::yes : Interruptible::no);
    MLMATH_KERNEL_FOR(kt, gemm, T)(g);
    nogil.finish();
  };
  with_dtype(dt, run);
}

}  // namespace

void bind_gemm(py::module_& m) {
  using namespace pybind11::literals;
  m.def("gemm_into", &gemm_into, "a"_a, "b"_a, "out"_a, "m"_a, "n"_a, "k"_a, "a_rs"_a, "a_cs"_a,
        "b_rs"_a, "b_cs"_a, "c_rs"_a, "a_offsets"_a, "b_offsets"_a, "c_offsets"_a, "accumulate"_a,
        "interruptible"_a = true,
        "Batched strided matrix product on the packed GEMM core; interruptible=False when out "
        "is the caller's array (Ctrl-C would leave it half-written: Note [kernels without the "
        "GIL])");
}

}  // namespace mlmath::bindings
