// Building blocks for kernels that work along one axis of an array seen as [outer][n][inner]
// (softmax, cross-entropy): reductions over a contiguous row, blocks of adjacent columns walked
// down a strided axis, and the split of that work over threads.
//
// Rows and blocks are read as storage type S (float, double, bf16, f16) and computed in
// T = compute_t<S> (Note [16-bit storage] in half.h); a row written by a helper may have its own
// storage type D (a 16-bit kernel writes intermediate values to a float scratch row, so its
// output is rounded only once).
//
// Everything here has internal linkage (anonymous namespace) so that each per-ISA kernel source
// gets its own copy; see Note [inline functions across ISAs] in isa.h.
#pragma once

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

template <class S, class T = compute_t<S>>
T row_max(const S* x, std::int64_t n) {
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

// The row's maximum m, and whether every x_i - m lies in exp_normal_range's domain (vmath.h):
// then row_exp_sum may skip exp's per-vector range test.  The minimum is taken as min(x_i, lo),
// which keeps lo when x_i is NaN (vector min returns its second operand), so a NaN cannot hide a
// small x_i; a NaN lane itself stays NaN through exp_normal_range.
template <class T>
struct RowMax {
  T max;
  bool normal_range;
};
template <class S, class T = compute_t<S>>
RowMax<T> row_max_range(const S* x, std::int64_t n) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  constexpr T inf = std::numeric_limits<T>::infinity();
  V hi0 = V::set1(-inf), hi1 = hi0, lo0 = V::set1(inf), lo1 = lo0;
  std::int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const V a = V::load(x + i), b = V::load(x + i + W);
    hi0 = max(hi0, a);
    hi1 = max(hi1, b);
    lo0 = min(a, lo0);
    lo1 = min(b, lo1);
  }
  if (i + W <= n) {
    const V a = V::load(x + i);
    hi0 = max(hi0, a);
    lo0 = min(a, lo0);
    i += W;
  }
  if (i < n) {
    hi1 = max(hi1, V::load_partial(x + i, n - i, -inf));
    lo1 = min(V::load_partial(x + i, n - i, inf), lo1);
  }
  const T m = reduce_max(max(hi0, hi1)), lo = -reduce_max(sub(V::set1(0), min(lo0, lo1)));
  return {m, lo - m >= ExpConstants<T>::fast_min};  // false for NaN and infinite m or lo
}

// sum_i exp(x_i - shift) with the exp function `expf`; with Store, also y_i = exp(x_i - shift)
// (y may alias x).  The padding lanes of a partial vector hold -inf and always take the full exp.
template <bool Store, class S, class D, class T, class Exp>
T row_exp_sum_with(const S* x, D* y, std::int64_t n, T shift, Exp expf) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V vshift = V::set1(shift);
  // One accumulator: exp needs most of the 16 AVX2 registers for its constants, and a second
  // accumulator was spilled to the stack, a store-to-load round trip on every iteration.
  V sum = V::set1(0);
  std::int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const V e0 = expf(sub(V::load(x + i), vshift));
    const V e1 = expf(sub(V::load(x + i + W), vshift));
    if (Store) {
      e0.store(y + i);
      e1.store(y + i + W);
    }
    sum = add(sum, add(e0, e1));
  }
  for (; i + W <= n; i += W) {
    const V e = expf(sub(V::load(x + i), vshift));
    if (Store) e.store(y + i);
    sum = add(sum, e);
  }
  if (i < n) {
    // exp(-inf) is 0 (unless shift is -inf: the row is NaN anyway).
    const V e =
        exp(sub(V::load_partial(x + i, n - i, -std::numeric_limits<T>::infinity()), vshift));
    if (Store) e.store_partial(y + i, n - i);
    sum = add(sum, e);
  }
  return reduce_add(sum);
}

// sum_i exp(x_i - shift); with Store, also y_i = exp(x_i - shift) (y may alias x).
// NonPositive: shift is the row maximum, so x_i - shift <= 0 (or NaN) and exp may skip its
// overflow clamps; logsumexp shifts by 0 when the maximum is +inf and then passes false.
// normal_range (row_max_range): every x_i - shift is in exp_normal_range's domain.
template <bool Store, bool NonPositive = true, class S, class D, class T = compute_t<S>>
T row_exp_sum(const S* x, D* y, std::int64_t n, T shift, bool normal_range = false) {
  using V = Vec<T>;
  if (NonPositive && normal_range) {
    return row_exp_sum_with<Store>(x, y, n, shift, [](V v) { return exp_normal_range(v); });
  }
  return row_exp_sum_with<Store>(x, y, n, shift, [](V v) { return exp<NonPositive>(v); });
}

