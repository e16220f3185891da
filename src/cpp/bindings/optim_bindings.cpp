// Bindings of the fused optimizer steps.  The Python layer (python/mlmath_native/optim.py) owns
// hyper-parameter checks, clipping and state; this layer checks every array of the step (dtype,
// contiguity, writability, sizes) before the kernel touches any of them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bindings/array_checks.h"
#include "bindings/without_gil.h"
#include "mlmath/mlmath.h"

namespace mlmath::bindings {

namespace {

using ArrayList = std::vector<py::array>;

// The tensors of one step, checked: params/states writable, all float of one dtype,
// C-contiguous, each state the size of its param.  `states` holds 0..3 lists.
struct StepTensors {
  DType dtype = DType::f32;
  std::vector<OptimTensor<float>> f32;
  std::vector<OptimTensor<double>> f64;
  ArrayList grad_copies;  // grads that overlapped a written array, copied (keeps them alive)
};

// No two arrays the step writes (params, state buffers) may share memory: which update would
// win is undefined.  Grads are only read: they may overlap each other, and a grad that overlaps
// a written array (a grad_fn returning x itself) is read from a copy, as NumPy reads an input
// that overlaps its output.  Returns whether such a copy is needed.  All arrays are
// C-contiguous, so each is one byte range [begin, end).  Sorted by begin, a range overlaps an
// earlier one exactly when it begins before the furthest end so far: one sweep keeps the
// furthest-reaching written range and the furthest-reaching range of any kind (O(n log n) per
// step, not n^2).
bool grads_overlap_writes(const char* fn, const ArrayList& params, const ArrayList& grads,
                          const std::vector<const ArrayList*>& states,
                          const std::vector<const char*>& state_names) {
  struct Range {
    std::uintptr_t begin, end;
    bool written;
    std::string name;
  };
  std::vector<Range> ranges;
  auto add = [&](const py::array& a, bool written, const std::string& name) {
    if (a.nbytes() == 0) return;
    const auto begin = reinterpret_cast<std::uintptr_t>(a.data());
    ranges.push_back({begin, begin + static_cast<std::uintptr_t>(a.nbytes()), written, name});
  };
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    add(params[i], true, "params" + idx);
    add(grads[i], false, "grads" + idx);
    for (std::size_t s = 0; s < states.size(); ++s) {
      add((*states[s])[i], true, state_names[s] + idx);
    }
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin; });
  const Range* reach_any = nullptr;      // the range with the furthest end so far
  const Range* reach_written = nullptr;  // the written range with the furthest end so far
  bool grad_overlap = false;
  for (const Range& r : ranges) {
    if (reach_written && r.begin < reach_written->end) {
      if (!r.written) {
        grad_overlap = true;
      } else {
        throw std::invalid_argument(std::string(fn) + ": " + r.name + " shares memory with " +
                                    reach_written->name +
                                    " (arrays the step writes must not overlap)");
      }
    }
    if (r.written && reach_any && r.begin < reach_any->end) {
      if (reach_any->written) {
        throw std::invalid_argument(std::string(fn) + ": " + r.name + " shares memory with " +
                                    reach_any->name + " (arrays the step writes must not overlap)");
      }
      grad_overlap = true;  // r may still overlap another written array: keep sweeping
    }
    if (!reach_any || r.end > reach_any->end) reach_any = &r;
    if (r.written && (!reach_written || r.end > reach_written->end)) reach_written = &r;
  }
  return grad_overlap;
}

