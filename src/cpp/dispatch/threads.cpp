// Thread count policy (see mlmath.h) and build facts.
#include <atomic>
#include <stdexcept>
#include <string>

#include "mlmath/mlmath.h"
#include "mlmath_build_config.h"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(_OPENMP) && (defined(__unix__) || defined(__APPLE__))
#include <pthread.h>
#define MLMATH_HAVE_ATFORK 1
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

// Note [fork]
// GNU libgomp does not survive fork(): the forking thread keeps its pointer to the thread pool
// of its last parallel region, whose workers do not exist in the child, so the child's first
// parallel region waits for them forever (seen with libgomp 12: multiprocessing's "fork" start
// method after any multi-threaded kernel call hangs).  So a child forked from a process that
// has started a thread team (parallel.h calls note_thread_team_started) runs every kernel on its
// calling thread: get_num_threads() returns 1 there, whatever set_num_threads, OMP_NUM_THREADS
// or threadpoolctl say, and so do the children it forks.  Results are unchanged (they never
// depend on the thread count).  Children forked before any multi-threaded kernel call (e.g.
// by a forkserver that only imported the module), and processes started by "spawn" or exec,
// keep their threads.  (A team that another library started in the same libgomp is not
// seen here.)
std::atomic<bool> g_team_started{false};
std::atomic<bool> g_forked_child{false};
#if defined(MLMATH_HAVE_ATFORK)
void mark_forked_child() {
  if (g_team_started.load(std::memory_order_relaxed)) {
    g_forked_child.store(true, std::memory_order_relaxed);
  }
}
// Registered once, when the library is loaded (before any kernel can start a thread team).
const int g_atfork_registered = pthread_atfork(nullptr, nullptr, &mark_forked_child);
#endif
}  // namespace

void note_thread_team_started() {
  if (!g_team_started.load(std::memory_order_relaxed)) {
    g_team_started.store(true, std::memory_order_relaxed);
  }
}

int get_num_threads() {
  if (g_forked_child.load(std::memory_order_relaxed)) return 1;  // Note [fork]
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
