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
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

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
template <class T>
std::vector<Chunk> make_chunks(const OptimTensor<T>* tensors, std::int64_t count) {
  std::vector<Chunk> chunks;
  for (std::int64_t t = 0; t < count; ++t) {
    for (std::int64_t b = 0; b < tensors[t].n; b += kChunk) {
      chunks.push_back(Chunk{t, b, b + kChunk < tensors[t].n ? b + kChunk : tensors[t].n});
    }
  }
  return chunks;
}

template <class T, class Body>
void for_each_chunk(const OptimTensor<T>* tensors, std::int64_t count, const Body& body) {
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

template <class T>
Vec<T> load_n(const T* p, std::int64_t count) {
  return count == Vec<T>::width ? Vec<T>::load(p) : Vec<T>::load_partial(p, count, T(0));
}
template <class T>
void store_n(Vec<T> v, T* p, std::int64_t count) {
  if (count == Vec<T>::width) {
    v.store(p);
  } else {
    v.store_partial(p, count);
  }
}

template <bool Momentum, bool Nesterov, bool FirstStep, bool WeightDecay, class T>
void sgd_chunk(const SgdArgs<T>& a, const OptimTensor<T>& t, std::int64_t begin, std::int64_t end) {
  using V = Vec<T>;
  const V scale = V::set1(a.grad_scale), wd = V::set1(a.weight_decay), mu = V::set1(a.momentum),
          damp = V::set1(T(1) - a.dampening), neg_lr = V::set1(-a.lr);
  vector_loop<T>(begin, end, [&](std::int64_t i, std::int64_t n) {
    V p = load_n(t.param + i, n);
    V d = mul(scale, load_n(t.grad + i, n));
    if (WeightDecay) d = fma(wd, p, d);
    if (Momentum) {
      V b = FirstStep ? d : fma(mu, load_n(t.state1 + i, n), mul(damp, d));
      store_n(b, t.state1 + i, n);
      d = Nesterov ? fma(mu, b, d) : b;
    }
    store_n(fma(neg_lr, d, p), t.param + i, n);
  });
}

template <bool Amsgrad, bool Decoupled, bool WeightDecay, class T>
void adam_chunk(const AdamArgs<T>& a, const OptimTensor<T>& t, std::int64_t begin,
                std::int64_t end) {
  using V = Vec<T>;
  const V scale = V::set1(a.grad_scale), wd = V::set1(a.weight_decay),
          decay = V::set1(T(1) - a.lr * a.weight_decay), b1 = V::set1(a.beta1),
          one_minus_b1 = V::set1(T(1) - a.beta1), b2 = V::set1(a.beta2),
          one_minus_b2 = V::set1(T(1) - a.beta2), eps = V::set1(a.eps),
          inv_c2 = V::set1(a.inv_bias_correction2_sqrt), neg_step = V::set1(-a.step_size);
  vector_loop<T>(begin, end, [&](std::int64_t i, std::int64_t n) {
    V p = load_n(t.param + i, n);
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
    store_n(m, t.state1 + i, n);
    store_n(v, t.state2 + i, n);
    V vv = v;
    if (Amsgrad) {
      vv = max_propagate_nan(load_n(t.state3 + i, n), v);  // NaN stays NaN, as in torch
      store_n(vv, t.state3 + i, n);
    }
    const V denom = fma(sqrt(vv), inv_c2, eps);
    store_n(fma(neg_step, div(m, denom), p), t.param + i, n);
  });
}

template <class T>
void sgd_step(const SgdArgs<T>& a) {
  const bool momentum = a.momentum != T(0);
  with_flag(momentum, [&](auto mom) {
    with_flag(momentum && a.nesterov, [&](auto nest) {
      with_flag(momentum && a.first_step, [&](auto first) {
        with_flag(a.weight_decay != T(0), [&](auto decay) {
          for_each_chunk(a.tensors, a.count, [&](std::int64_t, const OptimTensor<T>& t, Chunk c) {
            sgd_chunk<mom.value, nest.value, first.value, decay.value>(a, t, c.begin, c.end);
          });
        });
      });
    });
  });
}

template <class T>
void adam_step(const AdamArgs<T>& a) {
  with_flag(a.amsgrad, [&](auto ams) {
    with_flag(a.decoupled, [&](auto decoupled) {
      with_flag(a.weight_decay != T(0), [&](auto decay) {
        for_each_chunk(a.tensors, a.count, [&](std::int64_t, const OptimTensor<T>& t, Chunk c) {
          adam_chunk<ams.value, decoupled.value, decay.value>(a, t, c.begin, c.end);
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

// One chunk's share of the norm: scale^2 * ssq (Note [scaled norm]).
template <class T>
PartialSum chunk_sumsq(const T* g, std::int64_t n) {
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
    const double r = static_cast<double>(g[k]) / amax;
    ssq += r * r;
  }
  return {amax, ssq};
}

template <class T>
void grad_norm(const OptimTensor<T>* tensors, std::int64_t count, double* out) {
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

MLMATH_ISA_END