// y_i = a * x_i + b  (softmax's scale pass).
template <class S, class D, class T = compute_t<S>>
void row_affine(const S* x, D* y, std::int64_t n, T a, T b) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V va = V::set1(a), vb = V::set1(b);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) fma(va, V::load(x + i), vb).store(y + i);
  if (i < n) fma(va, V::load_partial(x + i, n - i, 0), vb).store_partial(y + i, n - i);
}

// y_i = (x_i - m) - c, in that order: log_softmax's  (x_i - m) - log s.  Forming m + log s
// first would lose log s next to a large m (x = [1e8, 1e8] gave [0, 0], not -log 2).
template <class S, class D, class T = compute_t<S>>
void row_shift2(const S* x, D* y, std::int64_t n, T m, T c) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V vm = V::set1(m), vc = V::set1(c);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) sub(sub(V::load(x + i), vm), vc).store(y + i);
  if (i < n) sub(sub(V::load_partial(x + i, n - i, 0), vm), vc).store_partial(y + i, n - i);
}

// y_i = value.
template <class D, class T = compute_t<D>>
void row_fill(D* y, std::int64_t n, T value) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V v = V::set1(value);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) v.store(y + i);
  if (i < n) v.store_partial(y + i, n - i);
}

// sum_i a_i * b_i (b == nullptr: sum_i a_i), four accumulators.
template <class S, class T = compute_t<S>>
T row_dot(const S* a, const S* b, std::int64_t n) {
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
  template <class S>
  static Cols load(const S* p, std::int64_t count, T fill) {
    Cols c;
    for (int k = 0; k < NV; ++k) {
      const std::int64_t m = lanes(count, k);
      c.v[k] = m == W ? V::load(p + k * W) : V::load_partial(p + k * W, m, fill);
    }
    return c;
  }
  template <class S>
  void store(S* p, std::int64_t count) const {
    for (int k = 0; k < NV; ++k) {
      const std::int64_t m = lanes(count, k);
      if (m == W) {
        v[k].store(p + k * W);
      } else {
        v[k].store_partial(p + k * W, m);
      }
    }
  }
  // f(v[k]) for every vector k.
  template <class F>
  Cols map(const F& f) const {
    Cols c;
    for (int k = 0; k < NV; ++k) c.v[k] = f(v[k]);
    return c;
  }
  // f(a.v[k], b.v[k]) for every vector k.
  template <class F>
  friend Cols zip(const Cols& a, const Cols& b, const F& f) {
    Cols c;
    for (int k = 0; k < NV; ++k) c.v[k] = f(a.v[k], b.v[k]);
    return c;
  }
  // All lanes to / from an array of NV * width values (for per-lane scalar work).
  void to_array(T* out) const {
    for (int k = 0; k < NV; ++k) v[k].store(out + k * W);
  }
  static Cols from_array(const T* in) {
    Cols c;
    for (int k = 0; k < NV; ++k) c.v[k] = V::load(in + k * W);
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

// Calls f(std::integral_constant<int, NV>) with NV = ceil(count / width), 1 <= NV <= kColVecs
// (T: the storage type; width is its compute type's).
template <class T, class F>
void with_block_vecs(std::int64_t count, const F& f) {
  switch ((count + Vec<compute_t<T>>::width - 1) / Vec<compute_t<T>>::width) {
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

// -- work split --------------------------------------------------------------------------------

// Calls task(o, j, count) for every slice o and column block [j, j + count) (count == 1 and
// j == 0 in the rows layout).
template <class T, class Task>
void for_each_task(AxisLayout s, const Task& task) {
  if (s.outer <= 0 || s.n <= 0 || s.inner <= 0) return;
  const std::int64_t B = s.inner == 1 ? 1 : kColVecs * Vec<compute_t<T>>::width;  // per block
  const std::int64_t blocks = (s.inner + B - 1) / B;
  parallel_for(s.outer * blocks, s.n * B, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t t = b; t < e; ++t) {
      const std::int64_t o = t / blocks, j = (t % blocks) * B;
      task(o, j, s.inner - j < B ? s.inner - j : B);
    }
  });
}

}  // namespace
MLMATH_ISA_END
