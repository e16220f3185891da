// The one place kernels meet OpenMP.
//
//   parallel_for(num_tasks, cost_per_task, fn)   calls fn(begin, end) on contiguous task ranges
//
// Tasks are split statically into one contiguous range per thread, so which thread computes
// what never changes a result: a kernel keeps every reduction inside one task, in a fixed order,
// and its output is then bitwise identical for any thread count.  Work below
// kMinParallelWork (in units of "elements touched") runs on the calling thread: starting a team
// costs a few microseconds, more than a small kernel takes.
#pragma once

#include <cstdint>
#include <exception>

#include "common/isa.h"
#include "mlmath/mlmath.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace mlmath {
// A kernel's check point (Note [interrupts] in dispatch/threads.cpp): true once the call's
// InterruptCheck has asked to stop; then every thread skips its remaining blocks (but still
// reaches each barrier).  Cheap: a thread-local read, plus a clock read on the polling thread.
bool interrupted();
InterruptCheck* current_interrupt_check();
void set_current_interrupt_check(InterruptCheck* check);
}  // namespace mlmath

MLMATH_ISA_BEGIN

constexpr std::int64_t kMinParallelWork = std::int64_t{1} << 15;

// Team threads work for the caller's InterruptCheck while in a region (Note [interrupts]).
class WorkFor {
 public:
  explicit WorkFor(InterruptCheck* check) : previous_(::mlmath::current_interrupt_check()) {
    ::mlmath::set_current_interrupt_check(check);
  }
  ~WorkFor() { ::mlmath::set_current_interrupt_check(previous_); }
  WorkFor(const WorkFor&) = delete;
  WorkFor& operator=(const WorkFor&) = delete;

 private:
  InterruptCheck* previous_;
};

// An exception must not leave an OpenMP region (that calls std::terminate): each thread runs
// its share through run(), which keeps the first exception (a std::bad_alloc from a Scratch),
// and the caller rethrows it once the team has joined, as a Python MemoryError.
class FirstException {
 public:
  template <class Fn>
  void run(const Fn& fn) noexcept {
    try {
      fn();
    } catch (...) {
#if defined(_OPENMP)
#pragma omp critical(mlmath_first_exception)
#endif
      if (!error_) error_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
};

template <class Fn>
void parallel_for(std::int64_t num_tasks, std::int64_t cost_per_task, const Fn& fn) {
  if (num_tasks <= 0) return;
  std::int64_t threads = ::mlmath::get_num_threads();
  const std::int64_t work = num_tasks * (cost_per_task > 0 ? cost_per_task : 1);
  if (threads > num_tasks) threads = num_tasks;
  if (threads > work / kMinParallelWork) threads = work / kMinParallelWork;
#if defined(_OPENMP)
  if (threads > 1) {
    InterruptCheck* const check = ::mlmath::current_interrupt_check();
    FirstException first;
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      const WorkFor work_for(check);
      const std::int64_t t = omp_get_thread_num();
      const std::int64_t team = omp_get_num_threads();
      const std::int64_t begin = num_tasks * t / team;
      const std::int64_t end = num_tasks * (t + 1) / team;
      if (begin < end) first.run([&] { fn(begin, end); });
    }
    first.rethrow();
    return;
  }
#endif
  fn(0, num_tasks);
}

// Threads worth using for `work` units of work (at least 1, at most the setting).
inline int threads_for(std::int64_t work) {
  std::int64_t threads = ::mlmath::get_num_threads();
  if (threads > work / kMinParallelWork) threads = work / kMinParallelWork;
  return threads < 1 ? 1 : static_cast<int>(threads);
}

// Runs fn(thread, team) on `threads` threads, for kernels whose phases need barriers in
// between (barrier(team) below); with one thread, fn(0, 1) runs on the caller.  fn may throw
// only before its first barrier (where it allocates): a thread that left early would leave
// the others waiting.
template <class Fn>
void parallel_region(int threads, const Fn& fn) {
#if defined(_OPENMP)
  if (threads > 1) {
    InterruptCheck* const check = ::mlmath::current_interrupt_check();
    FirstException first;
#pragma omp parallel num_threads(threads)
    {
      const WorkFor work_for(check);
      first.run([&] { fn(omp_get_thread_num(), omp_get_num_threads()); });
    }
    first.rethrow();
    return;
  }
#endif
  fn(0, 1);
}

// Waits for the whole team of a parallel_region.  A team of one (which may be running inside
// another parallel region, e.g. a GEMM called per task) must not wait: an orphaned barrier would
// bind to the outer team and deadlock it.
inline void barrier(int team) {
#if defined(_OPENMP)
  if (team > 1) {
#pragma omp barrier
  }
#else
  (void)team;
#endif
}

MLMATH_ISA_END
