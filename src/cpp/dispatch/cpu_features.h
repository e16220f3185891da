// What the CPU and the operating system support, read once (x86-64: cpuid and xgetbv).
#pragma once

namespace mlmath {

struct CpuFeatures {
  bool avx2_fma = false;  // AVX2 + FMA + F16C, and the OS saves YMM state
  bool avx512f = false;   // AVX-512F (+ AVX2/FMA), and the OS saves ZMM and opmask state
  bool neon = false;      // AArch64 Advanced SIMD: part of the base architecture, always there
};

const CpuFeatures& cpu_features();

}  // namespace mlmath
