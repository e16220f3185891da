// Softmax family along one axis of a C-contiguous array seen as [outer][n][inner]:
//
//   softmax      y_i = exp(x_i - m) / s,          m = max_j x_j,  s = sum_j exp(x_j - m)
//   log_softmax  y_i = x_i - m - log s
//   logsumexp    out = m + log s                  (m replaced by 0 when it is +-inf)
//   softmax_backward      dx_i = y_i (dy_i - sum_j y_j dy_j)      y = softmax(x)
//   log_softmax_backward  dx_i = dy_i - exp(y_i) sum_j dy_j       y = log_softmax(x)
//
// Two layouts:
//   rows     (inner == 1): the axis is contiguous; each row is one task.  Three passes per row
//            (max; exp + store + sum; scale): rows that fit in L2 are re-read from cache, so
//            computing exp once beats the one-pass online form.
//   columns  (inner > 1): the axis has stride `inner`; a task is one [outer] slice times one
//            group of Vec::width adjacent columns, reduced lane-wise down the axis.
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

#include "common/parallel.h"
#include "common/vmath.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

namespace {

// -- contiguous rows ---------------------------------------------------------------------------

template <class T>
T row_max(const T* x, std::int64_t n) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V neg_inf = V::set1(-std::numeric_limits<T>::infinity());
  V a0 = neg_inf, a1 = neg_inf, a2 = neg_inf, a3 = neg_inf;
  std::int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = max(a0, V::load(x + i));
    a1 = max(a1, V::load(x + i + W));
    a2 = max(a2, V::load(x + i + 2 * W));
    a3 = max(a3, V::load(x + i + 3 * W));
  }
  for (; i + W <= n; i += W) a0 = max(a0, V::load(x + i));
  if (i < n) a1 = max(a1, V::load_partial(x + i, n - i, -std::numeric_limits<T>::infinity()));
  return reduce_max(max(max(a0, a1), max(a2, a3)));
}

// sum_i exp(x_i - shift); with Store, also y_i = exp(x_i - shift) (y may alias x).
// NonPositive: shift is the row maximum, so x_i - shift <= 0 (or NaN) and exp may skip its
// overflow clamps; logsumexp shifts by 0 when the maximum is +inf and then passes false.
template <bool Store, bool NonPositive = true, class T>
T row_exp_sum(const T* x, T* y, std::int64_t n, T shift) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V vshift = V::set1(shift);
  V s0 = V::set1(0), s1 = V::set1(0);
  std::int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const V e0 = exp<NonPositive>(sub(V::load(x + i), vshift));
    const V e1 = exp<NonPositive>(sub(V::load(x + i + W), vshift));
    if (Store) {
      e0.store(y + i);
      e1.store(y + i + W);
    }
    s0 = add(s0, e0);
    s1 = add(s1, e1);
  }
  for (; i + W <= n; i += W) {
    const V e = exp<NonPositive>(sub(V::load(x + i), vshift));
    if (Store) e.store(y + i);
    s0 = add(s0, e);
  }
  if (i < n) {
    // Padding lanes hold -inf, whose exp is 0 (unless shift is -inf: the row is NaN anyway).
    const V e =
        exp(sub(V::load_partial(x + i, n - i, -std::numeric_limits<T>::infinity()), vshift));
    if (Store) e.store_partial(y + i, n - i);
    s1 = add(s1, e);
  }
  return reduce_add(add(s0, s1));
}

// y_i = a * x_i + b  (used for the scale pass and for log_softmax's shift).
template <class T>
void row_affine(const T* x, T* y, std::int64_t n, T a, T b) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V va = V::set1(a), vb = V::set1(b);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) fma(va, V::load(x + i), vb).store(y + i);
  if (i < n) fma(va, V::load_partial(x + i, n - i, 0), vb).store_partial(y + i, n - i);
}

