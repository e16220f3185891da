// Argument checks shared by the bindings.  The Python wrappers already give friendly errors;
// these checks make the compiled functions safe to call directly: a bad array raises
// ValueError/TypeError (std::invalid_argument / py::type_error), never a bad read or write.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "mlmath/mlmath.h"

namespace mlmath::bindings {

namespace py = pybind11;

// Storage dtypes: float32, float64 and the 16-bit bfloat16 (ml_dtypes.bfloat16) and float16
// (Note [16-bit storage] in common/half.h).
enum class DType { f32, f64, bf16, f16 };

inline const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::f32:
      return "float32";
    case DType::f64:
      return "float64";
    case DType::bf16:
      return "bfloat16";
    default:
      return "float16";
  }
}

// Calls fn(S{}) with S = float, double, bf16 or f16: the one place a binding turns a DType into
// a type.
template <class Fn>
void with_dtype(DType dt, const Fn& fn) {
  switch (dt) {
    case DType::f32:
      fn(float{});
      break;
    case DType::f64:
      fn(double{});
      break;
    case DType::bf16:
      fn(bf16{});
      break;
    default:
      fn(f16{});
      break;
  }
}

// with_dtype for a family with float32 and float64 kernels only (its checks refuse 16-bit data).
template <class Fn>
void with_wide_dtype(DType dt, const Fn& fn) {
  if (dt == DType::f32) {
    fn(float{});
  } else {
    fn(double{});
  }
}

// The kernel of a family for storage type S, e.g. MLMATH_KERNEL_FOR(k, softmax, S) is
// k.softmax_f32 for S = float and k.softmax_bf16 for S = bf16.
template <class S, class F32, class F64, class BF16, class F16>
auto kernel_for(F32 f32, F64 f64, BF16 bf, F16 h) {
  if constexpr (std::is_same_v<S, float>) {
    return f32;
  } else if constexpr (std::is_same_v<S, double>) {
    return f64;
  } else if constexpr (std::is_same_v<S, bf16>) {
    return bf;
  } else {
    return h;
  }
}
#define MLMATH_KERNEL_FOR(table, family, S)                                        \
  kernel_for<S>((table).family##_f32, (table).family##_f64, (table).family##_bf16, \
                (table).family##_f16)

// The dtype of an array if it is one of the storage dtypes (bfloat16 is recognised by name:
// ml_dtypes registers it with NumPy at run time).
inline bool storage_dtype(const py::dtype& dt, DType* out) {
  if (dt.kind() == 'f' && dt.itemsize() == 4) {
    *out = DType::f32;
  } else if (dt.kind() == 'f' && dt.itemsize() == 8) {
    *out = DType::f64;
  } else if (dt.kind() == 'f' && dt.itemsize() == 2) {
    *out = DType::f16;
  } else if (dt.itemsize() == 2 && py::str(dt).cast<std::string>() == "bfloat16") {
    *out = DType::bf16;
  } else {
    return false;
  }
  return true;
}

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    if (a.ndim() == 1 || i + 1 < a.ndim()) s += a.ndim() == 1 ? "," : ", ";
  }
  return s + ")";
}

// float32 or float64 (or, with allow_16bit, bfloat16 or float16), any layout; returns which.
inline DType float_dtype_any_layout(const py::array& a, const char* fn, const char* name,
                                    bool allow_16bit = false) {
  DType dt;
  if (!storage_dtype(a.dtype(), &dt) || (!allow_16bit && dt != DType::f32 && dt != DType::f64)) {
    throw py::type_error(std::string(fn) + ": " + name + " must be float32 or float64" +
                         (allow_16bit ? ", bfloat16 or float16" : "") + " (got " +
                         py::str(a.dtype()).cast<std::string>() + ")");
  }
  return dt;
}

// Data aligned to the item size: the kernels load whole items (an unpickled array may start at
// any byte; the Python layer copies such inputs).
inline void require_aligned(const py::array& a, const char* fn, const char* name) {
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    throw std::invalid_argument(std::string(fn) + ": " + name + " is not aligned");
  }
}

// float32 or float64 (or, with allow_16bit, bfloat16 or float16), C-contiguous, aligned;
// returns which.
inline DType float_dtype(const py::array& a, const char* fn, const char* name,
                         bool allow_16bit = false) {
  const DType dt = float_dtype_any_layout(a, fn, name, allow_16bit);
  if (!(a.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(fn) + ": " + name + " must be C-contiguous");
  }
  require_aligned(a, fn, name);
  return dt;
}

inline void require_same_dtype(const py::array& a, DType want, const char* fn, const char* name) {
  if (float_dtype(a, fn, name, true) != want) {
    throw py::type_error(std::string(fn) + ": " + name + " has dtype " +
                         py::str(a.dtype()).cast<std::string>() + " but the input's dtype is " +
                         dtype_name(want));
  }
}

inline void require_writeable(const py::array& a, const char* fn, const char* name) {
  if (!a.writeable()) {
    throw std::invalid_argument(std::string(fn) + ": " + name + " is not writeable");
  }
}

inline void require_same_shape(const py::array& a, const py::array& b, const char* fn,
                               const char* name) {
  bool same = a.ndim() == b.ndim();
  for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == b.shape(i);
  if (!same) {
    throw std::invalid_argument(std::string(fn) + ": " + name + " has shape " + shape_str(b) +
                                " (expected " + shape_str(a) + ")");
  }
}

// Normalises a possibly negative axis (0-d arrays accept axis 0 and -1, as torch does).
inline int normalize_axis(const py::array& a, int axis, const char* fn) {
  const int ndim = static_cast<int>(a.ndim());
  const int span = ndim == 0 ? 1 : ndim;
  if (axis < -span || axis >= span) {
    throw std::invalid_argument(std::string(fn) + ": axis " + std::to_string(axis) +
                                " is out of bounds for an array of dimension " +
                                std::to_string(ndim));
  }
  return axis < 0 ? axis + span : axis;
}

// The array seen as [outer][n][inner] around `axis` (a 0-d array is [1][1][1]).
inline AxisLayout axis_layout(const py::array& a, int axis) {
  AxisLayout s{1, 1, 1};
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    const std::int64_t d = a.shape(i);
    if (i < axis) {
      s.outer *= d;
    } else if (i == axis) {
      s.n = d;
    } else {
      s.inner *= d;
    }
  }
  return s;
}

}  // namespace mlmath::bindings
