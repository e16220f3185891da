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
#include <type_traits>
#include <vector>

#include "bindings/array_checks.h"
#include "bindings/without_gil.h"
#include "mlmath/mlmath.h"

namespace mlmath::bindings {

namespace {

using ArrayList = std::vector<py::array>;

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

// The arrays of one step, checked: params writable, all of one storage dtype (float32, float64,
// bfloat16, float16), grads of the params' dtype and shapes; states writable, all of one state
// dtype (the params' for float32/float64 params; float32 or bfloat16 for 16-bit params;
// bfloat16 also for float32 params) or all 8-bit codes (params other than float64: the first
// state int8, the others uint8, each with its float32 block scales in `absmaxes`); masters
// (16-bit params only) float32; all C-contiguous, and no written array overlapping another
// array of the step.  `states` holds 0..3 lists.
struct CheckedStep {
  DType dtype = DType::f32;
  DType state_dtype = DType::f32;
  bool quantised = false;  // 8-bit codes (q8) with block scales
};

// An int8 or uint8 array: the codes of an 8-bit state.
bool is_codes(const py::array& a) {
  return a.dtype().itemsize() == 1 && (a.dtype().kind() == 'i' || a.dtype().kind() == 'u');
}

// Codes of state number `s` (signed for the first state, else unsigned), C-contiguous, of the
// param's shape and writable, and their block scales: float32, C-contiguous, aligned, writable,
// ceil(n / kQuantBlock) of them.
void check_codes(const char* fn, const std::string& name, const py::array& codes,
                 const py::array& absmax, const py::array& param, std::size_t s) {
  const char want = s == 0 ? 'i' : 'u';
  if (!is_codes(codes) || codes.dtype().kind() != want) {
    throw py::type_error(std::string(fn) + ": " + name + " has dtype " +
                         py::str(codes.dtype()).cast<std::string>() + " (expected " +
                         (want == 'i' ? "int8" : "uint8") + " codes, as the step's first state)");
  }
  if (!(codes.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(fn) + ": " + name + " must be C-contiguous");
  }
  require_same_shape(param, codes, fn, name.c_str());
  require_writeable(codes, fn, name.c_str());
  const std::string aname = name + ".absmax";
  require_same_dtype(absmax, DType::f32, fn, aname.c_str());
  const py::ssize_t blocks = (param.size() + kQuantBlock - 1) / kQuantBlock;
  if (absmax.size() != blocks) {
    throw std::invalid_argument(std::string(fn) + ": " + aname + " has " +
                                std::to_string(absmax.size()) + " scales (expected " +
                                std::to_string(blocks) + ", one per block of " +
                                std::to_string(kQuantBlock) + ")");
  }
  require_writeable(absmax, fn, aname.c_str());
}

CheckedStep check_step(const char* fn, const ArrayList& params, const ArrayList& grads,
                       const std::vector<const ArrayList*>& states,
                       const std::vector<const char*>& state_names, const ArrayList* masters,
                       const std::vector<ArrayList>& absmaxes) {
  if (params.size() != grads.size()) {
    throw std::invalid_argument(std::string(fn) + ": got " + std::to_string(grads.size()) +
                                " grads for " + std::to_string(params.size()) + " params");
  }
  CheckedStep out;
  bool state_seen = false;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    const std::string pname = "params" + idx, gname = "grads" + idx;
    const DType dt = float_dtype(params[i], fn, pname.c_str(), true);
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
      const py::array& st = (*states[s])[i];
      if (!state_seen && is_codes(st)) {
        if (dt == DType::f64 || absmaxes.size() != states.size()) {
          throw py::type_error(std::string(fn) + ": " + sname + " holds 8-bit codes, which need " +
                               "float32, bfloat16 or float16 params and block scales");
        }
        out.quantised = true;
        state_seen = true;
      }
      if (out.quantised) {
        if (absmaxes[s].size() != params.size()) {
          throw std::invalid_argument(std::string(fn) + ": the block scales of " + state_names[s] +
                                      " are not one array per param");
        }
        check_codes(fn, sname, st, absmaxes[s][i], params[i], s);
        continue;
      }
      const DType sdt = float_dtype(st, fn, sname.c_str(), true);
      if (!state_seen) {
        const bool ok = sdt == dt || (dt == DType::bf16 && sdt == DType::f32) ||
                        (dt == DType::f16 && (sdt == DType::f32 || sdt == DType::bf16)) ||
                        (dt == DType::f32 && sdt == DType::bf16);
        if (!ok || sdt == DType::f16) {
          throw py::type_error(std::string(fn) + ": " + sname + " has dtype " + dtype_name(sdt) +
                               ", which is not a state dtype for " + dtype_name(dt) + " params");
        }
        out.state_dtype = sdt;
        state_seen = true;
      }
      require_same_dtype(st, out.state_dtype, fn, sname.c_str());
      require_same_shape(params[i], st, fn, sname.c_str());
      require_writeable(st, fn, sname.c_str());
    }
  }
  if (!state_seen) out.state_dtype = out.dtype == DType::f64 ? DType::f64 : DType::f32;
  std::vector<const ArrayList*> written = states;
  if (masters != nullptr) {
    if (out.dtype != DType::bf16 && out.dtype != DType::f16) {
      throw std::invalid_argument(std::string(fn) +
                                  ": master weights are for bfloat16 or float16 params (got " +
                                  dtype_name(out.dtype) + " params)");
    }
    if (masters->size() != params.size()) {
      throw std::invalid_argument(std::string(fn) + ": masters has " +
                                  std::to_string(masters->size()) + " arrays for " +
                                  std::to_string(params.size()) + " params");
    }
    for (std::size_t i = 0; i < params.size(); ++i) {
      const std::string mname = "masters[" + std::to_string(i) + "]";
      require_same_dtype((*masters)[i], DType::f32, fn, mname.c_str());
      require_same_shape(params[i], (*masters)[i], fn, mname.c_str());
      require_writeable((*masters)[i], fn, mname.c_str());
    }
    written.push_back(masters);
  }
  if (out.quantised) {
    for (const ArrayList& a : absmaxes) written.push_back(&a);
  }
  check_disjoint(fn, params, grads, written);
  return out;
}

