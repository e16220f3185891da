// WithoutGil: how every binding releases the GIL around its kernel (Note [kernels without the
// GIL]).
#pragma once

#include <pybind11/pybind11.h>

#include <atomic>
#include <chrono>
#include <optional>
#include <thread>

#if defined(__GLIBCXX__)
#include <cxxabi.h>  // abi::__forced_unwind
#endif

#include "mlmath/mlmath.h"

namespace mlmath::bindings {

namespace py = pybind11;

// Note [kernels without the GIL]
// Every binding releases the GIL around its kernel with WithoutGil (so that other Python
// threads run meanwhile), which takes care of two things pybind11's gil_scoped_release does
// not:
//  * Interpreter exit.  On Python 3.10-3.13 a daemon thread that asks for the GIL once the
//    interpreter is finalizing is ended by pthread_exit, a forced unwind through the frames
//    below.  Through gil_scoped_release's destructor (noexcept) that was std::terminate:
//    "terminate called without an active exception", exit code 134, whenever daemon threads
//    were inside kernels at exit.  Here the GIL is taken back by take_gil (from finish(), or
//    from the destructor when the kernel threw), which catches that unwind where it starts and
//    parks the thread for good instead, as Python 3.14 does with such threads: no unwinding runs
//    through kernel frames, OpenMP regions, or py::object destructors (which would touch reference
//    counts without the GIL).  Python decides whether the thread must go (it knows which thread is
//    finalizing: the main thread may still run kernels from atexit handlers).  Other libcs (musl,
//    macOS) and Windows do not unwind in pthread_exit/_endthreadex, and 3.14 parks the thread
//    itself.
//  * Ctrl-C.  On the main thread (the only one where Python runs signal handlers), the kernel
//    call carries an InterruptCheck (Note [interrupts] in dispatch/threads.cpp) whose poll
//    briefly takes the GIL back and runs PyErr_CheckSignals(); when a handler raised (SIGINT's
//    KeyboardInterrupt), the kernel stops at its next check point and the exception, kept in
//    the thread state, is raised by finish() once the kernel has returned.  Only kernels whose
//    outputs are fresh arrays (or are written to a temporary, see _matmul.py) may be interrupted;
//    kernels that update user memory in place (out=, optimizer steps) pass Interruptible::no.
//  Exceptions from the kernel (std::bad_alloc -> MemoryError, std::invalid_argument ->
//  ValueError) leave through the destructor, which takes the GIL back first; pybind11
//  translates them.

enum class Interruptible { no, yes };

// Never returns: the thread sleeps until the process exits.
[[noreturn]] inline void park_forever() {
  for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
}

// Takes the GIL back for `state`; a thread that Python ends instead is parked for good.
inline void take_gil(PyThreadState* state) {
#if defined(__GLIBCXX__)
  try {
    PyEval_RestoreThread(state);
  } catch (abi::__forced_unwind&) {  // pthread_exit from take_gil: the interpreter is exiting
    park_forever();                  // (never leaves this handler, so nothing is unwound)
  }
#else
  PyEval_RestoreThread(state);
#endif
}

// The main thread's id (threading.main_thread(); after a fork, the forking thread).
inline std::atomic<unsigned long> g_main_thread{0};

inline bool on_main_thread() {
  return PyThread_get_thread_ident() == g_main_thread.load(std::memory_order_relaxed);
}

// Called once at import.
inline void remember_main_thread() {
  g_main_thread =
      py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  py::module_ os = py::module_::import("os");
  if (py::hasattr(os, "register_at_fork")) {
    os.attr("register_at_fork")(py::arg("after_in_child") = py::cpp_function(
                                    [] { g_main_thread = PyThread_get_thread_ident(); }));
  }
}

// InterruptCheck's poll on the main thread: runs Python's signal handlers with the GIL held.
// An exception they raise stays set in the thread state `context` for WithoutGil::finish.
inline bool python_signal_raised(void* context) {
  auto* state = static_cast<PyThreadState*>(context);
  take_gil(state);
  const bool raised = PyErr_CheckSignals() != 0;
  PyEval_SaveThread();  // returns `state` again
  return raised;
}

// Releases the GIL for a kernel call (Note [kernels without the GIL]):
//
//     WithoutGil nogil(Interruptible::yes);  // the GIL is released
//     kt.attention_f32(args);
//     nogil.finish();  // the GIL is back; raises KeyboardInterrupt if a signal handler did
//
// If the kernel throws, the destructor takes the GIL back (take_gil cannot unwind) for
// pybind11 to translate the exception.
class WithoutGil {
 public:
  explicit WithoutGil(Interruptible interruptible)
      : poll_(interruptible == Interruptible::yes && on_main_thread()),
        state_(PyEval_SaveThread()) {
    if (poll_) check_.emplace(&python_signal_raised, state_);
  }
  WithoutGil(const WithoutGil&) = delete;
  WithoutGil& operator=(const WithoutGil&) = delete;

  void finish() {
    const bool interrupted = check_ && check_->interrupted();
    check_.reset();
    take_gil(state_);
    state_ = nullptr;
    if (interrupted) throw py::error_already_set();  // kept in the thread state by the poll
  }

  ~WithoutGil() {
    if (state_ == nullptr) return;
    check_.reset();
    take_gil(state_);
  }

 private:
  bool poll_;
  PyThreadState* state_;
  std::optional<InterruptCheck> check_;
};

}  // namespace mlmath::bindings
