// The thin vector layer: Vec<float> / Vec<double> with the few operations the kernels need.
//
//   Vec<T>::width            lanes per register (1 on the scalar path)
//   load / store             unaligned, full width
//   load_partial(p, n, fill) first n < width lanes from p, the rest = fill (never reads past n)
//   store_partial(p, n)      writes the first n < width lanes only
//   add sub mul div sqrt fma max min  lane-wise; fma(a, b, c) = a*b + c (fused where the ISA has
//   FMA) reduce_add reduce_max    horizontal, in a fixed lane order (results do not vary run to
//   run) round_nearest            to the nearest integer, ties to even pow2i(k)                 2^k
//   for integer-valued k inside the normal exponent range keep_where_nonzero(c, v) v where c != 0
//   (or NaN), else +0 (so 0 * inf terms can be dropped)
//
// Vec<float> also has rsqrt_estimate(a) (1/sqrt(a), relative error < 2^-11, for a > 0),
// abs(a), and
// load_codes<Signed> /
// store_codes<Signed>: width 8-bit codes (q8, read as int8 when Signed, else uint8) widened to
// float lanes, and float lanes holding integers in the code range narrowed back, and
// store_bf16_stochastic(v, p, key, first): width bf16 values rounded stochastically, lane k
// being element first + k of its array (Note [stochastic rounding] in optim.cpp); and for bf16
// arrays taken two vectors at a time (the pair layout: `even` holds elements 0, 2, 4, ... and
// `odd` 1, 3, 5, ..., the two halves of each 32-bit lane, so that widening and narrowing are a
// shift and a mask instead of shuffles): load_bf16_pairs, store_bf16_pairs (nearest even) and
// store_bf16_pairs_stochastic(even, odd, p, counter) (lane j of both: hash32(counter + j));
// with KeepNaN = false, for values known not to be NaN, they skip the NaN repair.  any_nan(a):
// whether a lane of a is NaN.
//
// Vec<float> also loads from and stores to the 16-bit storage types (bf16, f16; Note [16-bit
// storage] in half.h): load / load_partial widen, store / store_partial round to nearest even
// (store_finite: the same for lanes known not to be NaN, without the NaN repair).
// Scalar code uses widen(x) and narrow<S>(v); compute_t<S> is the type a storage type S
// computes in (double for double, float for the rest).
//
// One specialisation per ISA, chosen by the MLMATH_ISA_* symbol of the compilation; adding an ISA
// means one more block here and one entry in the CMake ISA table.  max/min follow the x86
// convention: when an operand is NaN the *second* operand is returned; kernels that care about
// NaN handle it explicitly (see Note [NaN in reductions] in softmax.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/half.h"
#include "common/isa.h"

#if defined(MLMATH_ISA_AVX2) || defined(MLMATH_ISA_AVX512)
#include <immintrin.h>
#elif defined(MLMATH_ISA_NEON)
#include <arm_neon.h>
#endif
#if defined(_MSC_VER) && !defined(__clang__) && (defined(_M_X64) || defined(_M_IX86))
#include <xmmintrin.h>  // _mm_prefetch
#endif

MLMATH_ISA_BEGIN

template <class T>
struct Vec;

// A hint to bring the cache line holding p towards the core for reading soon: a software
// prefetch, for access patterns the hardware prefetchers serve too late (a no-op elsewhere).
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  (void)p;
#endif
}

// Magic constants for round_nearest / pow2i: adding 1.5 * 2^(mantissa bits) to a small number
// puts its integer part into the low mantissa bits (round to nearest even on the way).
template <class T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using Int = std::int32_t;
  static constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23
  static constexpr int mantissa_bits = 23;
  static constexpr int exponent_bias = 127;
};
template <>
struct FloatBits<double> {
  using Int = std::int64_t;
  static constexpr double round_magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int mantissa_bits = 52;
  static constexpr int exponent_bias = 1023;
};

// The type a storage type computes in, and whether it is one of the 16-bit types.
template <class S>
using compute_t = typename ComputeType<S>::type;
template <class S>
constexpr bool is_16bit = std::is_same_v<S, bf16> || std::is_same_v<S, f16>;

// Scalar widening (exact) and narrowing (round to nearest even) between storage and compute.
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(bf16 x) { return bf16_to_float(x); }
#if defined(MLMATH_ISA_SCALAR)
inline float widen(f16 x) { return f16_to_float(x); }
#elif defined(MLMATH_ISA_NEON)
inline float widen(f16 x) {
  return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(x.bits))), 0);
}
#else
inline float widen(f16 x) { return _cvtsh_ss(x.bits); }
#endif
template <class S>
S narrow(compute_t<S> v) {
  if constexpr (std::is_same_v<S, bf16>) {
    return float_to_bf16(v);
  } else if constexpr (std::is_same_v<S, f16>) {
#if defined(MLMATH_ISA_SCALAR)
    return float_to_f16(v);
#elif defined(MLMATH_ISA_NEON)
    return f16{vget_lane_u16(vreinterpret_u16_f16(vcvt_f16_f32(vdupq_n_f32(v))), 0)};
#else
    return f16{static_cast<std::uint16_t>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT))};
#endif
  } else {
    return v;
  }
}

// A 32-bit integer hash with good avalanche (Chris Wellons' "lowbias32": two xorshift-multiply
// rounds and a last xorshift; each output bit flips with probability 0.5 +- 0.002 per flipped
// input bit), the counter-based random bits of stochastic rounding: its high half rounds one
// element and its low half the next.  Each ISA block below has it lane-wise with the same
// constants, so every ISA rounds every value the same way.
constexpr std::uint32_t kHashMul1 = 0x7FEB352Du, kHashMul2 = 0x846CA68Bu;
inline std::uint32_t hash32(std::uint32_t x) {
  x = (x ^ (x >> 16)) * kHashMul1;
  x = (x ^ (x >> 15)) * kHashMul2;
  return x ^ (x >> 16);
}
// The 16 random bits of element i of an array whose key is `key` (i modulo 2^32): the high half
// of hash32((i >> 1) + key) for even i, its low half for odd i.
inline std::uint32_t random16(std::uint32_t key, std::uint32_t i) {
  const std::uint32_t h = hash32((i >> 1) + key);
  return (i & 1u) != 0 ? h & 0xFFFFu : h >> 16;
}
// x rounded to bf16 stochastically with 16 random bits r: (bits(x) + r) >> 16, NaN kept quiet.
inline bf16 bf16_stochastic(float x, std::uint32_t random16) {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return float_to_bf16(x);  // NaN: quiet, sign kept
  return bf16{static_cast<std::uint16_t>((u + random16) >> 16)};
}