// The typed tensors of a checked step.  Only now take pointers (mutable_data would throw for
// read-only arrays, but all are checked).
template <class S, class St>
std::vector<OptimTensor<S, St>> step_tensors(const ArrayList& params, const ArrayList& grads,
                                             const std::vector<const ArrayList*>& states,
                                             const ArrayList* masters,
                                             const std::vector<ArrayList>& absmaxes) {
  std::vector<OptimTensor<S, St>> out;
  for (std::size_t i = 0; i < params.size(); ++i) {
    OptimTensor<S, St> t{};
    t.param = static_cast<S*>(const_cast<py::array&>(params[i]).mutable_data());
    t.grad = static_cast<const S*>(grads[i].data());
    St** slots[3] = {&t.state1, &t.state2, &t.state3};
    for (std::size_t s = 0; s < states.size(); ++s) {
      *slots[s] = static_cast<St*>(const_cast<py::array&>((*states[s])[i]).mutable_data());
    }
    if (masters != nullptr) {
      t.master = static_cast<float*>(const_cast<py::array&>((*masters)[i]).mutable_data());
    }
    if constexpr (std::is_same_v<St, q8>) {
      float** scales[3] = {&t.absmax1, &t.absmax2, &t.absmax3};
      for (std::size_t s = 0; s < absmaxes.size(); ++s) {
        *scales[s] = static_cast<float*>(const_cast<py::array&>(absmaxes[s][i]).mutable_data());
      }
    }
    t.n = params[i].size();
    out.push_back(t);
  }
  return out;
}

// Calls fn(S{}, St{}) for the (param, state) storage types of a checked step.
template <class Fn>
void with_step_types(const CheckedStep& st, const Fn& fn) {
  const bool bf16_state = st.state_dtype == DType::bf16;
  if (st.quantised) {
    if (st.dtype == DType::f32) {
      fn(float{}, q8{});
    } else if (st.dtype == DType::bf16) {
      fn(bf16{}, q8{});
    } else {
      fn(f16{}, q8{});
    }
    return;
  }
  switch (st.dtype) {
    case DType::f64:
      fn(double{}, double{});
      break;
    case DType::f32:
      bf16_state ? fn(float{}, bf16{}) : fn(float{}, float{});
      break;
    case DType::bf16:
      bf16_state ? fn(bf16{}, bf16{}) : fn(bf16{}, float{});
      break;
    default:
      bf16_state ? fn(f16{}, bf16{}) : fn(f16{}, float{});
      break;
  }
}

