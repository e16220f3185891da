// Scalar conversions between float32 and the 16-bit storage types (Note [16-bit storage]),
// portable C++ on the bits, for the scalar ISA and the C++ API's to_float / to_bf16 / to_f16.
// The vector ISAs convert whole registers in vec.h (a shift for bf16, F16C for f16).
//
// Note [16-bit storage]
// bf16 and f16 arrays are storage only: kernels widen each value to float32 as they load it,
// compute in float32, and round each result once when they store it, to nearest even (what
// PyTorch, ml_dtypes and F16C do).  Rounding keeps NaN a quiet NaN of the same sign and sends
// values past the largest finite 16-bit value to +-inf: a result overflows exactly where its
// float32 value does not fit (bf16 max 3.39e38, f16 max 65504).
//
// Internal linkage: each translation unit (each ISA copy) keeps its own copy (Note [inline
// functions across ISAs] in isa.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "mlmath/mlmath.h"

namespace mlmath {
namespace {

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16_to_float(bf16 x) { return bits_float(std::uint32_t{x.bits} << 16); }

inline bf16 float_to_bf16(float f) {
  const std::uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {  // NaN: keep the sign and the top payload, set quiet
    return bf16{static_cast<std::uint16_t>((u >> 16) | 0x0040u)};
  }
  // Round to nearest even at bit 16: add 0x7FFF, plus 1 when the kept part is odd.
  return bf16{static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

inline float f16_to_float(f16 x) {
  const std::uint32_t sign = std::uint32_t{x.bits & 0x8000u} << 16;
  const std::uint32_t exponent = (x.bits >> 10) & 0x1Fu, mantissa = x.bits & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float32
    return bits_float(sign | float_bits(static_cast<float>(mantissa) * 0x1p-24f));
  }
  if (exponent == 31) return bits_float(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));         // rebias 15 -> 127
}

inline f16 float_to_f16(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  std::uint32_t h;
  if (a > 0x7F800000u) {
    h = 0x7E00u | ((a >> 13) & 0x3FFu);  // quiet NaN, top payload bits kept
  } else if (a >= 0x477FF000u) {
    h = 0x7C00u;  // inf, or at least 65520 = 65504 + half an ulp: rounds to inf
  } else if (a < 0x38800000u) {
    // Below 2^-14 (the smallest normal f16): in 0.5f + |f| the float32 ulp is 2^-24, the f16
    // subnormal step, so the addition rounds to nearest even and the low bits are the result.
    h = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
  } else {
    // Rebias the exponent (127 -> 15: subtract 112 << 23) and round to nearest even at bit 13.
    h = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  }
  return f16{static_cast<std::uint16_t>(sign | h)};
}

}  // namespace
}  // namespace mlmath
