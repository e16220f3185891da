// Argument checks shared by the bindings.  The Python wrappers already give friendly errors;
// these checks make the compiled functions safe to call directly: a bad array raises
// ValueError/TypeError (std::invalid_argument / py::type_error), never a bad read or write.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "mlmath/mlmath.h"

namespace mlmath::bindings {

namespace py = pybind11;

enum class DType { f32, f64 };

// Calls fn(float{}) or fn(double{}): the one place a binding turns a DType into a type.
template <class Fn>
void with_dtype(DType dt, const Fn& fn) {
  if (dt == DType::f32) {
    fn(float{});
  } else {
    fn(double{});
  }
}

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    if (a.ndim() == 1 || i + 1 < a.ndim()) s += a.ndim() == 1 ? "," : ", ";
  }
  return s + ")";
}

// float32 or float64, any layout; returns which.
inline DType float_dtype_any_layout(const py::array& a, const char* fn, const char* name) {
  const py::dtype dt = a.dtype();
  if (dt.kind() != 'f' || (dt.itemsize() != 4 && dt.itemsize() != 8)) {
    throw py::type_error(std::string(fn) + ": " + name + " must be float32 or float64 (got " +
                         py::str(dt).cast<std::string>() + ")");
  }
  return dt.itemsize() == 4 ? DType::f32 : DType::f64;
}

// Data aligned to the item size: the kernels load whole items (an unpickled array may start at
// any byte; the Python layer copies such inputs).
inline void require_aligned(const py::array& a, const char* fn, const char* name) {
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    throw std::invalid_argument(std::string(fn) + ": " + name + " is not aligned");
  }
}

// float32 or float64, C-contiguous, aligned; returns which.
inline DType float_dtype(const py::array& a, const char* fn, const char* name) {
  const DType dt = float_dtype_any_layout(a, fn, name);
  if (!(a.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(fn) + ": " + name + " must be C-contiguous");
  }
  require_aligned(a, fn, name);
  return dt;
}

inline void require_same_dtype(const py::array& a, DType want, const char* fn, const char* name) {
  if (float_dtype(a, fn, name) != want) {
    throw py::type_error(std::string(fn) + ": " + name + " has dtype " +
                         py::str(a.dtype()).cast<std::string>() + " but the input's dtype is " +
                         (want == DType::f32 ? "float32" : "float64"));
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
