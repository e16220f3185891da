// Softmax family along one axis of a C-contiguous array seen as [outer][n][inner]:
//
//   softmax      y_i = exp(x_i - m) / s,          m = max_j x_j,  s = sum_j exp(x_j - m)
//   log_softmax  y_i = (x_i - m) - log s          (in that order: m + log s would lose log s)
//   logsumexp    out = m + log s                  (m replaced by 0 when it is +-inf)
//   softmax_backward      dx_i = y_i (dy_i - sum_j y_j dy_j)      y = softmax(x)
//   log_softmax_backward  dx_i = dy_i - exp(y_i) sum_j dy_j       y = log_softmax(x)
//
// Two layouts:
//   rows     (inner == 1): the axis is contiguous; each row is one task.  Three passes per row
//            (max; exp + store + sum; scale): rows that fit in L2 are re-read from cache, so
//            computing exp once beats the one-pass online form.
//   columns  (inner > 1): the axis has stride `inner`; a task is one [outer] slice times one
//            block of up to 4 vectors of adjacent columns, reduced lane-wise down the axis.
// 16-bit storage (bf16, f16; Note [16-bit storage] in common/half.h): values are widened on
// load and every pass computes in float32.  softmax's second pass would store exp(x_i - m) in y
// and the third scale it there, rounding twice; a 16-bit row keeps those values in a float
// scratch row instead (rows up to kScratchRow; longer rows, and columns, recompute exp in the
// third pass), so each y_i is rounded once.  Rows whose range keeps every x_i - m within
// [-87, 0] use an exp with relative error below 2^-21 (exp_normal_range_16bit), well under the
// 16-bit rounding that follows, and three fewer multiplies per vector.
//
// Every reduction stays inside one task in a fixed order, so results do not depend on the
// number of threads.  Outputs may alias inputs exactly (each pass reads element i before it
// writes element i).
//
// Note [NaN in reductions]
// Vector max drops a NaN that is not in its last operand, so m can miss a NaN of the row.  That
// is harmless: the NaN reaches the sum through exp(x_i - m), and the whole row becomes NaN, which
// is the formula's answer.  Rows that are all -inf, or hold +inf, likewise give NaN (inf - inf).
// logsumexp alone wants -inf / +inf for those rows (as scipy and torch give); it shifts by 0
// instead of an infinite m, so that s is 0 or inf and log s gives the infinity.
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/axis_ops.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

namespace {

// -- contiguous rows ---------------------------------------------------------------------------

enum class Op { softmax, log_softmax, softmax_backward, log_softmax_backward };

// Floats of scratch per 16-bit softmax row (32 KiB of stack): a 4096-class row of the
// benchmark fits with room; a longer row recomputes exp instead of storing it.
constexpr std::int64_t kScratchRow = 8192;

// y_i = exp(x_i - m) * scale (the third pass of a 16-bit softmax row that did not fit scratch).
template <class S, class T = compute_t<S>>
void row_exp_scale(const S* x, S* y, std::int64_t n, T m, T scale) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V vm = V::set1(m), vs = V::set1(scale);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) mul(exp<true>(sub(V::load(x + i), vm)), vs).store(y + i);
  if (i < n) {
    mul(exp(sub(V::load_partial(x + i, n - i, T(0)), vm)), vs).store_partial(y + i, n - i);
  }
}

// y_i = e_i * scale for a 16-bit row, from the float scratch row e; every e_i * scale is finite
// (s is a finite positive sum), so the stores skip the NaN repair.
template <class S>
void row_scale_finite(const float* e, S* y, std::int64_t n, float scale) {
  using V = Vec<float>;
  constexpr std::int64_t W = V::width;
  const V vs = V::set1(scale);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) mul(V::load(e + i), vs).store_finite(y + i);
  if (i < n) mul(V::load_partial(e + i, n - i, 0.0f), vs).store_partial(y + i, n - i);
}