// sum_i a_i * b_i (b == nullptr: sum_i a_i), four accumulators.
template <class T>
T row_dot(const T* a, const T* b, std::int64_t n) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V one = V::set1(1);
  auto load_b = [&](std::int64_t i) { return b ? V::load(b + i) : one; };
  V s0 = V::set1(0), s1 = s0, s2 = s0, s3 = s0;
  std::int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    s0 = fma(V::load(a + i), load_b(i), s0);
    s1 = fma(V::load(a + i + W), load_b(i + W), s1);
    s2 = fma(V::load(a + i + 2 * W), load_b(i + 2 * W), s2);
    s3 = fma(V::load(a + i + 3 * W), load_b(i + 3 * W), s3);
  }
  for (; i + W <= n; i += W) s0 = fma(V::load(a + i), load_b(i), s0);
  if (i < n) {
    const V bv = b ? V::load_partial(b + i, n - i, 0) : one;
    s1 = fma(V::load_partial(a + i, n - i, 0), bv, s1);
  }
  return reduce_add(add(add(s0, s1), add(s2, s3)));
}

template <class T>
T finite_or_zero(T m) {
  return std::isfinite(m) ? m : T(0);
}

enum class Op { softmax, log_softmax, softmax_backward, log_softmax_backward };

template <Op op, class T>
void rows_forward(const T* x, T* y, std::int64_t n) {
  const T m = row_max(x, n);
  if (op == Op::softmax) {
    const T s = row_exp_sum<true>(x, y, n, m);
    row_affine(y, y, n, T(1) / s, T(0));
  } else {
    const T s = row_exp_sum<false>(x, y, n, m);
    row_affine(x, y, n, T(1), -(m + std::log(s)));
  }
}

template <Op op, class T>
void rows_backward(const T* y, const T* dy, T* dx, std::int64_t n) {
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
    const V neg_sum = V::set1(-row_dot(dy, static_cast<const T*>(nullptr), n));
    std::int64_t i = 0;  // dx = dy - exp(y) * sum
    for (; i + W <= n; i += W) fma(exp(V::load(y + i)), neg_sum, V::load(dy + i)).store(dx + i);
    if (i < n) {
      const V yv = V::load_partial(y + i, n - i, 0), dyv = V::load_partial(dy + i, n - i, 0);
      fma(exp(yv), neg_sum, dyv).store_partial(dx + i, n - i);
    }
  }
}

// -- strided columns ---------------------------------------------------------------------------

// A group of `count` <= width adjacent columns starting at p; loads pad the rest with `fill`.
template <class T>
Vec<T> load_cols(const T* p, std::int64_t count, T fill) {
  return count == Vec<T>::width ? Vec<T>::load(p) : Vec<T>::load_partial(p, count, fill);
}
template <class T>
void store_cols(Vec<T> v, T* p, std::int64_t count) {
  if (count == Vec<T>::width) {
    v.store(p);
  } else {
    v.store_partial(p, count);
  }
}

// f applied lane by lane through memory (only once per column group, never in an inner loop).
template <class T, class F>
Vec<T> per_lane(Vec<T> v, const F& f) {
  T lanes[Vec<T>::width];
  v.store(lanes);
  for (T& lane : lanes) lane = f(lane);
  return Vec<T>::load(lanes);
}

// x, y point at column j of one [n][inner] slice; `count` columns; stride `inner` down the axis.
template <Op op, class T>
void cols_forward(const T* x, T* y, std::int64_t n, std::int64_t inner, std::int64_t count) {
  using V = Vec<T>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  V m = V::set1(neg_inf);
  for (std::int64_t i = 0; i < n; ++i) m = max(m, load_cols(x + i * inner, count, neg_inf));
  V s = V::set1(0);
  for (std::int64_t i = 0; i < n; ++i) {
    const V e = exp(sub(load_cols(x + i * inner, count, T(0)), m));
    if (op == Op::softmax) store_cols(e, y + i * inner, count);
    s = add(s, e);
  }
  if (op == Op::softmax) {
    const V inv = div(V::set1(1), s);
    for (std::int64_t i = 0; i < n; ++i)
      store_cols(mul(load_cols(y + i * inner, count, T(0)), inv), y + i * inner, count);
  } else {
    const V c = add(m, per_lane(s, [](T v) { return std::log(v); }));
    for (std::int64_t i = 0; i < n; ++i)
      store_cols(sub(load_cols(x + i * inner, count, T(0)), c), y + i * inner, count);
  }
}

