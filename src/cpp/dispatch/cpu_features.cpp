// cpuid + xgetbv feature detection (x86-64); other architectures report no x86 features.
// AArch64 needs no detection: its only vector ISA here, NEON (Advanced SIMD), is mandatory in
// the base architecture, and no optional extension (SVE, BF16, FP16 arithmetic) is used.
//
// A CPU flag alone is not enough: the OS must also save the wider registers on a context
// switch, which XCR0 (read with xgetbv, valid when CPUID.1:ECX.OSXSAVE is set) tells:
//   bits 1,2 (SSE, AVX state)                 for AVX/AVX2
//   bits 5,6,7 (opmask, ZMM_Hi256, Hi16_ZMM)  for AVX-512
#include "dispatch/cpu_features.h"

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define MLMATH_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

namespace mlmath {
namespace {

#if defined(MLMATH_X86)
void cpuid(std::uint32_t leaf, std::uint32_t subleaf, std::uint32_t regs[4]) {
#if defined(_MSC_VER)
  int r[4];
  __cpuidex(r, static_cast<int>(leaf), static_cast<int>(subleaf));
  for (int i = 0; i < 4; ++i) regs[i] = static_cast<std::uint32_t>(r[i]);
#else
  __cpuid_count(leaf, subleaf, regs[0], regs[1], regs[2], regs[3]);
#endif
}

std::uint64_t read_xcr0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  std::uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<std::uint64_t>(edx) << 32) | eax;
#endif
}

bool bit(std::uint32_t reg, int b) { return (reg >> b) & 1u; }

CpuFeatures detect() {
  CpuFeatures f;
  std::uint32_t r[4];
  cpuid(0, 0, r);
  const std::uint32_t max_leaf = r[0];
  if (max_leaf < 7) return f;
  cpuid(1, 0, r);
  const std::uint32_t ecx1 = r[2];
  const bool osxsave = bit(ecx1, 27), avx = bit(ecx1, 28), fma = bit(ecx1, 12),
             f16c = bit(ecx1, 29);
  if (!osxsave || !avx) return f;
  const std::uint64_t xcr0 = read_xcr0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;
  cpuid(7, 0, r);
  const std::uint32_t ebx7 = r[1];
  const bool avx2 = bit(ebx7, 5), avx512f = bit(ebx7, 16);
  f.avx2_fma = os_ymm && avx2 && fma && f16c;
  f.avx512f = f.avx2_fma && os_zmm && avx512f;
  return f;
}
#elif defined(__aarch64__) || defined(_M_ARM64)
CpuFeatures detect() {
  CpuFeatures f;
  f.neon = true;
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

}  // namespace mlmath