template <class S, class St>
auto sgd_kernel(const KernelTable& k) {
  if constexpr (std::is_same_v<St, q8>) {
    return kernel_for<S>(k.sgd_step_f32_sq8, nullptr, k.sgd_step_bf16_sq8, k.sgd_step_f16_sq8);
  } else if constexpr (std::is_same_v<S, St>) {
    if constexpr (std::is_same_v<S, float>) {
      return k.sgd_step_f32;
    } else if constexpr (std::is_same_v<S, double>) {
      return k.sgd_step_f64;
    } else {
      return k.sgd_step_bf16_sbf16;
    }
  } else if constexpr (std::is_same_v<S, float>) {
    return k.sgd_step_f32_sbf16;
  } else if constexpr (std::is_same_v<S, bf16>) {
    return k.sgd_step_bf16_sf32;
  } else if constexpr (std::is_same_v<St, float>) {
    return k.sgd_step_f16_sf32;
  } else {
    return k.sgd_step_f16_sbf16;
  }
}

template <class S, class St>
auto adam_kernel(const KernelTable& k) {
  if constexpr (std::is_same_v<St, q8>) {
    return kernel_for<S>(k.adam_step_f32_sq8, nullptr, k.adam_step_bf16_sq8, k.adam_step_f16_sq8);
  } else if constexpr (std::is_same_v<S, St>) {
    if constexpr (std::is_same_v<S, float>) {
      return k.adam_step_f32;
    } else if constexpr (std::is_same_v<S, double>) {
      return k.adam_step_f64;
    } else {
      return k.adam_step_bf16_sbf16;
    }
  } else if constexpr (std::is_same_v<S, float>) {
    return k.adam_step_f32_sbf16;
  } else if constexpr (std::is_same_v<S, bf16>) {
    return k.adam_step_bf16_sf32;
  } else if constexpr (std::is_same_v<St, float>) {
    return k.adam_step_f16_sf32;
  } else {
    return k.adam_step_f16_sbf16;
  }
}

// The rounding of a step: stochastic when sr_seed is an integer (Note [stochastic rounding]).
RoundingArgs rounding_args(const py::object& sr_seed, std::int64_t step) {
  RoundingArgs r;
  if (!sr_seed.is_none()) {
    r.stochastic_rounding = true;
    r.seed = sr_seed.cast<std::uint64_t>();
    r.step = step;
  }
  return r;
}

ArrayList optional_list(const py::object& o) {
  return o.is_none() ? ArrayList{} : o.cast<ArrayList>();
}

std::vector<ArrayList> optional_lists(const py::object& o) {
  return o.is_none() ? std::vector<ArrayList>{} : o.cast<std::vector<ArrayList>>();
}

void sgd_step(const ArrayList& params, const ArrayList& grads, const py::object& momentum_buffers,
              double lr, double momentum, double dampening, double weight_decay, bool nesterov,
              bool first_step, double grad_scale, const py::object& masters_obj,
              const py::object& sr_seed, std::int64_t sr_step, const py::object& absmaxes_obj) {
  std::vector<const ArrayList*> states;
  ArrayList bufs;
  if (!momentum_buffers.is_none()) {
    bufs = momentum_buffers.cast<ArrayList>();
    states.push_back(&bufs);
  } else if (momentum != 0) {
    throw std::invalid_argument("sgd_step: momentum != 0 needs momentum buffers");
  }
  const ArrayList masters = optional_list(masters_obj);
  const ArrayList* mp = masters_obj.is_none() ? nullptr : &masters;
  const std::vector<ArrayList> absmaxes = optional_lists(absmaxes_obj);
  const CheckedStep st =
      check_step("sgd_step", params, grads, states, {"momentum_buffer"}, mp, absmaxes);
  const RoundingArgs rounding = rounding_args(sr_seed, sr_step);
  with_step_types(st, [&](auto stag, auto sttag) {
    using S = decltype(stag);
    using St = decltype(sttag);
    using T = optim_math_t<S>;
    const auto tensors = step_tensors<S, St>(params, grads, states, mp, absmaxes);
    SgdArgs<S, St> a{tensors.data(),
                     static_cast<std::int64_t>(tensors.size()),
                     lr,
                     momentum,
                     dampening,
                     weight_decay,
                     nesterov,
                     first_step,
                     static_cast<T>(grad_scale),
                     rounding};
    const auto kernel = sgd_kernel<S, St>(kernels());
    WithoutGil nogil(Interruptible::no);
    kernel(a);
    nogil.finish();
  });
}

