// Fused multi-tensor optimizer steps, torch.optim's semantics, in place.
//
//   SGD:   d = s g  (s = grad_scale: -1 for maximize, times a clip coefficient)
//          d += wd p                                  (weight_decay != 0)
//          b  = d  on the first step, else  mu b + (1 - dampening) d   (momentum != 0)
//          d  = d + mu b  (nesterov)  or  b
//          p -= lr d
//   Adam:  d = s g;  d += wd p (Adam)  or  p *= 1 - lr wd (AdamW, decoupled)
//          m = beta1 m + (1 - beta1) d,   v = beta2 v + (1 - beta2) d^2,   vmax = max(vmax, v)
//          p -= step_size m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps),
//          step_size = lr / (1 - beta1^t)
//
// Every element's param, grad and state are read once and written once.  All tensors of a step
// are cut into chunks of at most kChunk elements and the chunks of all tensors are split over
// the threads in one parallel region, so a hundred small tensors cost what one large one does.
// Each element depends only on itself, so results do not depend on the number of threads;
// grad_norm adds per-chunk partial sums in chunk order for the same reason.
//
// Note [16-bit optimizer steps]
// Params and grads of type S (bf16, f16) are widened to float32 on load; the state (St: float32
// or bf16) likewise; the update runs in float32 and each stored value is rounded once.  With a
// master copy (OptimTensor::master, float32) the step reads and writes the master and stores it
// rounded to nearest even into the param (the param is not read).  Without one, and for bf16
// state, rounding is to nearest even, or stochastic (Note [stochastic rounding]).
//
// Note [stochastic rounding]
// A float32 value x is rounded to bf16 by adding 16 random bits r to its bit pattern and
// truncating: (bits(x) + r) >> 16.  The low 16 bits f of x are the position of x between its two
// bf16 neighbours (in units of 2^-16 of the gap), and the sum carries into the kept part exactly
// when r >= 2^16 - f: probability f / 2^16, so E[round(x)] = x (unbiased; a carry out of the
// mantissa moves to the next binade, as it should; NaN is kept a quiet NaN).  The bits of
// element i come from a hash of (seed, step, tensor index in the call, which array, i) — no
// shared generator state — so results depend neither on the thread count nor on the chunking.
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/half.h"
#include "common/parallel.h"
#include "common/vec.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

namespace {

constexpr std::int64_t kChunk = std::int64_t{1} << 16;

struct Chunk {
  std::int64_t tensor, begin, end;
};
struct PartialSum {   // a local type, so that std::vector<PartialSum> is this ISA's own code
  double scale, ssq;  // a chunk's sum of squares is scale^2 * ssq (Note [scaled norm])
};

// The chunks of all tensors, in tensor order.
template <class Tensor>
std::vector<Chunk> make_chunks(const Tensor* tensors, std::int64_t count) {
  std::vector<Chunk> chunks;
  for (std::int64_t t = 0; t < count; ++t) {
    for (std::int64_t b = 0; b < tensors[t].n; b += kChunk) {
      chunks.push_back(Chunk{t, b, b + kChunk < tensors[t].n ? b + kChunk : tensors[t].n});
    }
  }
  return chunks;
}

template <class Tensor, class Body>
void for_each_chunk(const Tensor* tensors, std::int64_t count, const Body& body) {
  const std::vector<Chunk> chunks = make_chunks(tensors, count);
  const std::int64_t num = static_cast<std::int64_t>(chunks.size());
  parallel_for(num, kChunk, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) body(i, tensors[chunks[i].tensor], chunks[i]);
  });
}

