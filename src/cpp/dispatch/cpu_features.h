// What the CPU and the operating system support, read once with cpuid and xgetbv.
#pragma once

namespace mlmath {

struct CpuFeatures {
  bool avx2_fma = false;  // AVX2 + FMA + F16C, and the OS saves YMM state
  bool avx512f = false;   // AVX-512F (+ AVX2/FMA), and the OS saves ZMM and opmask state
};

const CpuFeatures& cpu_features();

}  // namespace mlmath