void adam_step(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
               const ArrayList& exp_avg_sqs, const py::object& max_exp_avg_sqs, std::int64_t step,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               bool decoupled, double grad_scale, const py::object& masters_obj,
               const py::object& sr_seed, const py::object& absmaxes_obj) {
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
  const ArrayList masters = optional_list(masters_obj);
  const ArrayList* mp = masters_obj.is_none() ? nullptr : &masters;
  const std::vector<ArrayList> absmaxes = optional_lists(absmaxes_obj);
  const CheckedStep st = check_step("adam_step", params, grads, states, names, mp, absmaxes);
  const RoundingArgs rounding = rounding_args(sr_seed, step);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  with_step_types(st, [&](auto stag, auto sttag) {
    using S = decltype(stag);
    using St = decltype(sttag);
    using T = optim_math_t<S>;
    const auto tensors = step_tensors<S, St>(params, grads, states, mp, absmaxes);
    AdamArgs<S, St> a{tensors.data(),
                      static_cast<std::int64_t>(tensors.size()),
                      lr,
                      beta1,
                      beta2,
                      eps,
                      weight_decay,
                      decoupled,
                      amsgrad,
                      static_cast<T>(lr / bc1),
                      static_cast<T>(1.0 / std::sqrt(bc2)),
                      static_cast<T>(grad_scale),
                      rounding};
    const auto kernel = adam_kernel<S, St>(kernels());
    WithoutGil nogil(Interruptible::no);
    kernel(a);
    nogil.finish();
  });
}

// sqrt(sum of squares) of every element of every grad (float32, float64, bfloat16 or float16
// arrays, any mix; 16-bit grads summed in float32), scaled so that huge finite grads give a
// finite norm (Note [scaled norm] in kernels/optim.cpp).
double grad_norm(const ArrayList& grads) {
  std::vector<OptimTensor<float>> f32;
  std::vector<OptimTensor<double>> f64;
  std::vector<OptimTensor<bf16>> b16;
  std::vector<OptimTensor<f16>> h16;
  for (std::size_t i = 0; i < grads.size(); ++i) {
    const std::string name = "grads[" + std::to_string(i) + "]";
    const DType dt = float_dtype(grads[i], "grad_norm", name.c_str(), true);
    with_dtype(dt, [&](auto tag) {
      using S = decltype(tag);
      OptimTensor<S> t{nullptr, static_cast<const S*>(grads[i].data()),
                       nullptr, nullptr,
                       nullptr, grads[i].size()};
      if constexpr (std::is_same_v<S, float>) {
        f32.push_back(t);
      } else if constexpr (std::is_same_v<S, double>) {
        f64.push_back(t);
      } else if constexpr (std::is_same_v<S, bf16>) {
        b16.push_back(t);
      } else {
        h16.push_back(t);
      }
    });
  }
  double a = 0, b = 0, c = 0, d = 0;
  const KernelTable& k = kernels();
  WithoutGil nogil(Interruptible::no);
  k.grad_norm_f32(f32.data(), static_cast<std::int64_t>(f32.size()), &a);
  k.grad_norm_f64(f64.data(), static_cast<std::int64_t>(f64.size()), &b);
  k.grad_norm_bf16(b16.data(), static_cast<std::int64_t>(b16.size()), &c);
  k.grad_norm_f16(h16.data(), static_cast<std::int64_t>(h16.size()), &d);
  nogil.finish();
  if (std::isnan(a) || std::isnan(b) || std::isnan(c) || std::isnan(d)) return a + b + c + d;
  return std::hypot(std::hypot(a, b), std::hypot(c, d));
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
        "masters"_a = py::none(), "sr_seed"_a = py::none(), "sr_step"_a = 0,
        "absmaxes"_a = py::none(),
        "One fused SGD step over lists of arrays, in place (16-bit params: float32 masters "
        "optional; sr_seed: stochastic rounding of bfloat16 stores; absmaxes: the block scales "
        "of int8 momentum buffers, [[float32 array per param]])");
  m.def("adam_step", &adam_step, "params"_a, "grads"_a, "exp_avgs"_a, "exp_avg_sqs"_a,
        "max_exp_avg_sqs"_a, "step"_a, "lr"_a, "beta1"_a, "beta2"_a, "eps"_a, "weight_decay"_a,
        "decoupled"_a, "grad_scale"_a, "masters"_a = py::none(), "sr_seed"_a = py::none(),
        "absmaxes"_a = py::none(),
        "One fused Adam/AdamW step over lists of arrays, in place (16-bit params: float32 "
        "masters optional; sr_seed: stochastic rounding of bfloat16 stores; absmaxes: with "
        "int8 exp_avgs and uint8 exp_avg_sqs (and max_exp_avg_sqs), their block scales, one list "
        "per state of one float32 array per param)");
  m.def("find_overlaps", &find_overlaps_py, "written"_a, "read"_a,
        "(None or (i, j) written arrays sharing memory, read indices overlapping a written one)");
  m.def("grad_norm", &grad_norm, "grads"_a,
        "the global L2 norm of all arrays (fixed order, scaled: no overflow)");
}

}  // namespace mlmath::bindings