#if defined(MLMATH_ISA_SCALAR)
// ---------------------------------------------------------------------------------------------
// Baseline: one lane, plain C++ (the compiler may still vectorise the loops around it).
template <class T>
struct Vec {
  static constexpr int width = 1;
  T v;
  static Vec load(const T* p) { return {*p}; }
  static Vec load_partial(const T*, std::int64_t, T fill) { return {fill}; }  // n is always 0
  static Vec set1(T x) { return {x}; }
  void store(T* p) const { *p = v; }
  void store_partial(T*, std::int64_t) const {}
  // 16-bit storage (Vec<float> only)
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  static Vec load(const S* p) {
    return {widen(*p)};
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  static Vec load_partial(const S*, std::int64_t, T fill) {
    return {fill};
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store(S* p) const {
    *p = narrow<S>(v);
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store_partial(S*, std::int64_t) const {}
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store_finite(S* p) const {
    store(p);
  }
};
template <class T>
inline Vec<T> add(Vec<T> a, Vec<T> b) {
  return {a.v + b.v};
}
template <class T>
inline Vec<T> sub(Vec<T> a, Vec<T> b) {
  return {a.v - b.v};
}
template <class T>
inline Vec<T> mul(Vec<T> a, Vec<T> b) {
  return {a.v * b.v};
}
template <class T>
inline Vec<T> div(Vec<T> a, Vec<T> b) {
  return {a.v / b.v};
}
template <class T>
inline Vec<T> sqrt(Vec<T> a) {
  return {std::sqrt(a.v)};
}
// No FMA on the x86-64 baseline: a separate multiply and add (std::fma would be a libm call).
template <class T>
inline Vec<T> fma(Vec<T> a, Vec<T> b, Vec<T> c) {
  return {a.v * b.v + c.v};
}
template <class T>
inline Vec<T> max(Vec<T> a, Vec<T> b) {
  return {a.v > b.v ? a.v : b.v};
}
template <class T>
inline Vec<T> min(Vec<T> a, Vec<T> b) {
  return {a.v < b.v ? a.v : b.v};
}
template <class T>
inline T reduce_add(Vec<T> a) {
  return a.v;
}
template <class T>
inline T reduce_max(Vec<T> a) {
  return a.v;
}
template <class T>
inline Vec<T> round_nearest(Vec<T> a) {
  const T magic = FloatBits<T>::round_magic;
  return {(a.v + magic) - magic};  // exact for |a| < 2^(mantissa bits - 1)
}
template <class T>
inline Vec<T> keep_where_nonzero(Vec<T> c, Vec<T> v) {
  return {c.v != T(0) ? v.v : T(0)};
}
// Whether a < b in any lane (false where either is NaN).
template <class T>
inline bool any_less(Vec<T> a, Vec<T> b) {
  return a.v < b.v;
}
// max(a, b) that is NaN where either is NaN (torch.maximum, np.maximum); max() above keeps b.
template <class T>
inline Vec<T> max_propagate_nan(Vec<T> a, Vec<T> b) {
  return {a.v != a.v ? a.v : (a.v > b.v ? a.v : b.v)};
}
inline bool any_nan(Vec<float> a) { return a.v != a.v; }
inline Vec<float> abs(Vec<float> a) { return {std::fabs(a.v)}; }
inline Vec<float> rsqrt_estimate(Vec<float> a) { return {1.0f / std::sqrt(a.v)}; }
template <bool Signed>
inline Vec<float> load_codes(const q8* p) {
  return {Signed ? static_cast<float>(static_cast<std::int8_t>(p->bits))
                 : static_cast<float>(p->bits)};
}
template <bool Signed>
inline void store_codes(Vec<float> v, q8* p) {
  const int code = static_cast<int>(v.v);  // already an integer in range
  p->bits = static_cast<std::uint8_t>(Signed ? static_cast<std::int8_t>(code) : code);
}
inline void store_bf16_stochastic(Vec<float> v, bf16* p, std::uint32_t key, std::uint32_t first) {
  *p = bf16_stochastic(v.v, random16(key, first));
}
inline void load_bf16_pairs(const bf16* p, Vec<float>& even, Vec<float>& odd) {
  even = {widen(p[0])};
  odd = {widen(p[1])};
}
template <bool KeepNaN = true>  // the scalar path always keeps NaN (it is one compare)
inline void store_bf16_pairs(Vec<float> even, Vec<float> odd, bf16* p) {
  p[0] = narrow<bf16>(even.v);
  p[1] = narrow<bf16>(odd.v);
}
template <bool KeepNaN = true>
inline void store_bf16_pairs_stochastic(Vec<float> even, Vec<float> odd, bf16* p,
                                        std::uint32_t counter) {
  const std::uint32_t h = hash32(counter);
  p[0] = bf16_stochastic(even.v, h >> 16);
  p[1] = bf16_stochastic(odd.v, h & 0xFFFFu);
}
template <class T>
inline Vec<T> pow2i(Vec<T> k) {
  using B = FloatBits<T>;
  const T biased = k.v + (B::round_magic + B::exponent_bias);
  // Unsigned: the shift pushes the magic's high bits out of the word, which overflows (UB) in
  // the signed type before C++20; the bits that stay are the same.
  using U = std::make_unsigned_t<typename B::Int>;
  U bits;
  std::memcpy(&bits, &biased, sizeof bits);
  bits = static_cast<U>(bits << B::mantissa_bits);
  T out;
  std::memcpy(&out, &bits, sizeof out);
  return {out};
}

#elif defined(MLMATH_ISA_AVX2)
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: 8 floats / 4 doubles.
inline __m256i tail_mask_i32(std::int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i tail_mask_i64(std::int64_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}

// 8 x 16-bit <-> 8 floats: bf16 is the high half of a float (a shift); f16 through F16C.
inline __m256 widen8(__m128i h, bf16*) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 widen8(__m128i h, f16*) { return _mm256_cvtph_ps(h); }
// The rounded bf16 bits r of v (in the low halves of the lanes), with v's quiet NaN (sign kept)
// where v is NaN, packed to 8 x 16 bits: the NaN repair of every bf16 rounding.
inline __m128i pack_bf16_keep_nan(__m256 v, __m256i r) {
  const __m256i quiet_nan =
      _mm256_or_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, quiet_nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline __m128i narrow8(__m256 v, bf16*) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return pack_bf16_keep_nan(
      v,
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16));
}
inline __m128i narrow8(__m256 v, f16*) {
  return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// narrow8 for lanes known not to be NaN: the nearest-even rounding without the NaN repair.
inline __m128i narrow8_finite(__m256 v, bf16*) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline __m128i narrow8_finite(__m256 v, f16* tag) { return narrow8(v, tag); }

template <>
struct Vec<float> {
  static constexpr int width = 8;
  __m256 v;
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load_partial(const float* p, std::int64_t n, float fill) {
    const __m256i m = tail_mask_i32(n);
    return {
        _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m))};
  }
  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store_partial(float* p, std::int64_t n) const {
    _mm256_maskstore_ps(p, tail_mask_i32(n), v);
  }
  // 16-bit storage; partial accesses go through a small buffer (never past n elements).
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  static Vec load(const S* p) {
    return {widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), static_cast<S*>(nullptr))};
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  static Vec load_partial(const S* p, std::int64_t n, float fill) {
    alignas(16) S buf[8] = {};
    std::memcpy(buf, p, sizeof(S) * static_cast<std::size_t>(n));
    return {
        _mm256_blendv_ps(_mm256_set1_ps(fill), load(buf).v, _mm256_castsi256_ps(tail_mask_i32(n)))};
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store(S* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow8(v, static_cast<S*>(nullptr)));
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store_partial(S* p, std::int64_t n) const {
    alignas(16) S buf[8];
    store(buf);
    std::memcpy(p, buf, sizeof(S) * static_cast<std::size_t>(n));
  }
  // store() for values known not to be NaN (a few instructions fewer for bf16).
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store_finite(S* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow8_finite(v, static_cast<S*>(nullptr)));
  }
};
template <>
struct Vec<double> {
  static constexpr int width = 4;
  __m256d v;
  static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static Vec load_partial(const double* p, std::int64_t n, double fill) {
    const __m256i m = tail_mask_i64(n);
    return {
        _mm256_blendv_pd(_mm256_set1_pd(fill), _mm256_maskload_pd(p, m), _mm256_castsi256_pd(m))};
  }
  static Vec set1(double x) { return {_mm256_set1_pd(x)}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  void store_partial(double* p, std::int64_t n) const {
    _mm256_maskstore_pd(p, tail_mask_i64(n), v);
  }
};
using VF = Vec<float>;
using VD = Vec<double>;
inline VF add(VF a, VF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VD add(VD a, VD b) { return {_mm256_add_pd(a.v, b.v)}; }
inline VF sub(VF a, VF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VD sub(VD a, VD b) { return {_mm256_sub_pd(a.v, b.v)}; }
inline VF mul(VF a, VF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VD mul(VD a, VD b) { return {_mm256_mul_pd(a.v, b.v)}; }
inline VF div(VF a, VF b) { return {_mm256_div_ps(a.v, b.v)}; }
inline VD div(VD a, VD b) { return {_mm256_div_pd(a.v, b.v)}; }
inline VF sqrt(VF a) { return {_mm256_sqrt_ps(a.v)}; }
inline VD sqrt(VD a) { return {_mm256_sqrt_pd(a.v)}; }
inline VF fma(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VD fma(VD a, VD b, VD c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
inline VF max(VF a, VF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline VD max(VD a, VD b) { return {_mm256_max_pd(a.v, b.v)}; }
inline VF min(VF a, VF b) { return {_mm256_min_ps(a.v, b.v)}; }
inline VD min(VD a, VD b) { return {_mm256_min_pd(a.v, b.v)}; }
inline float reduce_add(VF a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline double reduce_add(VD a) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a.v), _mm256_extractf128_pd(a.v, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}
inline float reduce_max(VF a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline double reduce_max(VD a) {
  __m128d s = _mm_max_pd(_mm256_castpd256_pd128(a.v), _mm256_extractf128_pd(a.v, 1));
  s = _mm_max_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}
inline VF round_nearest(VF a) {
  return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline VD round_nearest(VD a) {
  return {_mm256_round_pd(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline VF keep_where_nonzero(VF c, VF v) {
  return {_mm256_and_ps(_mm256_cmp_ps(c.v, _mm256_setzero_ps(), _CMP_NEQ_UQ), v.v)};
}
inline VD keep_where_nonzero(VD c, VD v) {
  return {_mm256_and_pd(_mm256_cmp_pd(c.v, _mm256_setzero_pd(), _CMP_NEQ_UQ), v.v)};
}
inline bool any_less(VF a, VF b) {
  return _mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)) != 0;
}
inline bool any_less(VD a, VD b) {
  return _mm256_movemask_pd(_mm256_cmp_pd(a.v, b.v, _CMP_LT_OQ)) != 0;
}
// maxps gives b where either is NaN; a where a is NaN is put back
inline VF max_propagate_nan(VF a, VF b) {
  return {_mm256_blendv_ps(_mm256_max_ps(a.v, b.v), a.v, _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q))};
}
inline VD max_propagate_nan(VD a, VD b) {
  return {_mm256_blendv_pd(_mm256_max_pd(a.v, b.v), a.v, _mm256_cmp_pd(a.v, a.v, _CMP_UNORD_Q))};
}
inline bool any_nan(VF a) { return _mm256_movemask_ps(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)) != 0; }
inline VF rsqrt_estimate(VF a) { return {_mm256_rsqrt_ps(a.v)}; }  // 2^-11.4
inline VF abs(VF a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
template <bool Signed>
inline VF load_codes(const q8* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(Signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes))};
}
template <bool Signed>
inline void store_codes(VF v, q8* p) {
  const __m256i i = _mm256_cvtps_epi32(v.v);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  const __m128i b = Signed ? _mm_packs_epi16(w, w) : _mm_packus_epi16(w, w);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), b);
}
inline __m256i hash32(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kHashMul1)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kHashMul2)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
// bits(v) + r, whose high halves are v rounded to bf16 (r: the rounding's addend below 2^16);
// where v is NaN, its bits with the quiet bit set and nothing added: its quiet NaN, sign kept.
template <bool KeepNaN = true>
inline __m256i bf16_round_bits(__m256 v, __m256i r) {
  if constexpr (!KeepNaN) return _mm256_add_epi32(_mm256_castps_si256(v), r);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i u = _mm256_castps_si256(v);
  return _mm256_add_epi32(_mm256_or_si256(u, _mm256_and_si256(nan, _mm256_set1_epi32(0x00400000))),
                          _mm256_andnot_si256(nan, r));
}
template <bool KeepNaN = true>
inline __m256i bf16_nearest_even_bits(__m256 v) {
  const __m256i odd =
      _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(1));
  return bf16_round_bits<KeepNaN>(v, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
}
inline void store_bf16_stochastic(VF v, bf16* p, std::uint32_t key, std::uint32_t first) {
  const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i h = hash32(
      _mm256_add_epi32(_mm256_srli_epi32(index, 1), _mm256_set1_epi32(static_cast<int>(key))));
  const __m256i r = _mm256_castps_si256(  // odd elements (bit 0 moved to the sign): the low half
      _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_srli_epi32(h, 16)),
                       _mm256_castsi256_ps(_mm256_and_si256(h, _mm256_set1_epi32(0xFFFF))),
                       _mm256_castsi256_ps(_mm256_slli_epi32(index, 31))));
  const __m256i bits = _mm256_srli_epi32(bf16_round_bits(v.v, r), 16);
  _mm_storeu_si128(
      reinterpret_cast<__m128i*>(p),
      _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}
inline void load_bf16_pairs(const bf16* p, VF& even, VF& odd) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = {_mm256_castsi256_ps(_mm256_slli_epi32(x, 16))};
  odd = {
      _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}
// The high halves of even_bits and odd_bits, interleaved back into 16 bf16 values.
inline void store_bf16_halves(__m256i even_bits, __m256i odd_bits, bf16* p) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  _mm256_storeu_si256(
      reinterpret_cast<__m256i*>(p),
      _mm256_or_si256(_mm256_srli_epi32(even_bits, 16), _mm256_and_si256(odd_bits, high)));
}
template <bool KeepNaN = true>
inline void store_bf16_pairs(VF even, VF odd, bf16* p) {
  store_bf16_halves(bf16_nearest_even_bits<KeepNaN>(even.v), bf16_nearest_even_bits<KeepNaN>(odd.v),
                    p);
}
template <bool KeepNaN = true>
inline void store_bf16_pairs_stochastic(VF even, VF odd, bf16* p, std::uint32_t counter) {
  const __m256i h = hash32(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(counter)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  store_bf16_halves(bf16_round_bits<KeepNaN>(even.v, _mm256_srli_epi32(h, 16)),
                    bf16_round_bits<KeepNaN>(odd.v, _mm256_and_si256(h, _mm256_set1_epi32(0xFFFF))),
                    p);
}
inline VF pow2i(VF k) {
  const __m256 biased = _mm256_add_ps(k.v, _mm256_set1_ps(12582912.0f + 127.0f));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(biased), 23))};
}
inline VD pow2i(VD k) {
  const __m256d biased = _mm256_add_pd(k.v, _mm256_set1_pd(6755399441055744.0 + 1023.0));
  return {_mm256_castsi256_pd(_mm256_slli_epi64(_mm256_castpd_si256(biased), 52))};
}

#elif defined(MLMATH_ISA_AVX512)
// ---------------------------------------------------------------------------------------------
// AVX-512F: 16 floats / 8 doubles; tails use mask registers.
// 16 x 16-bit <-> 16 floats (AVX-512F only: 16-bit masked loads would need AVX-512BW).
inline __m512 widen16(__m256i h, bf16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 widen16(__m256i h, f16*) { return _mm512_cvtph_ps(h); }
// The rounded bf16 bits r of v (in the low halves of the lanes), with v's quiet NaN (sign kept)
// where v is NaN, packed to 16 x 16 bits: the NaN repair of every bf16 rounding.
inline __m256i pack_bf16_keep_nan(__m512 v, __m512i r) {
  const __m512i quiet_nan =
      _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(
      _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet_nan));
}
inline __m256i narrow16(__m512 v, bf16*) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return pack_bf16_keep_nan(
      v,
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16));
}
inline __m256i narrow16(__m512 v, f16*) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