// Calls f(std::bool_constant<b>) so that flags become compile-time constants of the loop.
template <class F>
void with_flag(bool b, const F& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Runs body(i, count) over [begin, end) in full vectors and one partial tail (count < width).
template <class T, class Body>
void vector_loop(std::int64_t begin, std::int64_t end, const Body& body) {
  constexpr std::int64_t W = Vec<T>::width;
  std::int64_t i = begin;
  for (; i + W <= end; i += W) body(i, W);
  if (i < end) body(i, end - i);
}

// count (<= width) elements of storage type S, widened to the compute type, and back.
template <class S>
Vec<compute_t<S>> load_n(const S* p, std::int64_t count) {
  using V = Vec<compute_t<S>>;
  return count == V::width ? V::load(p) : V::load_partial(p, count, compute_t<S>(0));
}
template <class S>
void store_n(Vec<compute_t<S>> v, S* p, std::int64_t count) {
  if (count == Vec<compute_t<S>>::width) {
    v.store(p);
  } else {
    v.store_partial(p, count);
  }
}

// -- stochastic rounding (Note [stochastic rounding]) ------------------------------------------

inline std::uint64_t mix64(std::uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The key of one array of one tensor of one step: array 0 is the param, 1..3 the states.
inline std::uint64_t rounding_key(const RoundingArgs& r, std::int64_t tensor, int array) {
  std::uint64_t k = mix64(r.seed + 0x9E3779B97F4A7C15ull);
  k = mix64(k ^ static_cast<std::uint64_t>(r.step));
  k = mix64(k ^ (static_cast<std::uint64_t>(tensor) << 2 | static_cast<std::uint64_t>(array)));
  return k;
}

inline bf16 stochastic_bf16(float x, std::uint32_t random16) {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return float_to_bf16(x);  // NaN: quiet, sign kept
  return bf16{static_cast<std::uint16_t>((u + random16) >> 16)};
}

// Where a step stores 16-bit values: the key of that array's stochastic rounding.
struct Rounder {
  std::uint64_t key;
};

// Stores count values of v into p (element index i of its array): with Stochastic, stochastic
// rounding for bf16; else the vector layer's round to nearest even.  A compile-time flag, so
// that the nearest-even path inlines into the step's loop (a runtime branch here kept the whole
// function out of line, with every vector spilled around the call: 2x slower bf16 steps).
template <bool Stochastic, class S>
inline void store_rounded(Vec<compute_t<S>> v, S* p, std::int64_t i, std::int64_t count,
                          const Rounder& r) {
  if constexpr (Stochastic && std::is_same_v<S, bf16>) {
    constexpr int W = Vec<float>::width;
    alignas(64) float buf[W];
    v.store(buf);
    for (std::int64_t k = 0; k < count; ++k) {
      const std::uint64_t h =
          mix64(r.key + static_cast<std::uint64_t>(i + k) * 0x9E3779B97F4A7C15ull);
      p[k] = stochastic_bf16(buf[k], static_cast<std::uint32_t>(h >> 48));
    }
  } else {
    store_n(v, p, count);
  }
}

// -- the steps ----------------------------------------------------------------------------------

template <bool Momentum, bool Nesterov, bool FirstStep, bool WeightDecay, bool Master, bool SR,
          class S, class St>
void sgd_chunk(const SgdArgs<S, St>& a, const OptimTensor<S, St>& t_ref, std::int64_t tensor,
               std::int64_t begin, std::int64_t end) {
  // The array pointers in a local copy: read through the reference they were reloaded after
  // every store (a float store may alias the struct for all the compiler knows): 6 extra loads
  // per vector in the NEON Adam loop.
  const OptimTensor<S, St> t = t_ref;
  using T = compute_t<S>;
  using V = Vec<T>;
  const V scale = V::set1(a.grad_scale), wd = V::set1(a.weight_decay), mu = V::set1(a.momentum),
          damp = V::set1(T(1) - a.dampening), neg_lr = V::set1(-a.lr);
  const Rounder rp{SR ? rounding_key(a.rounding, tensor, 0) : 0},
      r1{SR ? rounding_key(a.rounding, tensor, 1) : 0};
  vector_loop<T>(begin, end, [&](std::int64_t i, std::int64_t n) {
    V p;
    if constexpr (Master) {
      p = load_n(t.master + i, n);
    } else {
      p = load_n(t.param + i, n);
    }
    V d = mul(scale, load_n(t.grad + i, n));
    if (WeightDecay) d = fma(wd, p, d);
    if (Momentum) {
      V b = FirstStep ? d : fma(mu, load_n(t.state1 + i, n), mul(damp, d));
      store_rounded<SR>(b, t.state1 + i, i, n, r1);
      d = Nesterov ? fma(mu, b, d) : b;
    }
    const V q = fma(neg_lr, d, p);
    if constexpr (Master) {
      store_n(q, t.master + i, n);
      store_n(q, t.param + i, n);  // round to nearest even from the master
    } else {
      store_rounded<SR>(q, t.param + i, i, n, rp);
    }
  });
}

template <bool Amsgrad, bool Decoupled, bool WeightDecay, bool Master, bool SR, class S, class St>
void adam_chunk(const AdamArgs<S, St>& a, const OptimTensor<S, St>& t_ref, std::int64_t tensor,
                std::int64_t begin, std::int64_t end) {
  // The array pointers in a local copy: read through the reference they were reloaded after
  // every store (a float store may alias the struct for all the compiler knows): 6 extra loads
  // per vector in the NEON Adam loop.
  const OptimTensor<S, St> t = t_ref;
  using T = compute_t<S>;
  using V = Vec<T>;
  const V scale = V::set1(a.grad_scale), wd = V::set1(a.weight_decay),
          decay = V::set1(T(1) - a.lr * a.weight_decay), b1 = V::set1(a.beta1),
          one_minus_b1 = V::set1(T(1) - a.beta1), b2 = V::set1(a.beta2),
          one_minus_b2 = V::set1(T(1) - a.beta2), eps = V::set1(a.eps),
          inv_c2 = V::set1(a.inv_bias_correction2_sqrt), neg_step = V::set1(-a.step_size);
  Rounder r[4];
  for (int k = 0; k < 4; ++k) r[k] = Rounder{SR ? rounding_key(a.rounding, tensor, k) : 0};
  vector_loop<T>(begin, end, [&](std::int64_t i, std::int64_t n) {
    V p;
    if constexpr (Master) {
      p = load_n(t.master + i, n);
    } else {
      p = load_n(t.param + i, n);
    }
    V d = mul(scale, load_n(t.grad + i, n));
    if (WeightDecay) {
      if (Decoupled) {
        p = mul(p, decay);
      } else {
        d = fma(wd, p, d);
      }
    }
    const V m = fma(b1, load_n(t.state1 + i, n), mul(one_minus_b1, d));
    const V v = fma(b2, load_n(t.state2 + i, n), mul(one_minus_b2, mul(d, d)));
    store_rounded<SR>(m, t.state1 + i, i, n, r[1]);
    store_rounded<SR>(v, t.state2 + i, i, n, r[2]);
    V vv = v;
    if (Amsgrad) {
      vv = max_propagate_nan(load_n(t.state3 + i, n), v);  // NaN stays NaN, as in torch
      store_rounded<SR>(vv, t.state3 + i, i, n, r[3]);
    }
    const V denom = fma(sqrt(vv), inv_c2, eps);
    const V q = fma(neg_step, div(m, denom), p);
    if constexpr (Master) {
      store_n(q, t.master + i, n);
      store_n(q, t.param + i, n);  // round to nearest even from the master
    } else {
      store_rounded<SR>(q, t.param + i, i, n, r[0]);
    }
  });
}

// Whether a step has master weights: all 16-bit tensors of a call have them or none do (the
// binding's rule), so the first tensor tells.
template <class Args>
bool has_master(const Args& a) {
  if constexpr (is_16bit<std::remove_cv_t<std::remove_pointer_t<decltype(a.tensors->param)>>>) {
    return a.count > 0 && a.tensors[0].master != nullptr;
  } else {
    return false;
  }
}

// with_flag for stochastic rounding: only steps that store bf16 instantiate the SR variant.
template <class S, class St, class F>
void with_sr(bool sr, const F& f) {
  if constexpr (std::is_same_v<S, bf16> || std::is_same_v<St, bf16>) {
    with_flag(sr, f);
  } else {
    f(std::false_type{});
  }
}

template <class S, class St>
void sgd_step(const SgdArgs<S, St>& a) {
  using T = compute_t<S>;
  const bool momentum = a.momentum != T(0);
  with_flag(momentum, [&](auto mom) {
    with_flag(momentum && a.nesterov, [&](auto nest) {
      with_flag(momentum && a.first_step, [&](auto first) {
        with_flag(a.weight_decay != T(0), [&](auto decay) {
          with_flag(has_master(a), [&](auto master) {
            with_sr<S, St>(a.rounding.stochastic_rounding, [&](auto sr) {
              if constexpr (!master.value || is_16bit<S>) {
                for_each_chunk(a.tensors, a.count,
                               [&](std::int64_t, const OptimTensor<S, St>& t, Chunk c) {
                                 sgd_chunk<mom.value, nest.value, first.value, decay.value,
                                           master.value, sr.value>(a, t, c.tensor, c.begin, c.end);
                               });
              }
            });
          });
        });
      });
    });
  });
}

template <class S, class St>
void adam_step(const AdamArgs<S, St>& a) {
  using T = compute_t<S>;
  with_flag(a.amsgrad, [&](auto ams) {
    with_flag(a.decoupled, [&](auto decoupled) {
      with_flag(a.weight_decay != T(0), [&](auto decay) {
        with_flag(has_master(a), [&](auto master) {
          with_sr<S, St>(a.rounding.stochastic_rounding, [&](auto sr) {
            if constexpr (!master.value || is_16bit<S>) {
              for_each_chunk(
                  a.tensors, a.count, [&](std::int64_t, const OptimTensor<S, St>& t, Chunk c) {
                    adam_chunk<ams.value, decoupled.value, decay.value, master.value, sr.value>(
                        a, t, c.tensor, c.begin, c.end);
                  });
            }
          });
        });
      });
    });
  });
}

// Note [scaled norm]
// The global norm sqrt(sum g^2) of finite grads is finite (up to sqrt(n) times the largest
// |g|), but the sum of squares overflows once |g| passes ~1e19 (float32 squares) or ~1e154
// (float64), and squares of tiny grads underflow.  As LAPACK's nrm2, each chunk's share is kept
// as  scale^2 * ssq:  the fast pass sums g^2 in the grad's own type (one read, vector lanes) and
// is kept with scale 1 when the sum lies in [kLow, kHigh]; otherwise (overflow, underflow,
// NaN/Inf) the chunk is summed again as (g / max|g|)^2 in double with scale max|g|.  Chunks are
// combined in chunk order (the same for any thread count), rescaling to the largest scale.
// A NaN or Inf grad makes the norm NaN or Inf.
template <class T>
struct SumBounds;
template <>
struct SumBounds<float> {  // a float sum >= 2^-60 of <= 2^16 squares lost nothing to underflow
  static constexpr double low = 0x1p-60, high = 0x1p+127;
};
template <>
struct SumBounds<double> {  // 2^900: sums of up to 2^100 chunks of it stay finite
  static constexpr double low = 0x1p-500, high = 0x1p+900;
};

// One chunk's share of the norm: scale^2 * ssq (Note [scaled norm]).  16-bit grads are summed
// in float32.
template <class S>
PartialSum chunk_sumsq(const S* g, std::int64_t n) {
  using T = compute_t<S>;
  using V = Vec<T>;
  V s0 = V::set1(0), s1 = V::set1(0);
  constexpr std::int64_t W = V::width;
  std::int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const V a = V::load(g + i), b = V::load(g + i + W);
    s0 = fma(a, a, s0);
    s1 = fma(b, b, s1);
  }
  for (; i < n; i += W) {
    const V a = load_n(g + i, n - i < W ? n - i : W);
    s0 = fma(a, a, s0);
  }
  const double sum = static_cast<double>(reduce_add(add(s0, s1)));
  // squares are >= 0: the sum is NaN exactly when a grad is NaN
  if (std::isnan(sum) || (sum >= SumBounds<T>::low && sum <= SumBounds<T>::high)) return {1, sum};
  V m = V::set1(0);  // max |g| (no NaN here)
  for (i = 0; i < n; i += W) {
    const V a = load_n(g + i, n - i < W ? n - i : W);
    m = max(m, max(a, sub(V::set1(0), a)));
  }
  const double amax = static_cast<double>(reduce_max(m));
  if (amax == 0 || !std::isfinite(amax)) return {1, amax};  // zeros, or an Inf
  double ssq = 0;
  for (std::int64_t k = 0; k < n; ++k) {
    const double r = static_cast<double>(widen(g[k])) / amax;
    ssq += r * r;
  }
  return {amax, ssq};
}

template <class S>
void grad_norm(const OptimTensor<S>* tensors, std::int64_t count, double* out) {
  const std::vector<Chunk> chunks = make_chunks(tensors, count);
  std::vector<PartialSum> partial(chunks.size(), PartialSum{1.0, 0.0});
  const std::int64_t num = static_cast<std::int64_t>(chunks.size());
  parallel_for(num, kChunk, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) {
      const Chunk& c = chunks[i];
      partial[i] = chunk_sumsq(tensors[c.tensor].grad + c.begin, c.end - c.begin);
    }
  });
  double scale = 0, ssq = 0, nonfinite = 0;  // the norm is scale * sqrt(ssq)
  for (const PartialSum& p : partial) {      // chunk order: the same for any thread count
    if (!std::isfinite(p.ssq)) {
      nonfinite += p.ssq;  // Inf + NaN = NaN
    } else if (p.ssq == 0) {
      continue;  // zeros (a scale of 1 would swamp tiny scaled chunks)
    } else if (p.scale > scale) {
      ssq = ssq * (scale / p.scale) * (scale / p.scale) + p.ssq;
      scale = p.scale;
    } else {
      ssq += p.ssq * (p.scale / scale) * (p.scale / scale);
    }
  }
  *out = nonfinite != 0 ? nonfinite : scale * std::sqrt(ssq);
}

}  // namespace