StepTensors check_step(const char* fn, const ArrayList& params, const ArrayList& grads,
                       const std::vector<const ArrayList*>& states,
                       const std::vector<const char*>& state_names) {
  if (params.size() != grads.size()) {
    throw std::invalid_argument(std::string(fn) + ": got " + std::to_string(grads.size()) +
                                " grads for " + std::to_string(params.size()) + " params");
  }
  StepTensors out;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    const std::string pname = "params" + idx, gname = "grads" + idx;
    const DType dt = float_dtype(params[i], fn, pname.c_str());
    if (i == 0) out.dtype = dt;
    require_same_dtype(params[i], out.dtype, fn, pname.c_str());
    require_writeable(params[i], fn, pname.c_str());
    require_same_dtype(grads[i], dt, fn, gname.c_str());
    require_same_shape(params[i], grads[i], fn, gname.c_str());
    for (std::size_t s = 0; s < states.size(); ++s) {
      if (states[s]->size() != params.size()) {
        throw std::invalid_argument(std::string(fn) + ": " + state_names[s] + " has " +
                                    std::to_string(states[s]->size()) + " arrays for " +
                                    std::to_string(params.size()) + " params");
      }
      const std::string sname = std::string(state_names[s]) + idx;
      require_same_dtype((*states[s])[i], dt, fn, sname.c_str());
      require_same_shape(params[i], (*states[s])[i], fn, sname.c_str());
      require_writeable((*states[s])[i], fn, sname.c_str());
    }
  }
  const ArrayList* read_grads = &grads;
  if (grads_overlap_writes(fn, params, grads, states, state_names)) {
    for (const py::array& g : grads) {
      py::array copy(g.dtype(), std::vector<py::ssize_t>(g.shape(), g.shape() + g.ndim()));
      if (g.nbytes() > 0) std::memcpy(copy.mutable_data(), g.data(), g.nbytes());
      out.grad_copies.push_back(copy);
    }
    read_grads = &out.grad_copies;
  }
  // Only now take pointers (mutable_data would throw for read-only arrays, but all are checked).
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto fill = [&](auto& list, auto tag) {
      using T = decltype(tag);
      OptimTensor<T> t{};
      t.param = static_cast<T*>(const_cast<py::array&>(params[i]).mutable_data());
      t.grad = static_cast<const T*>((*read_grads)[i].data());
      T** slots[3] = {&t.state1, &t.state2, &t.state3};
      for (std::size_t s = 0; s < states.size(); ++s) {
        *slots[s] = static_cast<T*>(const_cast<py::array&>((*states[s])[i]).mutable_data());
      }
      t.n = params[i].size();
      list.push_back(t);
    };
    if (out.dtype == DType::f32) {
      fill(out.f32, float{});
    } else {
      fill(out.f64, double{});
    }
  }
  return out;
}

void sgd_step(const ArrayList& params, const ArrayList& grads, const py::object& momentum_buffers,
              double lr, double momentum, double dampening, double weight_decay, bool nesterov,
              bool first_step, double grad_scale) {
  std::vector<const ArrayList*> states;
  ArrayList bufs;
  if (!momentum_buffers.is_none()) {
    bufs = momentum_buffers.cast<ArrayList>();
    states.push_back(&bufs);
  } else if (momentum != 0) {
    throw std::invalid_argument("sgd_step: momentum != 0 needs momentum buffers");
  }
  const StepTensors st = check_step("sgd_step", params, grads, states, {"momentum_buffer"});
  auto run = [&](const auto& tensors, auto tag) {
    using T = decltype(tag);
    SgdArgs<T> a{tensors.data(),
                 static_cast<std::int64_t>(tensors.size()),
                 static_cast<T>(lr),
                 static_cast<T>(momentum),
                 static_cast<T>(dampening),
                 static_cast<T>(weight_decay),
                 nesterov,
                 first_step,
                 static_cast<T>(grad_scale)};
    const KernelTable& k = kernels();
    WithoutGil nogil(Interruptible::no);
    if constexpr (sizeof(T) == 4) {
      k.sgd_step_f32(a);
    } else {
      k.sgd_step_f64(a);
    }
    nogil.finish();
  };
  if (st.dtype == DType::f32) {
    run(st.f32, float{});
  } else {
    run(st.f64, double{});
  }
}

