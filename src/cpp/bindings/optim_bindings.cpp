// Bindings of the fused optimizer steps.  The Python layer (python/mlmath_native/optim.py) owns
// hyper-parameter checks, clipping, state and the overlap policy; this layer asserts what memory
// safety needs of every array of the step (dtype, contiguity, writability, sizes, no overlap
// with a written array) before the kernel touches any of them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
};

// Which arrays of a step share memory (Note [overlap policy] in optim.py: the policy and its
// messages live in Python; this is the mechanism, also the binding's own assertion).
struct Overlaps {
  bool written_overlap = false;       // two written arrays share memory: the first pair found,
  std::size_t first = 0, second = 0;  // first < second (indices into `written`)
  std::vector<std::size_t> reads;     // indices of read arrays that share memory with a written one
};

// All arrays are C-contiguous, so each is one byte range [begin, end).  Sorted by begin, a
// written range overlaps an earlier one exactly when it begins before the furthest end so far;
// once they are known to be disjoint, their ends are sorted too, and a binary search finds the
// first written range that ends after a read range begins: they overlap when it begins before the
// read range ends.  O((w + r) log w).
Overlaps find_overlaps(const ArrayList& written, const ArrayList& read) {
  struct Span {
    std::uintptr_t begin, end;
    std::size_t index;
  };
  auto span = [](const py::array& a, std::size_t index) {
    const auto begin = reinterpret_cast<std::uintptr_t>(a.data());
    return Span{begin, begin + static_cast<std::uintptr_t>(a.nbytes()), index};
  };
  std::vector<Span> spans;
  for (std::size_t i = 0; i < written.size(); ++i) {
    if (written[i].nbytes() > 0) spans.push_back(span(written[i], i));
  }
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  Overlaps out;
  std::uintptr_t reach = 0;  // the furthest end so far, and whose it is
  std::size_t holder = 0;
  for (const Span& s : spans) {
    if (s.begin < reach) {
      out.written_overlap = true;
      out.first = std::min(holder, s.index);
      out.second = std::max(holder, s.index);
      return out;
    }
    if (s.end > reach) {
      reach = s.end;
      holder = s.index;
    }
  }
  for (std::size_t j = 0; j < read.size(); ++j) {
    if (read[j].nbytes() == 0) continue;
    const Span r = span(read[j], j);
    const auto it = std::upper_bound(spans.begin(), spans.end(), r.begin,
                                     [](std::uintptr_t v, const Span& s) { return v < s.end; });
    if (it != spans.end() && it->begin < r.end) out.reads.push_back(j);
  }
  return out;
}

// The memory-safety invariant the kernels rely on: no array the step writes (params, state
// buffers) shares a byte with any other array of the step, written or read (grads may overlap
// each other).  Python only calls with such arrays (it refuses or copies the others), so this is
// an assertion with a plain message.
void check_disjoint(const char* fn, const ArrayList& params, const ArrayList& grads,
                    const std::vector<const ArrayList*>& states) {
  ArrayList written = params;
  for (const ArrayList* state : states) written.insert(written.end(), state->begin(), state->end());
  const Overlaps o = find_overlaps(written, grads);
  if (o.written_overlap || !o.reads.empty()) {
    throw std::invalid_argument(std::string(fn) +
                                ": an array the step writes overlaps another array of the step");
  }
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
  check_disjoint(fn, params, grads, states);
  // Only now take pointers (mutable_data would throw for read-only arrays, but all are checked).
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto fill = [&](auto& list, auto tag) {
      using T = decltype(tag);
      OptimTensor<T> t{};
      t.param = static_cast<T*>(const_cast<py::array&>(params[i]).mutable_data());
      t.grad = static_cast<const T*>(grads[i].data());
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

// sqrt(sum of squares) of every element of every grad (float32 or float64 arrays, any mix),
// scaled so that huge finite grads give a finite norm (Note [scaled norm] in kernels/optim.cpp).
double grad_norm(const ArrayList& grads) {
  std::vector<OptimTensor<float>> f32;
  std::vector<OptimTensor<double>> f64;
  for (std::size_t i = 0; i < grads.size(); ++i) {
    const std::string name = "grads[" + std::to_string(i) + "]";
    if (float_dtype(grads[i], "grad_norm", name.c_str()) == DType::f32) {
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
  k.grad_norm_f32(f32.data(), static_cast<std::int64_t>(f32.size()), &a);
  k.grad_norm_f64(f64.data(), static_cast<std::int64_t>(f64.size()), &b);
  nogil.finish();
  if (std::isnan(a) || std::isnan(b)) return a + b;  // NaN (std::hypot(Inf, NaN) is Inf)
  return std::hypot(a, b);
}

// find_overlaps for Python: (None or (first, second), [read indices]).
py::tuple find_overlaps_py(const ArrayList& written, const ArrayList& read) {
  const Overlaps o = find_overlaps(written, read);
  py::object pair = py::none();
  if (o.written_overlap) pair = py::make_tuple(o.first, o.second);
  return py::make_tuple(pair, py::cast(o.reads));
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
  m.def("find_overlaps", &find_overlaps_py, "written"_a, "read"_a,
        "(None or (i, j) written arrays sharing memory, read indices overlapping a written one)");
  m.def("grad_norm", &grad_norm, "grads"_a,
        "the global L2 norm of all arrays (fixed order, scaled: no overflow)");
}

}  // namespace mlmath::bindings
