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
//            block of up to 4 vectors of adjacent columns, reduced lane-wise down the axis.
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

// kColVecs vectors side by side: a block of up to kColVecs * width adjacent columns, walked down
// the axis.  Several vectors per row give independent dependency chains and contiguous runs of
// 4 vectors per row for the prefetcher; a block of n rows stays in L2 for the three passes.
constexpr int kColVecs = 4;

// NV vectors holding `count` adjacent columns (the last vector may be partial: NV is
// ceil(count / width)); loads pad the missing lanes with `fill`, stores leave them alone.
template <class T, int NV>
struct Cols {
  using V = Vec<T>;
  static constexpr std::int64_t W = V::width;
  V v[NV];

  static std::int64_t lanes(std::int64_t count, int k) {
    return count - k * W < W ? count - k * W : W;
  }
  static Cols set1(T x) {
    Cols c;
    for (int k = 0; k < NV; ++k) c.v[k] = V::set1(x);
    return c;
  }
  static Cols load(const T* p, std::int64_t count, T fill) {
    Cols c;
    for (int k = 0; k < NV; ++k) {
      const std::int64_t m = lanes(count, k);
      c.v[k] = m == W ? V::load(p + k * W) : V::load_partial(p + k * W, m, fill);
    }
    return c;
  }
  void store(T* p, std::int64_t count) const {
    for (int k = 0; k < NV; ++k) {
      const std::int64_t m = lanes(count, k);
      if (m == W) {
        v[k].store(p + k * W);
      } else {
        v[k].store_partial(p + k * W, m);
      }
    }
  }
  // f(a.v[k], b.v[k]) for every vector k.
  template <class F>
  friend Cols zip(const Cols& a, const Cols& b, const F& f) {
    Cols c;
    for (int k = 0; k < NV; ++k) c.v[k] = f(a.v[k], b.v[k]);
    return c;
  }
  // f applied lane by lane through memory (once per block, never in an inner loop).
  template <class F>
  Cols per_lane(const F& f) const {
    Cols c;
    T lanes_buf[W];
    for (int k = 0; k < NV; ++k) {
      v[k].store(lanes_buf);
      for (T& lane : lanes_buf) lane = f(lane);
      c.v[k] = V::load(lanes_buf);
    }
    return c;
  }
};

template <class T>
T log_of(T v) {
  return std::log(v);
}

constexpr auto vmax = [](auto a, auto b) { return max(a, b); };
constexpr auto vadd = [](auto a, auto b) { return add(a, b); };
constexpr auto vsub = [](auto a, auto b) { return sub(a, b); };
constexpr auto vmul = [](auto a, auto b) { return mul(a, b); };

// Calls f(std::integral_constant<int, NV>) with NV = ceil(count / width), 1 <= NV <= kColVecs.
template <class T, class F>
void with_block_vecs(std::int64_t count, const F& f) {
  switch ((count + Vec<T>::width - 1) / Vec<T>::width) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 3:
      f(std::integral_constant<int, 3>{});
      break;
    default:
      f(std::integral_constant<int, 4>{});
      break;
  }
}

// x, y point at the first column of one block of `count` columns in an [n][inner] slice.
template <int NV, Op op, class T>
void cols_forward(const T* x, T* y, std::int64_t n, std::int64_t inner, std::int64_t count) {
  using C = Cols<T, NV>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  C m = C::set1(neg_inf);
  for (std::int64_t i = 0; i < n; ++i) m = zip(m, C::load(x + i * inner, count, neg_inf), vmax);
  C s = C::set1(0);
  for (std::int64_t i = 0; i < n; ++i) {
    const C e = zip(C::load(x + i * inner, count, T(0)), m,
                    [](Vec<T> a, Vec<T> b) { return exp(sub(a, b)); });
    if (op == Op::softmax) e.store(y + i * inner, count);
    s = zip(s, e, vadd);
  }
  if (op == Op::softmax) {
    const C inv = zip(C::set1(1), s, [](Vec<T> a, Vec<T> b) { return div(a, b); });
    for (std::int64_t i = 0; i < n; ++i)
      zip(C::load(y + i * inner, count, T(0)), inv, vmul).store(y + i * inner, count);
  } else {
    const C c = zip(m, s.per_lane(log_of<T>), vadd);
    for (std::int64_t i = 0; i < n; ++i)
      zip(C::load(x + i * inner, count, T(0)), c, vsub).store(y + i * inner, count);
  }
}

template <int NV, class T>
void cols_logsumexp(const T* x, T* out, std::int64_t n, std::int64_t inner, std::int64_t count) {
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

template <int NV, Op op, class T>
void cols_backward(const T* y, const T* dy, T* dx, std::int64_t n, std::int64_t inner,
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

// -- drivers: split [outer] x column blocks over threads -----------------------------------------

// Calls task(o, j, count) for every slice o and column block [j, j + count) (count == 1 and
// j == 0 in the rows layout).
template <class T, class Task>
void for_each_task(AxisLayout s, const Task& task) {
  if (s.outer <= 0 || s.n <= 0 || s.inner <= 0) return;
  const std::int64_t B = s.inner == 1 ? 1 : kColVecs * Vec<T>::width;  // columns per block
  const std::int64_t blocks = (s.inner + B - 1) / B;
  parallel_for(s.outer * blocks, s.n * B, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t t = b; t < e; ++t) {
      const std::int64_t o = t / blocks, j = (t % blocks) * B;
      task(o, j, s.inner - j < B ? s.inner - j : B);
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
