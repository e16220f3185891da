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
// The hash runs in the vector lanes: a 64-bit key per (seed, step, tensor, array, i >> 32) made
// by splitmix64 once per chunk, folded to 32 bits, and h = hash32((uint32(i) >> 1) + key) (vec.h:
// 32-bit lane arithmetic, which every ISA has) whose high half rounds element i when i is even
// and whose low half rounds i when i is odd: one hash per two elements.  Where every array is
// bf16, the step works in vec.h's pair layout (lane j of a pair of vectors holds elements 2j and
// 2j + 1), so lane j's hash serves both its elements with no shuffle.  History: a 64-bit hash per
// element in scalar code made the bf16 step 5x slower than the float32 one; a 32-bit hash per
// element in the lanes and a widening/narrowing shuffle per vector still took 10.4 instructions
// per parameter of AdamW (7.1 with rounding to nearest).
//
// Note [8-bit optimizer state]
// With St = q8 each state array is one byte per element plus one float32 scale per block of
// kQuantBlock elements (the block's largest magnitude, "absmax"), and the codes map to values
// through a power law, so that small values keep relative precision that a linear map would
// round away:
//   signed (SGD's momentum, Adam's exp_avg):  c in [-127, 127],  x = absmax * sign(c) (c/127)^2
//   unsigned (exp_avg_sq, max_exp_avg_sq):   c in [0, 255],     x = absmax * (c/255)^4
// The first moment is signed and spans a few decades within a block: the square law resolves
// |x| down to absmax * 6e-5 (linear codes: absmax * 4e-3) with ~1 % relative steps where most
// values lie.  The second moment is >= 0 and spans the square of that range; the fourth-power
// law resolves it down to absmax * 2.4e-10, and Adam uses sqrt(v), which the law makes a square
// law again.  A positive v never gets code 0: decoded as 0 it would turn the next step's
// m / (sqrt(v) + eps) into m / eps, the 8-bit optimizers' known blow-up, so its smallest code is
// 1 (rounding it up, a smaller step).  Codes round to nearest, or to the next code where the
// value lies within a tenth of a code of a midpoint (round_sqrt).
// One pass per block: the step dequantises the codes it reads, computes in float32, updates the
// param from the new moments at full precision, and keeps the new moments in a block buffer in
// L1 (never a full-size array); at the end of the block their absmax is known and the buffer is
// quantised into the codes.  The second moment's buffer keeps sqrt(v), which Adam computed
// anyway, so that requantising costs one more square root per value instead of two.  A NaN or
// infinite moment makes its block's absmax NaN or inf, and every value of that block decodes
// to NaN on the next step (8-bit states cannot keep the other 255 apart from it); chunks are
// whole blocks (kChunk is a multiple of kQuantBlock), so results are independent of threads.
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Where a step stores 16-bit values: the 32-bit key of that array's stochastic rounding for the
// elements of one chunk (a chunk never crosses a multiple of 2^32: kChunk divides it).
struct Rounder {
  std::uint32_t key;
};
inline Rounder make_rounder(bool stochastic, const RoundingArgs& r, std::int64_t tensor, int array,
                            std::int64_t chunk_begin) {
  if (!stochastic) return Rounder{0};
  const std::uint64_t high = static_cast<std::uint64_t>(chunk_begin) >> 32;
  return Rounder{static_cast<std::uint32_t>(mix64(rounding_key(r, tensor, array) ^ high))};
}

// Stores count values of v into p (element index i of its array): with Stochastic, stochastic
// rounding for bf16; else the vector layer's round to nearest even.  A compile-time flag, so
// that the nearest-even path inlines into the step's loop (a runtime branch here kept the whole
// function out of line, with every vector spilled around the call: 2x slower bf16 steps).
template <bool Stochastic, class S>
inline void store_rounded(Vec<compute_t<S>> v, S* p, std::int64_t i, std::int64_t count,
                          const Rounder& r) {
  if constexpr (Stochastic && std::is_same_v<S, bf16>) {
    const auto first = static_cast<std::uint32_t>(i);  // i modulo 2^32 (the key has i >> 32)
    if (count == Vec<float>::width) {
      store_bf16_stochastic(v, p, r.key, first);
    } else {
      bf16 tail[Vec<float>::width];
      store_bf16_stochastic(v, tail, r.key, first);
      std::memcpy(p, tail, sizeof(bf16) * static_cast<std::size_t>(count));
    }
  } else {
    store_n(v, p, count);
  }
}