// sum_j exp(x_j - m) over a row whose range allows exp_normal_range, with y_j = exp(x_j - m)
// when y is not null; a 16-bit row, whose result is rounded to 16 bits next, takes the shorter
// exp_normal_range_16bit (vmath.h).
template <class S, class D, class T = compute_t<S>>
T row_exp_sum_normal(const S* x, D* y, std::int64_t n, T m) {
  if constexpr (is_16bit<S>) {
    const auto exp16 = [](Vec<float> v) { return exp_normal_range_16bit(v); };
    return y ? row_exp_sum_with<true>(x, y, n, m, exp16)
             : row_exp_sum_with<false>(x, y, n, m, exp16);
  } else {
    return y ? row_exp_sum<true>(x, y, n, m, true) : row_exp_sum<false>(x, y, n, m, true);
  }
}

template <Op op, class S, class T = compute_t<S>>
void rows_forward(const S* x, S* y, std::int64_t n) {
  const auto [m, normal_range] = row_max_range(x, n);
  if constexpr (op == Op::softmax && is_16bit<S>) {
    if (n <= kScratchRow) {
      float scratch[kScratchRow];
      const T s =
          normal_range ? row_exp_sum_normal(x, scratch, n, m) : row_exp_sum<true>(x, scratch, n, m);
      if (std::isfinite(s) && s > 0) {
        row_scale_finite(scratch, y, n, T(1) / s);
      } else {
        row_affine(scratch, y, n, T(1) / s, T(0));  // a NaN/inf row: NaN where the formula is
      }
    } else {
      S* no_store = nullptr;
      const T s = row_exp_sum<false>(x, no_store, n, m, normal_range);
      row_exp_scale(x, y, n, m, T(1) / s);
    }
  } else if constexpr (op == Op::softmax) {
    const T s = row_exp_sum<true>(x, y, n, m, normal_range);
    row_affine(y, y, n, T(1) / s, T(0));
  } else {
    S* no_store = nullptr;
    const T s = normal_range ? row_exp_sum_normal(x, no_store, n, m)
                             : row_exp_sum<false>(x, no_store, n, m);
    row_shift2(x, y, n, m, std::log(s));
  }
}

template <Op op, class S, class T = compute_t<S>>
void rows_backward(const S* y, const S* dy, S* dx, std::int64_t n) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  if (op == Op::softmax_backward) {
    const V dot = V::set1(row_dot(y, dy, n));  // dx = y * (dy - dot)
    std::int64_t i = 0;
    for (; i + W <= n; i += W) mul(V::load(y + i), sub(V::load(dy + i), dot)).store(dx + i);
    if (i < n) {
      const V yv = V::load_partial(y + i, n - i, 0), dyv = V::load_partial(dy + i, n - i, 0);
      mul(yv, sub(dyv, dot)).store_partial(dx + i, n - i);
    }
  } else {
    const V neg_sum = V::set1(-row_dot(dy, static_cast<const S*>(nullptr), n));
    std::int64_t i = 0;  // dx = dy - exp(y) * sum
    for (; i + W <= n; i += W) fma(exp(V::load(y + i)), neg_sum, V::load(dy + i)).store(dx + i);
    if (i < n) {
      const V yv = V::load_partial(y + i, n - i, 0), dyv = V::load_partial(dy + i, n - i, 0);
      fma(exp(yv), neg_sum, dyv).store_partial(dx + i, n - i);
    }
  }
}

// -- strided columns ---------------------------------------------------------------------------

// x, y point at the first column of one block of `count` columns in an [n][inner] slice.
template <int NV, Op op, class S, class T = compute_t<S>>
void cols_forward(const S* x, S* y, std::int64_t n, std::int64_t inner, std::int64_t count) {
  using C = Cols<T, NV>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  C m = C::set1(neg_inf);
  for (std::int64_t i = 0; i < n; ++i) m = zip(m, C::load(x + i * inner, count, neg_inf), vmax);
  C s = C::set1(0);
  for (std::int64_t i = 0; i < n; ++i) {
    const C e = zip(C::load(x + i * inner, count, T(0)), m,
                    [](Vec<T> a, Vec<T> b) { return exp(sub(a, b)); });
    if (op == Op::softmax && !is_16bit<S>) e.store(y + i * inner, count);
    s = zip(s, e, vadd);
  }
  if (op == Op::softmax && is_16bit<S>) {
    const C inv = zip(C::set1(1), s, [](Vec<T> a, Vec<T> b) { return div(a, b); });
    for (std::int64_t i = 0; i < n; ++i) {
      const C e = zip(C::load(x + i * inner, count, T(0)), m,
                      [](Vec<T> a, Vec<T> b) { return exp(sub(a, b)); });
      zip(e, inv, vmul).store(y + i * inner, count);
    }
  } else if (op == Op::softmax) {
    const C inv = zip(C::set1(1), s, [](Vec<T> a, Vec<T> b) { return div(a, b); });
    for (std::int64_t i = 0; i < n; ++i)
      zip(C::load(y + i * inner, count, T(0)), inv, vmul).store(y + i * inner, count);
  } else {
    const C log_s = s.per_lane(log_of<T>);
    for (std::int64_t i = 0; i < n; ++i)
      zip(zip(C::load(x + i * inner, count, T(0)), m, vsub), log_s, vsub)
          .store(y + i * inner, count);
  }
}

