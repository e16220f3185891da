// Thread count policy (see mlmath.h) and build facts.
#include <atomic>
#include <stdexcept>
#include <string>

#include "mlmath/mlmath.h"
#include "mlmath_build_config.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace mlmath {
namespace {
std::atomic<int> g_num_threads{0};  // 0: not set, follow OpenMP's own setting
// Note [threads and threadpoolctl]
// set_num_threads is global (every Python thread sees it), while OpenMP's setting belongs to
// the thread that made it.  The calling thread remembers what set_num_threads told OpenMP; if
// OpenMP's setting on this thread has changed since (threadpoolctl's threadpool_limits calls
// omp_set_num_threads), that newer setting wins on this thread until it is restored.
thread_local int t_told_openmp = -1;
}  // namespace

int get_num_threads() {
  const int n = g_num_threads.load(std::memory_order_relaxed);
#if defined(_OPENMP)
  const int omp = omp_get_max_threads();
  if (n <= 0 || (t_told_openmp != -1 && omp != t_told_openmp)) return omp;
  return n;
#else
  return n > 0 ? n : 1;
#endif
}

void set_num_threads(int n) {
  if (n < 1) {
    throw std::invalid_argument("set_num_threads: n must be >= 1 (got " + std::to_string(n) + ")");
  }
  g_num_threads.store(n, std::memory_order_relaxed);
#if defined(_OPENMP)
  omp_set_num_threads(n);  // keeps threadpoolctl's view of the runtime in step
  t_told_openmp = n;
#endif
}

bool have_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

int openmp_version() {
#if defined(_OPENMP)
  return _OPENMP;
#else
  return 0;
#endif
}

const char* version() { return MLMATH_VERSION; }
const char* compiler() { return MLMATH_COMPILER; }

}  // namespace mlmath