// -- state access -------------------------------------------------------------------------------

static_assert(kChunk % kQuantBlock == 0, "chunks must be whole blocks of an 8-bit state");

// How a step reads and writes one state array: element i of a tensor, n (<= width) lanes.
// begin_block(b) returns the Block the step loads from and stores to: a small value of its own
// that the loop keeps in registers (its fields were members of StateIO before, and the float
// stores into a q8 block buffer, which may alias the struct for all the compiler knows, made
// it reload them from the stack on every vector: 6 loads per vector of the 8-bit Adam loop).
// Block::store(x, root_x, i, n, top): root_x = sqrt(x) is what a q8 second moment keeps, top
// the running largest magnitude of a q8 block (a local of the step, likewise).
// Plain states (float, double, bf16) load and store directly; blocks are the whole chunk.
template <class St, bool Signed, bool SR>
struct StateIO {
  using V = Vec<compute_t<St>>;
  static constexpr std::int64_t kBlock = kChunk;
  struct Block {
    St* data;
    Rounder rounder;
    V load(std::int64_t i, std::int64_t n) const { return load_n(data + i, n); }
    void store(V x, V, std::int64_t i, std::int64_t n, V&) const {
      store_rounded<SR>(x, data + i, i, n, rounder);
    }
  };
  St* data;
  Rounder rounder;
  StateIO(St* d, float*, Rounder r) : data(d), rounder(r) {}
  Block begin_block(std::int64_t) const { return Block{data, rounder}; }
  void end_block(std::int64_t, std::int64_t, V) {}
};

// round(sqrt(y)) for y in [0, 2^16], nearly: y * rsqrt_estimate(y) is within 2^-11 relative of
// sqrt(y), i.e. within 0.13 of it below 256, so the code is the nearest one, or one off where
// sqrt(y) lies within 0.13 of a midpoint.  A square root per value (vsqrtps shares the divider
// with Adam's own sqrt and division) made the 8-bit step 3x slower than float32's; an exact
// correction against the squares of the midpoints cost 10 more instructions per vector.
// Signed: sign(y) round(sqrt(|y|)), the same rounding mirrored (y * rsqrt(|y|) has y's sign;
// a copy of the sign after the rounding cost 3 more instructions per vector).
template <bool Signed>
inline Vec<float> round_sqrt(Vec<float> y) {
  using V = Vec<float>;
  const V tiny = V::set1(std::numeric_limits<float>::min());  // rsqrt(0) = inf: 0 * inf = NaN
  return round_nearest(mul(y, rsqrt_estimate(max(Signed ? abs(y) : y, tiny))));
}