template <int NV, class S, class T = compute_t<S>>
void cols_logsumexp(const S* x, S* out, std::int64_t n, std::int64_t inner, std::int64_t count) {
  using C = Cols<T, NV>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  C m = C::set1(neg_inf);
  for (std::int64_t i = 0; i < n; ++i) m = zip(m, C::load(x + i * inner, count, neg_inf), vmax);
  const C shift = m.per_lane(finite_or_zero<T>);
  C s = C::set1(0);
  for (std::int64_t i = 0; i < n; ++i) {
    const C e = zip(C::load(x + i * inner, count, T(0)), shift,
                    [](Vec<T> a, Vec<T> b) { return exp(sub(a, b)); });
    s = zip(s, e, vadd);
  }
  zip(shift, s.per_lane(log_of<T>), vadd).store(out, count);
}

template <int NV, Op op, class S, class T = compute_t<S>>
void cols_backward(const S* y, const S* dy, S* dx, std::int64_t n, std::int64_t inner,
                   std::int64_t count) {
  using C = Cols<T, NV>;
  C acc = C::set1(0);
  for (std::int64_t i = 0; i < n; ++i) {
    const C dyv = C::load(dy + i * inner, count, T(0));
    if (op == Op::softmax_backward) {
      acc = zip(acc, zip(C::load(y + i * inner, count, T(0)), dyv, vmul), vadd);
    } else {
      acc = zip(acc, dyv, vadd);
    }
  }
  for (std::int64_t i = 0; i < n; ++i) {
    const C yv = C::load(y + i * inner, count, T(0));
    const C dyv = C::load(dy + i * inner, count, T(0));
    C r;
    if (op == Op::softmax_backward) {
      r = zip(yv, zip(dyv, acc, vsub), vmul);  // dx = y * (dy - sum y dy)
    } else {
      r = zip(dyv, zip(yv, acc, [](Vec<T> a, Vec<T> b) { return mul(exp(a), b); }), vsub);
    }
    r.store(dx + i * inner, count);
  }
}

// -- drivers ---------------------------------------------------------------------------------

template <Op op, class T>
void forward(const T* x, T* y, AxisLayout s) {  // T: the storage type
  for_each_task<T>(s, [&](std::int64_t o, std::int64_t j, std::int64_t count) {
    const std::int64_t base = o * s.n * s.inner + j;
    if (s.inner == 1) {
      rows_forward<op>(x + base, y + base, s.n);
    } else {
      with_block_vecs<T>(count, [&](auto nv) {
        cols_forward<nv.value, op>(x + base, y + base, s.n, s.inner, count);
      });
    }
  });
}

template <Op op, class T>
void backward(const T* y, const T* dy, T* dx, AxisLayout s) {
  for_each_task<T>(s, [&](std::int64_t o, std::int64_t j, std::int64_t count) {
    const std::int64_t base = o * s.n * s.inner + j;
    if (s.inner == 1) {
      rows_backward<op>(y + base, dy + base, dx + base, s.n);
    } else {
      with_block_vecs<T>(count, [&](auto nv) {
        cols_backward<nv.value, op>(y + base, dy + base, dx + base, s.n, s.inner, count);
      });
    }
  });
}

