// Vector elementary functions on top of vec.h.
//
// exp(x) = 2^n * e^r,  n = round(x / ln 2),  r = x - n ln 2  (|r| <= ln2 / 2)
//   r is computed with a two-part ln 2 (Cody-Waite) so that n * ln2_hi is exact;
//   e^r is a polynomial: Cephes' degree-7 form 1 + r + r^2 P(r) for float (about 1 ulp),
//   the Taylor series to r^13 for double (truncation error < 0.05 ulp on |r| <= ln2/2).
//   2^n is applied as two factors 2^n1 * 2^n2 with n1 clamped to the normal exponent range, so
//   results that are subnormal (x < -87.3 for float) or close to overflow are rounded once and
//   correctly instead of being flushed; x is clamped first so that n stays small.
//   exp(-inf) = 0, exp(+inf) = +inf, exp(NaN) = NaN.
//   For x in [fast_min, 0] (softmax's x - max), exp_normal_range is shorter: n = round(x / ln 2)
//   from one fma with the rounding constant, and 2^n is a normal number (n >= -126), one factor,
//   no clamps (the same polynomial, the same accuracy).  exp<NonPositive> takes it per vector;
//   a row whose whole range fits (row_max_range in axis_ops.h) takes it without the test.
//
// tanh(x) = 1 - 2 / (e^{2x} + 1) (e^{2x} = inf gives 1, 0 gives -1, NaN stays NaN): absolute error
//   a few ulp of 1, which near 0 is a large relative error; float therefore takes tanh's Taylor
//   series to x^11 for |x| <= 1/4 (truncation < 3e-11 relative), blended in without a select:
//   w = round(min(1, 2|x|)) is 0 there and 1 past 3/4, and between them the exp form, which is
//   within 8 ulp of tanh from 1/4 on, is used.  Double keeps the exp form (its absolute error,
//   ~1e-16, is far below any double tolerance of a score).
#pragma once

#include <type_traits>

#include "common/vec.h"

MLMATH_ISA_BEGIN

template <class T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  static constexpr float lo = -104.0f;  // exp(-104) < half the smallest subnormal: rounds to 0
  static constexpr float hi = 88.8f;    // exp(88.8) > FLT_MAX: overflows to inf
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;  // 9 significant bits: n * ln2_hi is exact
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float ln2 = 0.693147180559945309f;  // one-constant reduction (16-bit results)
  static constexpr float n1_min = -126.0f, n1_max = 127.0f;
  static constexpr float fast_min = -87.0f;  // round(-87 log2 e) = -126: 2^n still normal
};
template <>
struct ExpConstants<double> {
  static constexpr double lo = -746.0;
  static constexpr double hi = 709.9;
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93147180369123816490e-01;  // low 32 bits zero
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr double n1_min = -1022.0, n1_max = 1023.0;
  static constexpr double fast_min = -708.0;  // round(-708 log2 e) = -1021
};

// e^r on |r| <= ln2/2 (float): Cephes expf coefficients.
inline Vec<float> exp_reduced(Vec<float> r) {
  using V = Vec<float>;
  V p = V::set1(1.9875691500e-4f);
  p = fma(p, r, V::set1(1.3981999507e-3f));
  p = fma(p, r, V::set1(8.3334519073e-3f));
  p = fma(p, r, V::set1(4.1665795894e-2f));
  p = fma(p, r, V::set1(1.6666665459e-1f));
  p = fma(p, r, V::set1(5.0000001201e-1f));
  return add(fma(p, mul(r, r), r), V::set1(1.0f));
}

// e^r on |r| <= ln2/2 (double): Taylor polynomial sum_{k<=13} r^k / k!, Horner form.
inline Vec<double> exp_reduced(Vec<double> r) {
  using V = Vec<double>;
  V p = V::set1(1.0 / 6227020800.0);  // 1/13!
  p = fma(p, r, V::set1(1.0 / 479001600.0));
  p = fma(p, r, V::set1(1.0 / 39916800.0));
  p = fma(p, r, V::set1(1.0 / 3628800.0));
  p = fma(p, r, V::set1(1.0 / 362880.0));
  p = fma(p, r, V::set1(1.0 / 40320.0));
  p = fma(p, r, V::set1(1.0 / 5040.0));
  p = fma(p, r, V::set1(1.0 / 720.0));
  p = fma(p, r, V::set1(1.0 / 120.0));
  p = fma(p, r, V::set1(1.0 / 24.0));
  p = fma(p, r, V::set1(1.0 / 6.0));
  p = fma(p, r, V::set1(0.5));
  p = fma(p, r, V::set1(1.0));
  return fma(p, r, V::set1(1.0));
}