// A q8 state (Note [8-bit optimizer state]): Signed is the square law on [-127, 127], else the
// fourth-power law on [0, 255] with the block buffer holding sqrt(x).
template <bool Signed, bool SR>
struct StateIO<q8, Signed, SR> {
  using V = Vec<float>;
  static constexpr std::int64_t kBlock = kQuantBlock;
  static constexpr float kLevels = Signed ? 127.0f : 255.0f;  // largest code
  // decoded x = code_power(c) * absmax / kRange
  static constexpr float kRange =
      Signed ? kLevels * kLevels : kLevels * kLevels * kLevels * kLevels;
  struct Block {
    const q8* codes;
    float* kept;  // the block buffer, element i at kept[i - begin]
    std::int64_t begin;
    V decode_scale;  // absmax / kRange of the block read
    V load(std::int64_t i, std::int64_t n) const {
      V c;
      if (n == V::width) {
        c = load_codes<Signed>(codes + i);
      } else {  // the tensor's last lanes: zero codes beyond n
        q8 tail[V::width] = {};
        std::memcpy(tail, codes + i, static_cast<std::size_t>(n));
        c = load_codes<Signed>(tail);
      }
      if constexpr (Signed) {
        return mul(mul(c, abs(c)), decode_scale);  // c |c| absmax / 127^2
      } else {
        const V c2 = mul(c, c);
        return mul(mul(c2, c2), decode_scale);
      }
    }
    // Whole vectors: lanes past n are zero (the step computed them from zero-filled loads).  A
    // NaN leaves top as it was (max keeps its second operand); end_block finds it.
    void store(V x, V root_x, std::int64_t i, std::int64_t, V& top) const {
      const V keep = Signed ? x : root_x;
      keep.store(kept + (i - begin));
      top = max(Signed ? abs(keep) : keep, top);
    }
  };
  q8* codes;
  float* absmax;
  alignas(64) float kept[kQuantBlock];  // x (Signed) or sqrt(x) of the block's new values

  StateIO(q8* c, float* a, Rounder) : codes(c), absmax(a) {}
  Block begin_block(std::int64_t b) {
    return Block{codes, kept, b, V::set1(absmax[b / kQuantBlock] / kRange)};
  }
  void end_block(std::int64_t b, std::int64_t e, V top_lanes) {
    const float top = reduce_max(top_lanes);  // of |x| or of sqrt(x), NaN not counted
    const bool usable = top > 0.0f && top <= std::numeric_limits<float>::max();
    V nan_probe = V::set1(0.0f);  // stays 0 unless a kept value is NaN or infinite
    // Signed: c = round(sqrt(|x| * 127^2 / top)) with x's sign;  else c = round(sqrt(r * 255^2 /
    // top)) for r = sqrt(x), at least 1 where x > 0.
    const V to_code = V::set1(usable ? kLevels * kLevels / top : 0.0f);
    vector_loop<float>(b, e, [&](std::int64_t i, std::int64_t n) {
      const V k = V::load(kept + (i - b));
      nan_probe = fma(k, V::set1(0.0f), nan_probe);
      V c = round_sqrt<Signed>(mul(k, to_code));  // k >= 0 (or NaN) when unsigned
      if constexpr (!Signed) c = max(c, keep_where_nonzero(k, V::set1(1.0f)));
      if (n == V::width) {
        store_codes<Signed>(c, codes + i);
      } else {
        q8 tail[V::width];
        store_codes<Signed>(c, tail);
        std::memcpy(codes + i, tail, static_cast<std::size_t>(n));
      }
    });
    const float scale = reduce_add(nan_probe) == 0.0f ? top : reduce_add(nan_probe);  // NaN
    absmax[b / kQuantBlock] = Signed ? scale : scale * scale;
  }
};

// body(b, e) over [begin, end) in blocks of the state's block size (begin is block-aligned).
template <class St, class Body>
void block_loop(std::int64_t begin, std::int64_t end, const Body& body) {
  constexpr std::int64_t B = StateIO<St, true, false>::kBlock;
  for (std::int64_t b = begin; b < end; b += B) body(b, b + B < end ? b + B : end);
}

// -- the steps ----------------------------------------------------------------------------------

// Both steps read the tensor's pointers from a local copy (t, of t_ref): read through the
// reference they were reloaded after every store (a float store may alias the struct for all
// the compiler knows): 6 extra loads per vector in the NEON Adam loop.

// The param of elements [i, i + n): the float32 master's where there is one.
template <bool Master, class S, class St>
Vec<compute_t<S>> load_param(const OptimTensor<S, St>& t, std::int64_t i, std::int64_t n) {
  if constexpr (Master) {
    return load_n(t.master + i, n);
  } else {
    return load_n(t.param + i, n);
  }
}