template <class S>
void logsumexp(const S* x, S* out, AxisLayout s) {
  using T = compute_t<S>;
  for_each_task<S>(s, [&](std::int64_t o, std::int64_t j, std::int64_t count) {
    const S* xs = x + o * s.n * s.inner + j;
    if (s.inner == 1) {
      const T m = row_max(xs, s.n);
      S* no_store = nullptr;
      const T sum = std::isfinite(m) ? row_exp_sum<false, true>(xs, no_store, s.n, m)
                                     : row_exp_sum<false, false>(xs, no_store, s.n, T(0));
      out[o] = narrow<S>(finite_or_zero(m) + std::log(sum));
    } else {
      with_block_vecs<T>(count, [&](auto nv) {
        cols_logsumexp<nv.value>(xs, out + o * s.inner + j, s.n, s.inner, count);
      });
    }
  });
}

template <class T>
void exp_array(const T* x, T* y, std::int64_t n) {
  using V = Vec<T>;
  std::int64_t i = 0;
  for (; i + V::width <= n; i += V::width) exp(V::load(x + i)).store(y + i);
  if (i < n) exp(V::load_partial(x + i, n - i, 0)).store_partial(y + i, n - i);
}

// y = x converted element by element, through whole vectors and one partial vector.
template <class X, class Y>
void convert_array(const X* x, Y* y, std::int64_t n) {
  using V = Vec<float>;
  std::int64_t i = 0;
  for (; i + V::width <= n; i += V::width) V::load(x + i).store(y + i);
  if (i < n) V::load_partial(x + i, n - i, 0.0f).store_partial(y + i, n - i);
}

}  // namespace

void softmax_f32(const float* x, float* y, AxisLayout s) { forward<Op::softmax>(x, y, s); }
void softmax_f64(const double* x, double* y, AxisLayout s) { forward<Op::softmax>(x, y, s); }
void log_softmax_f32(const float* x, float* y, AxisLayout s) { forward<Op::log_softmax>(x, y, s); }
void log_softmax_f64(const double* x, double* y, AxisLayout s) {
  forward<Op::log_softmax>(x, y, s);
}
void logsumexp_f32(const float* x, float* out, AxisLayout s) { logsumexp(x, out, s); }
void logsumexp_f64(const double* x, double* out, AxisLayout s) { logsumexp(x, out, s); }
void softmax_backward_f32(const float* y, const float* dy, float* dx, AxisLayout s) {
  backward<Op::softmax_backward>(y, dy, dx, s);
}
void softmax_backward_f64(const double* y, const double* dy, double* dx, AxisLayout s) {
  backward<Op::softmax_backward>(y, dy, dx, s);
}
void log_softmax_backward_f32(const float* y, const float* dy, float* dx, AxisLayout s) {
  backward<Op::log_softmax_backward>(y, dy, dx, s);
}
void log_softmax_backward_f64(const double* y, const double* dy, double* dx, AxisLayout s) {
  backward<Op::log_softmax_backward>(y, dy, dx, s);
}
#define MLMATH_SOFTMAX_16BIT(S, suffix)                                                            \
  void softmax_##suffix(const S* x, S* y, AxisLayout s) { forward<Op::softmax>(x, y, s); }         \
  void log_softmax_##suffix(const S* x, S* y, AxisLayout s) { forward<Op::log_softmax>(x, y, s); } \
  void logsumexp_##suffix(const S* x, S* out, AxisLayout s) { logsumexp(x, out, s); }              \
  void softmax_backward_##suffix(const S* y, const S* dy, S* dx, AxisLayout s) {                   \
    backward<Op::softmax_backward>(y, dy, dx, s);                                                  \
  }                                                                                                \
  void log_softmax_backward_##suffix(const S* y, const S* dy, S* dx, AxisLayout s) {               \
    backward<Op::log_softmax_backward>(y, dy, dx, s);                                              \
  }
MLMATH_SOFTMAX_16BIT(bf16, bf16)
MLMATH_SOFTMAX_16BIT(f16, f16)
#undef MLMATH_SOFTMAX_16BIT
void exp_f32(const float* x, float* y, std::int64_t n) { exp_array(x, y, n); }
void exp_f64(const double* x, double* y, std::int64_t n) { exp_array(x, y, n); }
void widen_bf16(const bf16* x, float* y, std::int64_t n) { convert_array(x, y, n); }
void widen_f16(const f16* x, float* y, std::int64_t n) { convert_array(x, y, n); }
void narrow_bf16(const float* x, bf16* y, std::int64_t n) { convert_array(x, y, n); }
void narrow_f16(const float* x, f16* y, std::int64_t n) { convert_array(x, y, n); }

MLMATH_ISA_END