void adam_step(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
               const ArrayList& exp_avg_sqs, const py::object& max_exp_avg_sqs, std::int64_t step,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               bool decoupled, double grad_scale) {
  if (step < 1) {
    throw std::invalid_argument("adam_step: step must be >= 1 (got " + std::to_string(step) + ")");
  }
  std::vector<const ArrayList*> states{&exp_avgs, &exp_avg_sqs};
  std::vector<const char*> names{"exp_avg", "exp_avg_sq"};
  ArrayList maxes;
  const bool amsgrad = !max_exp_avg_sqs.is_none();
  if (amsgrad) {
    maxes = max_exp_avg_sqs.cast<ArrayList>();
    states.push_back(&maxes);
    names.push_back("max_exp_avg_sq");
  }
  const StepTensors st = check_step("adam_step", params, grads, states, names);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  auto run = [&](const auto& tensors, auto tag) {
    using T = decltype(tag);
    AdamArgs<T> a{tensors.data(),
                  static_cast<std::int64_t>(tensors.size()),
                  static_cast<T>(lr),
                  static_cast<T>(beta1),
                  static_cast<T>(beta2),
                  static_cast<T>(eps),
                  static_cast<T>(weight_decay),
                  decoupled,
                  amsgrad,
                  static_cast<T>(lr / bc1),
                  static_cast<T>(1.0 / std::sqrt(bc2)),
                  static_cast<T>(grad_scale)};
    const KernelTable& k = kernels();
    WithoutGil nogil(Interruptible::no);
    if constexpr (sizeof(T) == 4) {
      k.adam_step_f32(a);
    } else {
      k.adam_step_f64(a);
    }
    nogil.finish();
  };
  if (st.dtype == DType::f32) {
    run(st.f32, float{});
  } else {
    run(st.f64, double{});
  }
}

// sum of squares of every element of every grad (float32 or float64 arrays, any mix).
double grad_sumsq(const ArrayList& grads) {
  std::vector<OptimTensor<float>> f32;
  std::vector<OptimTensor<double>> f64;
  for (std::size_t i = 0; i < grads.size(); ++i) {
    const std::string name = "grads[" + std::to_string(i) + "]";
    if (float_dtype(grads[i], "grad_sumsq", name.c_str()) == DType::f32) {
      f32.push_back(OptimTensor<float>{nullptr, static_cast<const float*>(grads[i].data()), nullptr,
                                       nullptr, nullptr, grads[i].size()});
    } else {
      f64.push_back(OptimTensor<double>{nullptr, static_cast<const double*>(grads[i].data()),
                                        nullptr, nullptr, nullptr, grads[i].size()});
    }
  }
  double a = 0, b = 0;
  const KernelTable& k = kernels();
  WithoutGil nogil(Interruptible::no);
  k.grad_sumsq_f32(f32.data(), static_cast<std::int64_t>(f32.size()), &a);
  k.grad_sumsq_f64(f64.data(), static_cast<std::int64_t>(f64.size()), &b);
  nogil.finish();
  return a + b;
}

}  // namespace

void bind_optim(py::module_& m) {
  using namespace pybind11::literals;
  m.def("sgd_step", &sgd_step, "params"_a, "grads"_a, "momentum_buffers"_a, "lr"_a, "momentum"_a,
        "dampening"_a, "weight_decay"_a, "nesterov"_a, "first_step"_a, "grad_scale"_a,
        "One fused SGD step over lists of arrays, in place");
  m.def("adam_step", &adam_step, "params"_a, "grads"_a, "exp_avgs"_a, "exp_avg_sqs"_a,
        "max_exp_avg_sqs"_a, "step"_a, "lr"_a, "beta1"_a, "beta2"_a, "eps"_a, "weight_decay"_a,
        "decoupled"_a, "grad_scale"_a, "One fused Adam/AdamW step over lists of arrays, in place");
  m.def("grad_sumsq", &grad_sumsq, "grads"_a, "sum of squares over all arrays (fixed order)");
}

}  // namespace mlmath::bindings