// Stores the new param q: into the master and, rounded to nearest even from it, into the param;
// without a master into the param, rounded stochastically where SR (bf16 params).
template <bool Master, bool SR, class S, class St>
void store_param(Vec<compute_t<S>> q, const OptimTensor<S, St>& t, std::int64_t i, std::int64_t n,
                 const Rounder& r) {
  if constexpr (Master) {
    store_n(q, t.master + i, n);
    store_n(q, t.param + i, n);
  } else {
    store_rounded<SR>(q, t.param + i, i, n, r);
  }
}

// The stores of the pair layout (vec.h): rounded stochastically where SR, the random bits of
// element i (even) and i + 1 from one hash (Note [stochastic rounding]); KeepNaN false where no
// value is NaN (the NaN repair was a quarter of the bf16 AdamW step's instructions).
template <bool SR, bool KeepNaN>
void store_pairs(Vec<float> even, Vec<float> odd, bf16* p, std::int64_t i, const Rounder& r) {
  if constexpr (SR) {
    store_bf16_pairs_stochastic<KeepNaN>(even, odd, p,
                                         (static_cast<std::uint32_t>(i) >> 1) + r.key);
  } else {
    store_bf16_pairs<KeepNaN>(even, odd, p);
  }
}

template <bool Momentum, bool Nesterov, bool FirstStep, bool WeightDecay, bool Master, bool SR,
          class S, class St>
void sgd_chunk(const SgdArgs<S, St>& a, const OptimTensor<S, St>& t_ref, std::int64_t tensor,
               std::int64_t begin, std::int64_t end) {
  const OptimTensor<S, St> t = t_ref;
  using T = compute_t<S>;
  using V = Vec<T>;
  const V scale = V::set1(a.grad_scale), wd = V::set1(T(a.weight_decay)),
          mu = V::set1(T(a.momentum)), damp = V::set1(T(1.0 - a.dampening)),
          neg_lr = V::set1(T(-a.lr));
  // One vector's update: the momentum buffer b in and out (where Momentum); returns the new param.
  const auto update = [&](V p, V g, V& b) {
    V d = mul(scale, g);
    if (WeightDecay) d = fma(wd, p, d);
    if (Momentum) {
      b = FirstStep ? d : fma(mu, b, mul(damp, d));
      d = Nesterov ? fma(mu, b, d) : b;
    }
    return fma(neg_lr, d, p);
  };
  const Rounder rp = make_rounder(SR, a.rounding, tensor, 0, begin);
  const Rounder rb = make_rounder(SR, a.rounding, tensor, 1, begin);
  StateIO<St, true, SR> buf(t.state1, t.absmax1, rb);
  // Every array it touches bf16: whole pairs of vectors in the pair layout first (vec.h).
  constexpr bool kPairs =
      std::is_same_v<S, bf16> && (std::is_same_v<St, bf16> || !Momentum) && !Master;
  std::int64_t pairs_end = begin;
  if constexpr (kPairs) {
    for (; pairs_end + 2 * V::width <= end; pairs_end += 2 * V::width) {
      const std::int64_t i = pairs_end;
      V p[2], g[2], b[2];
      load_bf16_pairs(t.param + i, p[0], p[1]);
      load_bf16_pairs(t.grad + i, g[0], g[1]);
      if constexpr (Momentum && !FirstStep) load_bf16_pairs(t.state1 + i, b[0], b[1]);
      for (int k = 0; k < 2; ++k) p[k] = update(p[k], g[k], b[k]);
      const auto store_all = [&](auto keep_nan) {
        constexpr bool kKeepNaN = decltype(keep_nan)::value;
        if constexpr (Momentum) store_pairs<SR, kKeepNaN>(b[0], b[1], t.state1 + i, i, rb);
        store_pairs<SR, kKeepNaN>(p[0], p[1], t.param + i, i, rp);
      };
      V sum = add(p[0], p[1]);  // NaN when any is (so may inf - inf, harmlessly)
      if (Momentum) sum = add(sum, add(b[0], b[1]));
      with_flag(any_nan(sum), store_all);
    }
  }
  block_loop<St>(pairs_end, end, [&](std::int64_t block_begin, std::int64_t block_end) {
    const auto buf_io = Momentum ? buf.begin_block(block_begin) : decltype(buf.begin_block(0)){};
    V top = V::set1(T(0));
    vector_loop<T>(block_begin, block_end, [&](std::int64_t i, std::int64_t n) {
      V b = V::set1(T(0));
      if (Momentum && !FirstStep) b = buf_io.load(i, n);
      const V q = update(load_param<Master>(t, i, n), load_n(t.grad + i, n), b);
      if (Momentum) buf_io.store(b, b, i, n, top);
      store_param<Master, SR>(q, t, i, n, rp);
    });
    if (Momentum) buf.end_block(block_begin, block_end, top);
  });
}

