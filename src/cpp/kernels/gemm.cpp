// matmul on the packed GEMM core (common/gemm_core.h): strided A and B, batched by offsets.
#include <cstdint>

#include "common/gemm_core.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

namespace {

template <class T>
void gemm(const GemmArgs<T>& g) {
  for (std::int64_t b = 0; b < g.batch; ++b) {
    if (interrupted()) return;  // Note [interrupts] (dispatch/threads.cpp)
    const T* a = g.a + (g.a_offset ? g.a_offset[b] : 0);
    const T* bm = g.b + (g.b_offset ? g.b_offset[b] : 0);
    T* c = g.c + (g.c_offset ? g.c_offset[b] : 0);
    gemm_blocked<T>(
        g.m, g.n, g.k,
        [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
          pack_a_strided(a, g.a_rs, g.a_cs, g.m, i0, mc, k0, kc, dst);
        },
        [&](std::int64_t k0, std::int64_t kc, std::int64_t j0, std::int64_t nc, T* dst) {
          pack_b_strided(bm, g.b_rs, g.b_cs, k0, kc, j0, nc, dst);
        },
        c, g.c_rs, g.accumulate);
  }
}

}  // namespace

void gemm_f32(const GemmArgs<float>& args) { gemm(args); }
void gemm_f64(const GemmArgs<double>& args) { gemm(args); }

MLMATH_ISA_END