void sgd_step_f32(const SgdArgs<float>& args) { sgd_step(args); }
void sgd_step_f64(const SgdArgs<double>& args) { sgd_step(args); }
void adam_step_f32(const AdamArgs<float>& args) { adam_step(args); }
void adam_step_f64(const AdamArgs<double>& args) { adam_step(args); }
void grad_norm_f32(const OptimTensor<float>* tensors, std::int64_t count, double* out) {
  grad_norm(tensors, count, out);
}
void grad_norm_f64(const OptimTensor<double>* tensors, std::int64_t count, double* out) {
  grad_norm(tensors, count, out);
}
void sgd_step_bf16_sf32(const SgdArgs<bf16, float>& args) { sgd_step(args); }
void sgd_step_bf16_sbf16(const SgdArgs<bf16, bf16>& args) { sgd_step(args); }
void sgd_step_f16_sf32(const SgdArgs<f16, float>& args) { sgd_step(args); }
void sgd_step_f16_sbf16(const SgdArgs<f16, bf16>& args) { sgd_step(args); }
void sgd_step_f32_sbf16(const SgdArgs<float, bf16>& args) { sgd_step(args); }
void adam_step_bf16_sf32(const AdamArgs<bf16, float>& args) { adam_step(args); }
void adam_step_bf16_sbf16(const AdamArgs<bf16, bf16>& args) { adam_step(args); }
void adam_step_f16_sf32(const AdamArgs<f16, float>& args) { adam_step(args); }
void adam_step_f16_sbf16(const AdamArgs<f16, bf16>& args) { adam_step(args); }
void adam_step_f32_sbf16(const AdamArgs<float, bf16>& args) { adam_step(args); }
void grad_norm_bf16(const OptimTensor<bf16>* tensors, std::int64_t count, double* out) {
  grad_norm(tensors, count, out);
}
void grad_norm_f16(const OptimTensor<f16>* tensors, std::int64_t count, double* out) {
  grad_norm(tensors, count, out);
}

MLMATH_ISA_END