template <bool Amsgrad, bool Decoupled, bool WeightDecay, bool Master, bool SR, class S, class St>
void adam_chunk(const AdamArgs<S, St>& a, const OptimTensor<S, St>& t_ref, std::int64_t tensor,
                std::int64_t begin, std::int64_t end) {
  const OptimTensor<S, St> t = t_ref;
  using T = compute_t<S>;
  using V = Vec<T>;
  // constants formed in double and rounded once, as torch's scalars (Note in mlmath.h)
  const V scale = V::set1(a.grad_scale), wd = V::set1(T(a.weight_decay)),
          decay = V::set1(T(1.0 - a.lr * a.weight_decay)), b1 = V::set1(T(a.beta1)),
          one_minus_b1 = V::set1(T(1.0 - a.beta1)), b2 = V::set1(T(a.beta2)),
          one_minus_b2 = V::set1(T(1.0 - a.beta2)), eps = V::set1(T(a.eps)),
          inv_c2 = V::set1(a.inv_bias_correction2_sqrt), neg_step = V::set1(-a.step_size);
  // One vector's update: the moments m, v (and vmax) in and out; returns the new param; root is
  // the square root of the second moment that the denominator used.
  const auto update = [&](V p, V g, V& m, V& v, V& vmax, V& root) {
    V d = mul(scale, g);
    if (WeightDecay) {
      if (Decoupled) {
        p = mul(p, decay);
      } else {
        d = fma(wd, p, d);
      }
    }
    m = fma(b1, m, mul(one_minus_b1, d));
    v = fma(b2, v, mul(one_minus_b2, mul(d, d)));
    if (Amsgrad) vmax = max_propagate_nan(vmax, v);  // NaN stays NaN, as in torch
    root = sqrt(Amsgrad ? vmax : v);
    return fma(neg_step, div(m, fma(root, inv_c2, eps)), p);
  };
  Rounder r[4];
  for (int k = 0; k < 4; ++k) r[k] = make_rounder(SR, a.rounding, tensor, k, begin);
  StateIO<St, true, SR> exp_avg(t.state1, t.absmax1, r[1]);
  StateIO<St, false, SR> exp_avg_sq(t.state2, t.absmax2, r[2]), max_sq(t.state3, t.absmax3, r[3]);
  constexpr bool kQuantised = std::is_same_v<St, q8>;
  // Everything bf16: whole pairs of vectors in the pair layout first (vec.h), the rest below.
  constexpr bool kPairs = std::is_same_v<S, bf16> && std::is_same_v<St, bf16> && !Master;
  std::int64_t pairs_end = begin;
  if constexpr (kPairs) {
    constexpr std::int64_t kPair = 2 * V::width;
    for (; pairs_end + kPair <= end; pairs_end += kPair) {
      const std::int64_t i = pairs_end;
      V p[2], g[2], m[2], v[2], vmax[2], root[2];
      load_bf16_pairs(t.param + i, p[0], p[1]);
      load_bf16_pairs(t.grad + i, g[0], g[1]);
      load_bf16_pairs(t.state1 + i, m[0], m[1]);
      load_bf16_pairs(t.state2 + i, v[0], v[1]);
      if (Amsgrad) load_bf16_pairs(t.state3 + i, vmax[0], vmax[1]);
      for (int k = 0; k < 2; ++k) p[k] = update(p[k], g[k], m[k], v[k], vmax[k], root[k]);
      const auto store_all = [&](auto keep_nan) {
        constexpr bool kKeepNaN = decltype(keep_nan)::value;
        store_pairs<SR, kKeepNaN>(m[0], m[1], t.state1 + i, i, r[1]);
        store_pairs<SR, kKeepNaN>(v[0], v[1], t.state2 + i, i, r[2]);
        if (Amsgrad) store_pairs<SR, kKeepNaN>(vmax[0], vmax[1], t.state3 + i, i, r[3]);
        store_pairs<SR, kKeepNaN>(p[0], p[1], t.param + i, i, r[0]);
      };
      // one test for all: a NaN anywhere makes the sum NaN (so may inf - inf, harmlessly)
      V sum = add(add(add(p[0], p[1]), add(m[0], m[1])), add(v[0], v[1]));
      if (Amsgrad) sum = add(sum, add(vmax[0], vmax[1]));
      with_flag(any_nan(sum), store_all);
    }
  }
  block_loop<St>(pairs_end, end, [&](std::int64_t block_begin, std::int64_t block_end) {
    const auto m_io = exp_avg.begin_block(block_begin);
    const auto v_io = exp_avg_sq.begin_block(block_begin);
    const auto vmax_io =
        Amsgrad ? max_sq.begin_block(block_begin) : decltype(max_sq.begin_block(0)){};
    V top1 = V::set1(T(0)), top2 = top1, top3 = top1;  // of each state's kept values
    vector_loop<T>(block_begin, block_end, [&](std::int64_t i, std::int64_t n) {
      V m = m_io.load(i, n), v = v_io.load(i, n), vmax = m, root;
      if (Amsgrad) vmax = vmax_io.load(i, n);
      const V q = update(load_param<Master>(t, i, n), load_n(t.grad + i, n), m, v, vmax, root);
      m_io.store(m, m, i, n, top1);
      if (Amsgrad) {
        vmax_io.store(vmax, root, i, n, top3);
        v_io.store(v, kQuantised ? sqrt(v) : v, i, n, top2);
      } else {
        v_io.store(v, root, i, n, top2);
      }
      store_param<Master, SR>(q, t, i, n, r[0]);
    });
    exp_avg.end_block(block_begin, block_end, top1);
    exp_avg_sq.end_block(block_begin, block_end, top2);
    if (Amsgrad) max_sq.end_block(block_begin, block_end, top3);
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
  const bool momentum = a.momentum != 0.0;
  with_flag(momentum, [&](auto mom) {
    with_flag(momentum && a.nesterov, [&](auto nest) {
      with_flag(momentum && a.first_step, [&](auto first) {
        with_flag(a.weight_decay != 0.0, [&](auto decay) {
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
  with_flag(a.amsgrad, [&](auto ams) {
    with_flag(a.decoupled, [&](auto decoupled) {
      with_flag(a.weight_decay != 0.0, [&](auto decay) {
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
void sgd_step_f32_sq8(const SgdArgs<float, q8>& args) { sgd_step(args); }
void sgd_step_bf16_sq8(const SgdArgs<bf16, q8>& args) { sgd_step(args); }
void sgd_step_f16_sq8(const SgdArgs<f16, q8>& args) { sgd_step(args); }
void adam_step_f32_sq8(const AdamArgs<float, q8>& args) { adam_step(args); }
void adam_step_bf16_sq8(const AdamArgs<bf16, q8>& args) { adam_step(args); }
void adam_step_f16_sq8(const AdamArgs<f16, q8>& args) { adam_step(args); }
void grad_norm_bf16(const OptimTensor<bf16>* tensors, std::int64_t count, double* out) {
  grad_norm(tensors, count, out);
}
void grad_norm_f16(const OptimTensor<f16>* tensors, std::int64_t count, double* out) {
  grad_norm(tensors, count, out);
}

MLMATH_ISA_END