// exp(x) for lanes in [fast_min, 0] or NaN (softmax's x - max when the row's range allows):
// x + magic rounds x log2 e to an integer once (the magic's ulp is 1), exactly as round_nearest
// would, and 2^n is a normal number, so one factor and no clamps; a NaN lane stays NaN.
template <class T>
inline Vec<T> exp_normal_range(Vec<T> x) {
  using V = Vec<T>;
  using C = ExpConstants<T>;
  const V magic = V::set1(FloatBits<T>::round_magic);
  const V n = sub(fma(x, V::set1(C::log2e), magic), magic);
  V r = fma(n, V::set1(-C::ln2_hi), x);
  r = fma(n, V::set1(-C::ln2_lo), r);
  return mul(exp_reduced(r), pow2i(n));
}

// e^r on |r| <= ln2/2 to a relative error of 2^-23.4: a degree-5 polynomial fitted to minimise
// the relative error (one fma fewer than exp_reduced's, two multiplies fewer), for results that
// are rounded to 16 bits next.
inline Vec<float> exp_reduced_short(Vec<float> r) {
  using V = Vec<float>;
  V p = V::set1(8.290315046906471e-3f);
  p = fma(p, r, V::set1(4.189793020486832e-2f));
  p = fma(p, r, V::set1(1.666763573884964e-1f));
  p = fma(p, r, V::set1(4.999915063381195e-1f));
  p = fma(p, r, V::set1(9.999997019767761e-1f));
  return fma(p, r, V::set1(1.0f));
}

// exp(x) for x in [fast_min, 0] or NaN, for a result rounded to bfloat16 or float16 next (a
// 16-bit softmax row): a one-constant ln 2 reduction (its error |n| (ln2 - float(ln2)) is at
// most 126 * 1.9e-9 = 2.4e-7 relative) and exp_reduced_short.  Relative error below 2^-21,
// measured over [-87, 0]; the rounding that follows is 2^-9 (bf16) or 2^-11 (f16).
inline Vec<float> exp_normal_range_16bit(Vec<float> x) {
  using V = Vec<float>;
  using C = ExpConstants<float>;
  const V magic = V::set1(FloatBits<float>::round_magic);
  const V n = sub(fma(x, V::set1(C::log2e), magic), magic);
  const V r = fma(n, V::set1(-C::ln2), x);
  return mul(exp_reduced_short(r), pow2i(n));
}

// exp(x); with NonPositive, x must be <= 0 or NaN (softmax's x - max): the upper clamps, which
// only guard overflow, are skipped, and a vector whose lanes all lie in the normal range takes
// exp_normal_range.
template <bool NonPositive = false, class T>
inline Vec<T> exp(Vec<T> x) {
  using V = Vec<T>;
  using C = ExpConstants<T>;
  if constexpr (NonPositive) {
    if (!any_less(x, V::set1(C::fast_min))) return exp_normal_range(x);
  }
  // Operand order matters: max/min return their second operand when one is NaN, so a NaN x
  // flows through every step and comes out as NaN without a separate select.
  V xc = max(V::set1(C::lo), x);
  if (!NonPositive) xc = min(V::set1(C::hi), xc);
  const V n = round_nearest(mul(xc, V::set1(C::log2e)));
  V r = fma(n, V::set1(-C::ln2_hi), xc);
  r = fma(n, V::set1(-C::ln2_lo), r);
  V n1 = max(V::set1(C::n1_min), n);
  if (!NonPositive) n1 = min(V::set1(C::n1_max), n1);
  const V n2 = sub(n, n1);
  return mul(mul(exp_reduced(r), pow2i(n1)), pow2i(n2));
}

template <class T>
inline Vec<T> tanh(Vec<T> x) {
  using V = Vec<T>;
  const V one = V::set1(T(1));
  const V by_exp = sub(one, div(V::set1(T(2)), add(exp(add(x, x)), one)));
  if constexpr (std::is_same_v<T, double>) {
    return by_exp;
  } else {
    constexpr float kSeriesEnd = 0.25f;  // the series' range; w below must be 0 on it
    // the series on x clamped to its range (a NaN x passes through min and max)
    const V xs = max(V::set1(-kSeriesEnd), min(V::set1(kSeriesEnd), x));
    const V x2 = mul(xs, xs);
    V p = fma(x2, V::set1(-1382.0f / 155925.0f), V::set1(62.0f / 2835.0f));
    p = fma(x2, p, V::set1(-17.0f / 315.0f));
    p = fma(x2, p, V::set1(2.0f / 15.0f));
    p = fma(x2, p, V::set1(-1.0f / 3.0f));
    const V series = fma(mul(x2, xs), p, xs);
    const V ax = max(x, sub(V::set1(0.0f), x));
    const V w = round_nearest(min(one, add(ax, ax)));
    return fma(w, sub(by_exp, series), series);
  }
}

MLMATH_ISA_END
