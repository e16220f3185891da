// Thread count policy (see mlmath.h) and build facts.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "mlmath/mlmath.h"
#include "mlmath_build_config.h"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(_OPENMP) && (defined(__unix__) || defined(__APPLE__))
#include <dlfcn.h>
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
// parallel region on that thread waits for them forever (libgomp 12: multiprocessing's "fork"
// start method, or a raw os.fork, after a multi-threaded call hangs the child's next one).
// The pool belongs to the thread, not to a library: PyTorch's wheel and this package both
// link the soname libgomp.so.1, which a process loads once (whichever library comes first), so
// a thread team that PyTorch started (a threaded matmul) breaks our kernels in the child just
// as ours would.
// Nothing tells whether a thread has a pool, so we release it instead: a pthread_atfork
// "prepare" handler calls omp_pause_resource_all (OpenMP 5.0: libgomp joins the calling
// thread's pool and forgets it; the next parallel region in the parent starts a new one, which
// costs a thread start per fork).  The child then starts from no pool and keeps its threads,
// whoever started teams in the parent.  When the pool cannot be released (fork called inside
// a parallel region, or a runtime without omp_pause_resource_all; it is looked up at run time
// so that an older libgomp loaded first by another library still loads this one), the child
// runs every kernel on its calling thread: get_num_threads() returns 1 there, whatever
// set_num_threads, OMP_NUM_THREADS or threadpoolctl say, and so do the children it forks (whose
// parent's pool is the broken one, so nothing may touch it).  Results are unchanged (they
// never depend on the thread count).  Not covered: a process that loads this library only
// after being forked from a parent whose forking thread had a pool (the library was not there
// to release it); any OpenMP team on that thread hangs there, ours as well as PyTorch's.
//
// Two runtimes: a repaired wheel bundles its own renamed copy of libgomp (auditwheel), which
// our extension uses while PyTorch uses the system soname; the process then has two pools per
// thread.  So the handler pauses our own runtime (found through the library that provides
// omp_get_max_threads to us) and the one in the global scope at fork time (PyTorch loads its
// libgomp globally, possibly after us); one call when they are the same library.
std::atomic<bool> g_forked_child{false};  // a child whose libgomp state is not trusted
#if defined(MLMATH_HAVE_ATFORK)
constexpr int kOmpPauseSoft = 1;  // omp_pause_soft (OpenMP 5.0's omp_pause_resource_t)
using PauseAll = int (*)(int);    // omp_pause_resource_all

// omp_pause_resource_all of the libgomp this library itself runs on, or null.
PauseAll own_pause_all() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&omp_get_max_threads), &info) == 0 || !info.dli_fname) {
    return nullptr;
  }
  void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);  // already loaded: no new load
  return lib ? reinterpret_cast<PauseAll>(dlsym(lib, "omp_pause_resource_all")) : nullptr;
}
const PauseAll g_own_pause_all = own_pause_all();

// Set by the prepare handler, read by the child's: both run on the forking thread (whose
// thread-locals the child inherits), so concurrent forks from two threads cannot mix them up.
thread_local bool t_pool_released = false;

void release_pool_before_fork() {
  if (g_forked_child.load(std::memory_order_relaxed) || g_own_pause_all == nullptr) {
    t_pool_released = false;
    return;
  }
  bool released = g_own_pause_all(kOmpPauseSoft) == 0;
  const auto global_pause_all =
      reinterpret_cast<PauseAll>(dlsym(RTLD_DEFAULT, "omp_pause_resource_all"));
  if (global_pause_all != nullptr && global_pause_all != g_own_pause_all) {
    released = global_pause_all(kOmpPauseSoft) == 0 && released;  // e.g. PyTorch's runtime
  }
  t_pool_released = released;
}
void mark_forked_child() {
  if (!t_pool_released) {
    g_forked_child.store(true, std::memory_order_relaxed);
  }
}
// Registered once, when the library is loaded.
const int g_atfork_registered =
    pthread_atfork(&release_pool_before_fork, nullptr, &mark_forked_child);
#endif
}  // namespace

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

// Note [interrupts]
// A long kernel call (attention at L = 32768 takes seconds) can be stopped between blocks of
// work.  An InterruptCheck names a poll function for the kernel calls its thread makes; kernels
// call interrupted() at block boundaries (attention: per query block, and in the backward per
// query block of each key block; the GEMM core: per task; matmul: per batch item; conv: per
// task of the shifted-row and weight-gradient loops, the rest through the GEMM core).  There:
//  * only the thread that created the check polls (in a team it is thread 0, the thread that
//    called the kernel, e.g. the Python thread that released the GIL; worker threads never run
//    the poll), and at most every kInterruptPollInterval, so a call shorter than that never
//    polls and the poll's cost (the Python bindings take the GIL) stays out of the kernels;
//  * once the poll returns true, a flag (atomic) makes interrupted() true on every thread of
//    the call: each skips its remaining blocks, so the call returns soon, with its outputs
//    partly written.  A region with barriers must not lose a thread before a barrier (the
//    others would wait forever): there threads skip to the barrier, and thread 0 decides for
//    the team before the barrier whether all leave after it (gemm_blocked: otherwise each of
//    its many barriers would still be crossed, slow when the cores are oversubscribed).
// parallel_for and parallel_region hand the caller's check to their team threads.
namespace {
constexpr std::chrono::milliseconds kInterruptPollInterval{50};  // Ctrl-C answered within ~0.1 s
thread_local InterruptCheck* t_check = nullptr;  // the check of the call this thread works for

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

InterruptCheck::InterruptCheck(Poll poll, void* context)
    : poll_(poll),
      context_(context),
      owner_(&t_check),  // the address of a thread_local names its thread
      next_poll_ns_(now_ns() + std::chrono::nanoseconds(kInterruptPollInterval).count()),
      previous_(t_check) {
  t_check = this;
}

InterruptCheck::~InterruptCheck() { t_check = previous_; }

InterruptCheck* current_interrupt_check() { return t_check; }
void set_current_interrupt_check(InterruptCheck* check) { t_check = check; }

bool interrupted() {
  InterruptCheck* const c = t_check;
  if (c == nullptr) return false;
  if (c->stop_.load(std::memory_order_relaxed)) return true;
  if (c->owner_ != &t_check) return false;  // a worker thread: never polls
  const std::int64_t now = now_ns();
  if (now < c->next_poll_ns_) return false;
  c->next_poll_ns_ = now + std::chrono::nanoseconds(kInterruptPollInterval).count();
  if (!c->poll_(c->context_)) return false;
  c->stop_.store(true, std::memory_order_relaxed);
  return true;
}

const char* version() { return MLMATH_VERSION; }
const char* compiler() { return MLMATH_COMPILER; }

}  // namespace mlmath