template <>
struct Vec<float> {
  static constexpr int width = 16;
  __m512 v;
  static __mmask16 mask(std::int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load_partial(const float* p, std::int64_t n, float fill) {
    return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask(n), p)};
  }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store_partial(float* p, std::int64_t n) const { _mm512_mask_storeu_ps(p, mask(n), v); }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  static Vec load(const S* p) {
    return {
        widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), static_cast<S*>(nullptr))};
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  static Vec load_partial(const S* p, std::int64_t n, float fill) {
    alignas(32) S buf[16] = {};
    std::memcpy(buf, p, sizeof(S) * static_cast<std::size_t>(n));
    return {_mm512_mask_mov_ps(_mm512_set1_ps(fill), mask(n), load(buf).v)};
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store(S* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow16(v, static_cast<S*>(nullptr)));
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store_partial(S* p, std::int64_t n) const {
    alignas(32) S buf[16];
    store(buf);
    std::memcpy(p, buf, sizeof(S) * static_cast<std::size_t>(n));
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store_finite(S* p) const {
    store(p);
  }
};
template <>
struct Vec<double> {
  static constexpr int width = 8;
  __m512d v;
  static __mmask8 mask(std::int64_t n) { return static_cast<__mmask8>((1u << n) - 1u); }
  static Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static Vec load_partial(const double* p, std::int64_t n, double fill) {
    return {_mm512_mask_loadu_pd(_mm512_set1_pd(fill), mask(n), p)};
  }
  static Vec set1(double x) { return {_mm512_set1_pd(x)}; }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  void store_partial(double* p, std::int64_t n) const { _mm512_mask_storeu_pd(p, mask(n), v); }
};
using VF = Vec<float>;
using VD = Vec<double>;
inline VF add(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VD add(VD a, VD b) { return {_mm512_add_pd(a.v, b.v)}; }
inline VF sub(VF a, VF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VD sub(VD a, VD b) { return {_mm512_sub_pd(a.v, b.v)}; }
inline VF mul(VF a, VF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VD mul(VD a, VD b) { return {_mm512_mul_pd(a.v, b.v)}; }
inline VF div(VF a, VF b) { return {_mm512_div_ps(a.v, b.v)}; }
inline VD div(VD a, VD b) { return {_mm512_div_pd(a.v, b.v)}; }
inline VF sqrt(VF a) { return {_mm512_sqrt_ps(a.v)}; }
inline VD sqrt(VD a) { return {_mm512_sqrt_pd(a.v)}; }
inline VF fma(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VD fma(VD a, VD b, VD c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
inline VF max(VF a, VF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VD max(VD a, VD b) { return {_mm512_max_pd(a.v, b.v)}; }
inline VF min(VF a, VF b) { return {_mm512_min_ps(a.v, b.v)}; }
inline VD min(VD a, VD b) { return {_mm512_min_pd(a.v, b.v)}; }
// Horizontal reductions: halve to 256 and 128 bits, then finish as on SSE (AVX-512F only; the
// _mm512_reduce_* helpers trip GCC 12's uninitialised-variable warnings).
inline __m256 high_half(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}
inline float reduce_add(VF a) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a.v), high_half(a.v));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(VF a) {
  const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(a.v), high_half(a.v));
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline double reduce_add(VD a) {
  const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(a.v), _mm512_extractf64x4_pd(a.v, 1));
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}
inline double reduce_max(VD a) {
  const __m256d h = _mm256_max_pd(_mm512_castpd512_pd256(a.v), _mm512_extractf64x4_pd(a.v, 1));
  __m128d s = _mm_max_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
  s = _mm_max_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}
inline VF round_nearest(VF a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline VD round_nearest(VD a) {
  return {_mm512_roundscale_pd(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline VF keep_where_nonzero(VF c, VF v) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(c.v, _mm512_setzero_ps(), _CMP_NEQ_UQ), v.v)};
}
inline VD keep_where_nonzero(VD c, VD v) {
  return {_mm512_maskz_mov_pd(_mm512_cmp_pd_mask(c.v, _mm512_setzero_pd(), _CMP_NEQ_UQ), v.v)};
}
inline bool any_less(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ) != 0; }
inline bool any_less(VD a, VD b) { return _mm512_cmp_pd_mask(a.v, b.v, _CMP_LT_OQ) != 0; }
inline VF max_propagate_nan(VF a, VF b) {
  return {
      _mm512_mask_mov_ps(_mm512_max_ps(a.v, b.v), _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), a.v)};
}
inline VD max_propagate_nan(VD a, VD b) {
  return {
      _mm512_mask_mov_pd(_mm512_max_pd(a.v, b.v), _mm512_cmp_pd_mask(a.v, a.v, _CMP_UNORD_Q), a.v)};
}
inline bool any_nan(VF a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q) != 0; }
inline VF rsqrt_estimate(VF a) { return {_mm512_rsqrt14_ps(a.v)}; }  // 2^-14
inline VF abs(VF a) { return {_mm512_abs_ps(a.v)}; }  // AVX-512F (an integer and inside)
template <bool Signed>
inline VF load_codes(const q8* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm512_cvtepi32_ps(Signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes))};
}
template <bool Signed>
inline void store_codes(VF v, q8* p) {
  const __m512i i = _mm512_cvtps_epi32(v.v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   Signed ? _mm512_cvtsepi32_epi8(i) : _mm512_cvtusepi32_epi8(i));
}
inline __m512i hash32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(kHashMul1)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(kHashMul2)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
// bits(v) + r, whose high halves are v rounded to bf16 (r: the rounding's addend below 2^16);
// where v is NaN, its bits with the quiet bit set and nothing added: its quiet NaN, sign kept.
template <bool KeepNaN = true>
inline __m512i bf16_round_bits(__m512 v, __m512i r) {
  if constexpr (!KeepNaN) return _mm512_add_epi32(_mm512_castps_si512(v), r);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i u = _mm512_castps_si512(v);
  return _mm512_add_epi32(_mm512_mask_or_epi32(u, nan, u, _mm512_set1_epi32(0x00400000)),
                          _mm512_maskz_mov_epi32(static_cast<__mmask16>(~nan), r));
}
template <bool KeepNaN = true>
inline __m512i bf16_nearest_even_bits(__m512 v) {
  const __m512i odd =
      _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(1));
  return bf16_round_bits<KeepNaN>(v, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
}
inline __m512i lane_index16() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline void store_bf16_stochastic(VF v, bf16* p, std::uint32_t key, std::uint32_t first) {
  const __m512i index =
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)), lane_index16());
  const __m512i h = hash32(
      _mm512_add_epi32(_mm512_srli_epi32(index, 1), _mm512_set1_epi32(static_cast<int>(key))));
  const __m512i r =  // odd elements: the low half
      _mm512_mask_blend_epi32(_mm512_test_epi32_mask(index, _mm512_set1_epi32(1)),
                              _mm512_srli_epi32(h, 16),
                              _mm512_and_si512(h, _mm512_set1_epi32(0xFFFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_round_bits(v.v, r), 16)));
}
inline void load_bf16_pairs(const bf16* p, VF& even, VF& odd) {
  const __m512i x = _mm512_loadu_si512(p);
  even = {_mm512_castsi512_ps(_mm512_slli_epi32(x, 16))};
  odd = {
      _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}
// The high halves of even_bits and odd_bits, interleaved back into 32 bf16 values.
inline void store_bf16_halves(__m512i even_bits, __m512i odd_bits, bf16* p) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  _mm512_storeu_si512(
      p, _mm512_or_si512(_mm512_srli_epi32(even_bits, 16), _mm512_and_si512(odd_bits, high)));
}
template <bool KeepNaN = true>
inline void store_bf16_pairs(VF even, VF odd, bf16* p) {
  store_bf16_halves(bf16_nearest_even_bits<KeepNaN>(even.v), bf16_nearest_even_bits<KeepNaN>(odd.v),
                    p);
}
template <bool KeepNaN = true>
inline void store_bf16_pairs_stochastic(VF even, VF odd, bf16* p, std::uint32_t counter) {
  const __m512i h =
      hash32(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(counter)), lane_index16()));
  store_bf16_halves(bf16_round_bits<KeepNaN>(even.v, _mm512_srli_epi32(h, 16)),
                    bf16_round_bits<KeepNaN>(odd.v, _mm512_and_si512(h, _mm512_set1_epi32(0xFFFF))),
                    p);
}
inline VF pow2i(VF k) {
  const __m512 biased = _mm512_add_ps(k.v, _mm512_set1_ps(12582912.0f + 127.0f));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(biased), 23))};
}
inline VD pow2i(VD k) {
  const __m512d biased = _mm512_add_pd(k.v, _mm512_set1_pd(6755399441055744.0 + 1023.0));
  return {_mm512_castsi512_pd(_mm512_slli_epi64(_mm512_castpd_si512(biased), 52))};
}