template <class T>
void cols_logsumexp(const T* x, T* out, std::int64_t n, std::int64_t inner, std::int64_t count) {
  using V = Vec<T>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  V m = V::set1(neg_inf);
  for (std::int64_t i = 0; i < n; ++i) m = max(m, load_cols(x + i * inner, count, neg_inf));
  const V shift = per_lane(m, [](T v) { return finite_or_zero(v); });
  V s = V::set1(0);
  for (std::int64_t i = 0; i < n; ++i)
    s = add(s, exp(sub(load_cols(x + i * inner, count, T(0)), shift)));
  store_cols(add(shift, per_lane(s, [](T v) { return std::log(v); })), out, count);
}

template <Op op, class T>
void cols_backward(const T* y, const T* dy, T* dx, std::int64_t n, std::int64_t inner,
                   std::int64_t count) {
  using V = Vec<T>;
  V acc = V::set1(0);
  for (std::int64_t i = 0; i < n; ++i) {
    const V dyv = load_cols(dy + i * inner, count, T(0));
    acc = op == Op::softmax_backward ? fma(load_cols(y + i * inner, count, T(0)), dyv, acc)
                                     : add(acc, dyv);
  }
  for (std::int64_t i = 0; i < n; ++i) {
    const V yv = load_cols(y + i * inner, count, T(0));
    const V dyv = load_cols(dy + i * inner, count, T(0));
    const V r = op == Op::softmax_backward ? mul(yv, sub(dyv, acc)) : sub(dyv, mul(exp(yv), acc));
    store_cols(r, dx + i * inner, count);
  }
}

// -- drivers: split [outer] x column groups over threads -----------------------------------------

// Calls task(o, j, count) for every slice o and column group [j, j + count) (count == 1 and
// j == 0 in the rows layout).
template <class T, class Task>
void for_each_task(AxisLayout s, const Task& task) {
  if (s.outer <= 0 || s.n <= 0 || s.inner <= 0) return;
  constexpr std::int64_t W = Vec<T>::width;
  const std::int64_t groups = s.inner == 1 ? 1 : (s.inner + W - 1) / W;
  parallel_for(s.outer * groups, s.n * (s.inner == 1 ? 1 : W), [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t t = b; t < e; ++t) {
      const std::int64_t o = t / groups, j = (t % groups) * W;
      task(o, j, s.inner == 1 ? 1 : (s.inner - j < W ? s.inner - j : W));
    }
  });
}

template <Op op, class T>
void forward(const T* x, T* y, AxisLayout s) {
  for_each_task<T>(s, [&](std::int64_t o, std::int64_t j, std::int64_t count) {
    const std::int64_t base = o * s.n * s.inner + j;
    if (s.inner == 1) {
      rows_forward<op>(x + base, y + base, s.n);
    } else {
      cols_forward<op>(x + base, y + base, s.n, s.inner, count);
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
      cols_backward<op>(y + base, dy + base, dx + base, s.n, s.inner, count);
    }
  });
}

template <class T>
void logsumexp(const T* x, T* out, AxisLayout s) {
  for_each_task<T>(s, [&](std::int64_t o, std::int64_t j, std::int64_t count) {
    const T* xs = x + o * s.n * s.inner + j;
    if (s.inner == 1) {
      const T m = row_max(xs, s.n);
      T* no_store = nullptr;
      const T sum = std::isfinite(m) ? row_exp_sum<false, true>(xs, no_store, s.n, m)
                                     : row_exp_sum<false, false>(xs, no_store, s.n, T(0));
      out[o] = finite_or_zero(m) + std::log(sum);
    } else {
      cols_logsumexp(xs, out + o * s.inner + j, s.n, s.inner, count);
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
void exp_f32(const float* x, float* y, std::int64_t n) { exp_array(x, y, n); }
void exp_f64(const double* x, double* y, std::int64_t n) { exp_array(x, y, n); }

MLMATH_ISA_END
