// The kernel table of one ISA, generated from the list in mlmath/kernels.inc.  Compiled once per
// ISA like every kernel source; dispatch/dispatch.cpp collects the tables.
#include <cstdint>

#include "common/isa.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

#define MLMATH_KERNEL(name, params) void name params;
#include "mlmath/kernels.inc"
#undef MLMATH_KERNEL

KernelTable kernel_table() {
  KernelTable table{};
#define MLMATH_KERNEL(name, params) table.name = &name;
#include "mlmath/kernels.inc"
#undef MLMATH_KERNEL
  return table;
}

MLMATH_ISA_END