#elif defined(MLMATH_ISA_NEON)
// ---------------------------------------------------------------------------------------------
// AArch64 Advanced SIMD (NEON, part of every arm64 CPU): 4 floats / 2 doubles, fused FMLA.
// NEON has no masked loads or stores: partial accesses go through a small buffer (never past n
// elements), and NEON's own FMAX/FMIN (NaN if either is NaN, +0 > -0) are not used for max/min,
// which follow the x86 convention of the other blocks lane for lane (a compare and a select).
inline float32x4_t max_x86(float32x4_t a, float32x4_t b) {
  return vbslq_f32(vcgtq_f32(a, b), a, b);
}
inline float64x2_t max_x86(float64x2_t a, float64x2_t b) {
  return vbslq_f64(vcgtq_f64(a, b), a, b);
}
inline float32x4_t min_x86(float32x4_t a, float32x4_t b) {
  return vbslq_f32(vcltq_f32(a, b), a, b);
}
inline float64x2_t min_x86(float64x2_t a, float64x2_t b) {
  return vbslq_f64(vcltq_f64(a, b), a, b);
}
// All ones in the lanes below n (0 <= n <= 4).
inline uint32x4_t tail_mask_u32(std::int64_t n) {
  const std::uint32_t lanes[4] = {0, 1, 2, 3};
  return vcltq_u32(vld1q_u32(lanes), vdupq_n_u32(static_cast<std::uint32_t>(n)));
}

