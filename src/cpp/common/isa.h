// Per-ISA compilation: every kernel source is compiled once per entry of the CMake ISA table,
// with MLMATH_ISA_NS set to the entry's name (scalar, avx2, avx512 on x86-64; scalar, neon on
// arm64) and exactly one of MLMATH_ISA_SCALAR / MLMATH_ISA_AVX2 / MLMATH_ISA_AVX512 /
// MLMATH_ISA_NEON defined.  Everything such a source defines lives in namespace
// mlmath::MLMATH_ISA_NS, so the copies never collide.
//
// Note [inline functions across ISAs]
// An inline function or template instantiated in two ISA copies with the same mangled name is
// merged by the linker, and the surviving copy may hold AVX-512 instructions that then run on
// the baseline path.  So per-ISA code keeps its helpers inside the ISA namespace (this is why
// vec.h, vmath.h and parallel.h open the namespace themselves) and avoids instantiating
// std:: containers or algorithms on its own types.
#pragma once

#if !defined(MLMATH_ISA_NS)
#error "isa.h is for kernel sources compiled per ISA (MLMATH_ISA_NS must be defined by CMake)"
#endif

#define MLMATH_ISA_BEGIN \
  namespace mlmath {     \
  namespace MLMATH_ISA_NS {
#define MLMATH_ISA_END \
  }                    \
  }