// 4 x 16-bit <-> 4 floats: bf16 is the high half of a float (a widening shift); f16 through
// FCVTL / FCVTN, which round to nearest even (the default FPCR mode), give +-inf past 65504,
// keep subnormals (FPCR.FZ is off) and keep a NaN quiet with its sign and top payload bits, as
// F16C and float_to_f16 do.
inline float32x4_t widen4(uint16x4_t h, bf16*) { return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); }
inline float32x4_t widen4(uint16x4_t h, f16*) { return vcvt_f32_f16(vreinterpret_f16_u16(h)); }
// bf16: round to nearest even at bit 16 in integer arithmetic (as float_to_bf16): add 0x7FFF,
// plus 1 when the kept part is odd, and keep the high halves.
inline uint16x4_t narrow4_finite(float32x4_t v, bf16*) {
  const uint32x4_t u = vreinterpretq_u32_f32(v);
  const uint32x4_t odd = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  return vshrn_n_u32(vaddq_u32(u, vaddq_u32(vdupq_n_u32(0x7FFF), odd)), 16);
}
// The rounded bf16 bits r of v, with v's quiet NaN (sign kept) where v is NaN: the NaN repair
// of every bf16 rounding.
inline uint16x4_t bf16_keep_nan(float32x4_t v, uint16x4_t r) {
  const uint16x4_t quiet_nan =
      vorr_u16(vshrn_n_u32(vreinterpretq_u32_f32(v), 16), vdup_n_u16(0x40));
  const uint16x4_t is_nan = vmvn_u16(vmovn_u32(vceqq_f32(v, v)));
  return vbsl_u16(is_nan, quiet_nan, r);
}
inline uint16x4_t narrow4(float32x4_t v, bf16* tag) {
  return bf16_keep_nan(v, narrow4_finite(v, tag));
}
inline uint16x4_t narrow4(float32x4_t v, f16*) { return vreinterpret_u16_f16(vcvt_f16_f32(v)); }
inline uint16x4_t narrow4_finite(float32x4_t v, f16* tag) { return narrow4(v, tag); }

template <>
struct Vec<float> {
  static constexpr int width = 4;
  float32x4_t v;
  static Vec load(const float* p) { return {vld1q_f32(p)}; }
  static Vec load_partial(const float* p, std::int64_t n, float fill) {
    float buf[4] = {fill, fill, fill, fill};
    std::memcpy(buf, p, sizeof(float) * static_cast<std::size_t>(n));
    return {vld1q_f32(buf)};
  }
  static Vec set1(float x) { return {vdupq_n_f32(x)}; }
  void store(float* p) const { vst1q_f32(p, v); }
  void store_partial(float* p, std::int64_t n) const {
    float buf[4];
    vst1q_f32(buf, v);
    std::memcpy(p, buf, sizeof(float) * static_cast<std::size_t>(n));
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  static Vec load(const S* p) {
    return {widen4(vld1_u16(reinterpret_cast<const std::uint16_t*>(p)), static_cast<S*>(nullptr))};
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  static Vec load_partial(const S* p, std::int64_t n, float fill) {
    S buf[4] = {};
    std::memcpy(buf, p, sizeof(S) * static_cast<std::size_t>(n));
    return {vbslq_f32(tail_mask_u32(n), load(buf).v, vdupq_n_f32(fill))};
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store(S* p) const {
    vst1_u16(reinterpret_cast<std::uint16_t*>(p), narrow4(v, static_cast<S*>(nullptr)));
  }
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store_partial(S* p, std::int64_t n) const {
    S buf[4];
    store(buf);
    std::memcpy(p, buf, sizeof(S) * static_cast<std::size_t>(n));
  }
  // store() for values known not to be NaN (a few instructions fewer for bf16).
  template <class S, class = std::enable_if_t<is_16bit<S>>>
  void store_finite(S* p) const {
    vst1_u16(reinterpret_cast<std::uint16_t*>(p), narrow4_finite(v, static_cast<S*>(nullptr)));
  }
};
template <>
struct Vec<double> {
  static constexpr int width = 2;
  float64x2_t v;
  static Vec load(const double* p) { return {vld1q_f64(p)}; }
  static Vec load_partial(const double* p, std::int64_t n, double fill) {
    const float64x2_t f = vdupq_n_f64(fill);
    return {n > 0 ? vld1q_lane_f64(p, f, 0) : f};  // n < 2
  }
  static Vec set1(double x) { return {vdupq_n_f64(x)}; }
  void store(double* p) const { vst1q_f64(p, v); }
  void store_partial(double* p, std::int64_t n) const {
    if (n > 0) vst1q_lane_f64(p, v, 0);
  }
};
using VF = Vec<float>;
using VD = Vec<double>;
inline VF add(VF a, VF b) { return {vaddq_f32(a.v, b.v)}; }
inline VD add(VD a, VD b) { return {vaddq_f64(a.v, b.v)}; }
inline VF sub(VF a, VF b) { return {vsubq_f32(a.v, b.v)}; }
inline VD sub(VD a, VD b) { return {vsubq_f64(a.v, b.v)}; }
inline VF mul(VF a, VF b) { return {vmulq_f32(a.v, b.v)}; }
inline VD mul(VD a, VD b) { return {vmulq_f64(a.v, b.v)}; }
inline VF div(VF a, VF b) { return {vdivq_f32(a.v, b.v)}; }
inline VD div(VD a, VD b) { return {vdivq_f64(a.v, b.v)}; }
inline VF sqrt(VF a) { return {vsqrtq_f32(a.v)}; }
inline VD sqrt(VD a) { return {vsqrtq_f64(a.v)}; }
inline VF fma(VF a, VF b, VF c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
inline VD fma(VD a, VD b, VD c) { return {vfmaq_f64(c.v, a.v, b.v)}; }
inline VF max(VF a, VF b) { return {max_x86(a.v, b.v)}; }
inline VD max(VD a, VD b) { return {max_x86(a.v, b.v)}; }
inline VF min(VF a, VF b) { return {min_x86(a.v, b.v)}; }
inline VD min(VD a, VD b) { return {min_x86(a.v, b.v)}; }
// Horizontal: (l0 + l2, l1 + l3), then the two; the same pairing as the x86 blocks' last steps.
inline float reduce_add(VF a) { return vaddv_f32(vadd_f32(vget_low_f32(a.v), vget_high_f32(a.v))); }
inline double reduce_add(VD a) { return vaddvq_f64(a.v); }
inline float reduce_max(VF a) {
  const float32x2_t lo = vget_low_f32(a.v), hi = vget_high_f32(a.v);
  const float32x2_t s = vbsl_f32(vcgt_f32(lo, hi), lo, hi);
  const float s0 = vget_lane_f32(s, 0), s1 = vget_lane_f32(s, 1);
  return s0 > s1 ? s0 : s1;
}
inline double reduce_max(VD a) {
  const double s0 = vgetq_lane_f64(a.v, 0), s1 = vgetq_lane_f64(a.v, 1);
  return s0 > s1 ? s0 : s1;
}
inline VF round_nearest(VF a) { return {vrndnq_f32(a.v)}; }  // FRINTN: ties to even
inline VD round_nearest(VD a) { return {vrndnq_f64(a.v)}; }
// c == 0 is false for NaN, so a NaN c keeps v (as the x86 _CMP_NEQ_UQ).
inline VF keep_where_nonzero(VF c, VF v) {
  return {vreinterpretq_f32_u32(
      vbicq_u32(vreinterpretq_u32_f32(v.v), vceqq_f32(c.v, vdupq_n_f32(0.0f))))};
}
inline VD keep_where_nonzero(VD c, VD v) {
  return {vreinterpretq_f64_u64(
      vbicq_u64(vreinterpretq_u64_f64(v.v), vceqq_f64(c.v, vdupq_n_f64(0.0))))};
}
inline bool any_less(VF a, VF b) { return vmaxvq_u32(vcltq_f32(a.v, b.v)) != 0; }
inline bool any_less(VD a, VD b) {
  return vmaxvq_u32(vreinterpretq_u32_u64(vcltq_f64(a.v, b.v))) != 0;
}
// max() gives b where either is NaN; a where a is NaN is put back.
inline VF max_propagate_nan(VF a, VF b) {
  return {vbslq_f32(vceqq_f32(a.v, a.v), max_x86(a.v, b.v), a.v)};
}
inline VD max_propagate_nan(VD a, VD b) {
  return {vbslq_f64(vceqq_f64(a.v, a.v), max_x86(a.v, b.v), a.v)};
}
// c + a[L] * b (FMLA by element): the GEMM micro-kernel keeps a column of A in MR / width
// registers instead of MR broadcasts, which leaves room for its accumulators.
template <int L>
inline VF fma_lane(VF a, VF b, VF c) {
  return {vfmaq_laneq_f32(c.v, b.v, a.v, L)};
}
template <int L>
inline VD fma_lane(VD a, VD b, VD c) {
  return {vfmaq_laneq_f64(c.v, b.v, a.v, L)};
}
// FRSQRTE gives 8 bits; one Newton step (FRSQRTS) brings it past the 2^-11 of the contract.
inline bool any_nan(VF a) { return vmaxvq_u32(vmvnq_u32(vceqq_f32(a.v, a.v))) != 0; }
inline VF rsqrt_estimate(VF a) {
  const float32x4_t r = vrsqrteq_f32(a.v);
  return {vmulq_f32(r, vrsqrtsq_f32(vmulq_f32(a.v, r), r))};
}
inline VF abs(VF a) { return {vabsq_f32(a.v)}; }
template <bool Signed>
inline VF load_codes(const q8* p) {
  std::uint32_t word;  // the 4 codes of 4 lanes
  std::memcpy(&word, p, sizeof word);
  const uint8x8_t bytes = vreinterpret_u8_u32(vdup_n_u32(word));
  if constexpr (Signed) {
    const int16x8_t h = vmovl_s8(vreinterpret_s8_u8(bytes));
    return {vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)))};
  } else {
    const uint16x8_t h = vmovl_u8(bytes);
    return {vcvtq_f32_u32(vmovl_u16(vget_low_u16(h)))};
  }
}
template <bool Signed>
inline void store_codes(VF v, q8* p) {
  const int32x4_t i = vcvtnq_s32_f32(v.v);
  uint8x8_t bytes;
  if constexpr (Signed) {
    const int16x4_t h = vqmovn_s32(i);
    bytes = vreinterpret_u8_s8(vqmovn_s16(vcombine_s16(h, h)));
  } else {
    const uint16x4_t h = vqmovun_s32(i);
    bytes = vqmovn_u16(vcombine_u16(h, h));
  }
  const std::uint32_t word = vget_lane_u32(vreinterpret_u32_u8(bytes), 0);
  std::memcpy(p, &word, sizeof word);
}
inline uint32x4_t hash32(uint32x4_t x) {
  x = vmulq_u32(veorq_u32(x, vshrq_n_u32(x, 16)), vdupq_n_u32(kHashMul1));
  x = vmulq_u32(veorq_u32(x, vshrq_n_u32(x, 15)), vdupq_n_u32(kHashMul2));
  return veorq_u32(x, vshrq_n_u32(x, 16));
}
// bits(v) + r, whose high halves are v rounded to bf16 (r: the rounding's addend below 2^16);
// where v is NaN, its bits with the quiet bit set and nothing added: its quiet NaN, sign kept.
template <bool KeepNaN = true>
inline uint32x4_t bf16_round_bits(float32x4_t v, uint32x4_t r) {
  if constexpr (!KeepNaN) return vaddq_u32(vreinterpretq_u32_f32(v), r);
  const uint32x4_t nan = vmvnq_u32(vceqq_f32(v, v));
  const uint32x4_t u = vreinterpretq_u32_f32(v);
  return vaddq_u32(vorrq_u32(u, vandq_u32(nan, vdupq_n_u32(0x00400000))), vbicq_u32(r, nan));
}
template <bool KeepNaN = true>
inline uint32x4_t bf16_nearest_even_bits(float32x4_t v) {
  const uint32x4_t odd = vandq_u32(vshrq_n_u32(vreinterpretq_u32_f32(v), 16), vdupq_n_u32(1));
  return bf16_round_bits<KeepNaN>(v, vaddq_u32(vdupq_n_u32(0x7FFF), odd));
}
inline uint32x4_t lane_index4() {
  const std::uint32_t lanes[4] = {0, 1, 2, 3};
  return vld1q_u32(lanes);
}
inline void store_bf16_stochastic(VF v, bf16* p, std::uint32_t key, std::uint32_t first) {
  const uint32x4_t index = vaddq_u32(vdupq_n_u32(first), lane_index4());
  const uint32x4_t h = hash32(vaddq_u32(vshrq_n_u32(index, 1), vdupq_n_u32(key)));
  const uint32x4_t r = vbslq_u32(vtstq_u32(index, vdupq_n_u32(1)),  // odd elements: the low half
                                 vandq_u32(h, vdupq_n_u32(0xFFFF)), vshrq_n_u32(h, 16));
  vst1_u16(reinterpret_cast<std::uint16_t*>(p), vshrn_n_u32(bf16_round_bits(v.v, r), 16));
}
inline void load_bf16_pairs(const bf16* p, VF& even, VF& odd) {
  const uint32x4_t x = vreinterpretq_u32_u16(vld1q_u16(reinterpret_cast<const std::uint16_t*>(p)));
  even = {vreinterpretq_f32_u32(vshlq_n_u32(x, 16))};
  odd = {vreinterpretq_f32_u32(vandq_u32(x, vdupq_n_u32(0xFFFF0000u)))};
}
// The high halves of even_bits and odd_bits, interleaved back into 8 bf16 values (SRI: shift
// right and insert keeps the high half of odd_bits).
inline void store_bf16_halves(uint32x4_t even_bits, uint32x4_t odd_bits, bf16* p) {
  vst1q_u16(reinterpret_cast<std::uint16_t*>(p),
            vreinterpretq_u16_u32(vsriq_n_u32(odd_bits, even_bits, 16)));
}
template <bool KeepNaN = true>
inline void store_bf16_pairs(VF even, VF odd, bf16* p) {
  store_bf16_halves(bf16_nearest_even_bits<KeepNaN>(even.v), bf16_nearest_even_bits<KeepNaN>(odd.v),
                    p);
}
template <bool KeepNaN = true>
inline void store_bf16_pairs_stochastic(VF even, VF odd, bf16* p, std::uint32_t counter) {
  const uint32x4_t h = hash32(vaddq_u32(vdupq_n_u32(counter), lane_index4()));
  store_bf16_halves(bf16_round_bits<KeepNaN>(even.v, vshrq_n_u32(h, 16)),
                    bf16_round_bits<KeepNaN>(odd.v, vandq_u32(h, vdupq_n_u32(0xFFFF))), p);
}
inline VF pow2i(VF k) {
  const float32x4_t biased = vaddq_f32(k.v, vdupq_n_f32(12582912.0f + 127.0f));
  return {vreinterpretq_f32_u32(vshlq_n_u32(vreinterpretq_u32_f32(biased), 23))};
}
inline VD pow2i(VD k) {
  const float64x2_t biased = vaddq_f64(k.v, vdupq_n_f64(6755399441055744.0 + 1023.0));
  return {vreinterpretq_f64_u64(vshlq_n_u64(vreinterpretq_u64_f64(biased), 52))};
}

#else
#error "no MLMATH_ISA_* symbol defined for this compilation"
#endif

MLMATH_ISA_END
