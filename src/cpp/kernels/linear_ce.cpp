// Fused linear + cross-entropy: the loss of logits = hidden W^T + b over a whole vocabulary, and
// its gradients, without ever holding the N x V logits.
//
// Note [fused linear cross-entropy]
// Tokens are taken in chunks of Nc rows (Nc V logits in one scratch block; chunk_tokens says how
// many).  For each chunk, in token order:
//   1. Z = H_c W^T  (the GEMM core), then per row, in place:  x = softcap(Z + b) / temperature,
//      softcap(z) = c tanh(z / c);  the row's max m, s = sum_j exp(x_j - m), lse = m + log s;
//      the loss, log p(target), the entropy lse - sum_j p_j x_j.
//   2. With gradients, each row becomes dL/dz (below), then
//        dH_c  = dZ W          (K = V, in the GEMM's fixed order)
//        dW   += dZ^T H_c      (chunks in token order)
//        db   += column sums of dZ (rows in order)
//      so every output is the same bits for any thread count: the GEMM core gives each C element
//      to one task per KC step, and no sum is split across threads.
// Per row, with class weights w (W = sum w), smoothing eps, target t, x as above, p = softmax(x):
//   ce     = (1 - eps) w_t (lse - x_t) + (eps / V) (W lse - sum_j w_j x_j)   (as cross_entropy.cpp)
//   dL/dx_j = ce_scale (p_j A - (eps / V) w_j - (1 - eps) w_t [j == t]) + 2 z_scale lse p_j,
//            A = (1 - eps) w_t + (eps / V) W  (A = w_t without smoothing: Note [weights of other
//            classes] in cross_entropy.cpp), z_scale the z-loss weight of the row's lse^2
//   dL/dz_j = dL/dx_j / temperature * (1 - tanh^2(z_j / c))     (the last factor with softcap)
// Ignored rows (target == ignore_index) have loss 0, log-probability 0 and a zero gradient row;
// their entropy and lse are computed all the same (they do not depend on the target).
// Every lse - x is evaluated shifted by the row max (Note [shifted logits] in cross_entropy.cpp).
// The entropy takes 0 log 0 = 0 (a class at -inf contributes nothing).
//
// Memory: the scratch block, plus for 16-bit operands a float32 accumulator of dW (V x D, the size
// of the output itself, widened) and of db.  16-bit H, W and b are widened as they are packed;
// dH is rounded once from its float32 sum, dW and db once at the end.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/axis_ops.h"
#include "common/gemm_core.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

namespace {

// Logits of one token chunk: 64 MiB is 512 tokens of a 32k vocabulary in float32, enough rows for
// the GEMM to run at full rate, and small beside the 0.5-4 GiB of logits it replaces.
constexpr std::int64_t kScratchBytes = std::int64_t{64} << 20;
// Each chunk packs all of W twice (W^T for the logits, W for d_hidden) and reads and writes all
// of dW: with few tokens per chunk that costs as much as the products (D = 256, V = 131072: 128
// tokens 17-20 s, 256 tokens 14-17 s), so larger vocabularies take at least this many tokens...
constexpr std::int64_t kMinChunkTokens = 256;
// ...as long as their logits fit this much (past V = 262144 chunks get fewer tokens again).
constexpr std::int64_t kMaxScratchBytes = std::int64_t{256} << 20;
// The fewest tokens per chunk for any vocabulary (a few GEMM row tiles).
constexpr std::int64_t kFewestChunkTokens = 16;
// Note [long row sums]
// A row's sums run over the whole vocabulary (262144 classes and more).  One float accumulator
// per lane drifts by up to (V / width) eps: with the scalar path's one lane, 1.6e-2 at V = 2^18
// (the drift Megatron saw past 250k classes).  Each block of kSumBlock classes is summed in
// vector lanes and the blocks' sums are added in double, so the drift stays that of kSumBlock
// terms whatever V is.
constexpr std::int64_t kSumBlock = 256;
// tanh(y) rounds to +-1 past |y| = 20 in float64 too; the clamp keeps exp(2y) finite.
constexpr double kTanhClamp = 20.0;

// body(j, count) over [0, n) in whole vectors and one partial tail (count < width).
template <class T, class Body>
void for_vectors(std::int64_t n, const Body& body) {
  constexpr std::int64_t W = Vec<T>::width;
  std::int64_t j = 0;
  for (; j + W <= n; j += W) body(j, W);
  if (j < n) body(j, n - j);
}

// count (<= width) lanes from p (storage type S, widened), the rest `fill`; and back.
template <class S, class T = compute_t<S>>
Vec<T> load_lanes(const S* p, std::int64_t count, T fill) {
  return count == Vec<T>::width ? Vec<T>::load(p) : Vec<T>::load_partial(p, count, fill);
}
template <class T>
void store_lanes(Vec<T> v, T* p, std::int64_t count) {
  if (count == Vec<T>::width) {
    v.store(p);
  } else {
    v.store_partial(p, count);
  }
}

template <class S>
std::int64_t chunk_tokens(const LinearCrossEntropyArgs<S>& a) {
  using T = compute_t<S>;
  std::int64_t c = a.chunk;
  if (c <= 0) {
    const std::int64_t row_bytes = static_cast<std::int64_t>(sizeof(T)) * (a.v > 0 ? a.v : 1);
    c = kScratchBytes / row_bytes;
    if (c < kMinChunkTokens) c = std::min(kMinChunkTokens, kMaxScratchBytes / row_bytes);
    if (c < kFewestChunkTokens) c = kFewestChunkTokens;
  }
  return c < a.n ? c : a.n;
}

// tanh(y) = (e - 1) / (e + 1), e = exp(2y), y clamped to +-kTanhClamp (NaN stays NaN).  Absolute
// error a few ulps of 1, which is what softcap c tanh(z / c) needs (logits, not probabilities).
template <class T>
Vec<T> tanh_clamped(Vec<T> y) {
  using V = Vec<T>;
  const V one = V::set1(T(1));
  const V yc = min(V::set1(T(kTanhClamp)), max(V::set1(T(-kTanhClamp)), y));
  const V e = exp(add(yc, yc));
  return div(sub(e, one), add(e, one));
}

// x = softcap(z + b) / temperature, in place over one row of V logits.
template <class S, class T = compute_t<S>>
void tempered_logits(const LinearCrossEntropyArgs<S>& a, T* x) {
  using V = Vec<T>;
  const T cap = a.softcap;
  const V inv_cap = V::set1(cap > 0 ? T(1) / cap : T(0));
  const V out_scale = V::set1(cap > 0 ? cap * a.inv_temperature : a.inv_temperature);
  for_vectors<T>(a.v, [&](std::int64_t j, std::int64_t n) {
    V z = load_lanes(x + j, n, T(0));
    if (a.bias) z = add(z, load_lanes(a.bias + j, n, T(0)));
    if (cap > 0) z = tanh_clamped(mul(z, inv_cap));
    store_lanes(mul(z, out_scale), x + j, n);
  });
}

struct RowStats {
  double lse_shifted;  // log s + (m - shift): lse - shift
  double shift;        // the row max, or 0 when it is infinite (Note [shifted logits])
  double max;
  double exp_sum;  // s = sum_j exp(x_j - max)
};

// Loss terms of one row of tempered logits x: fills loss, lse, logprob and entropy of row r.
template <class S, class T = compute_t<S>>
RowStats row_forward(const LinearCrossEntropyArgs<S>& a, std::int64_t r, const T* x) {
  using V = Vec<T>;
  const std::int64_t C = a.v;
  const T m = row_max(x, C);
  const T shift = finite_or_zero(m);
  const bool smoothing = a.label_smoothing > 0;
  const V vm = V::set1(m), vshift = V::set1(shift);
  // sums of e, e (x - shift) and w (x - shift): vector sums over blocks of kSumBlock classes,
  // the blocks' sums added in double (Note [long row sums])
  double s_total = 0, ex_total = 0, wx_total = 0;
  for (std::int64_t j0 = 0; j0 < C; j0 += kSumBlock) {
    const std::int64_t len = C - j0 < kSumBlock ? C - j0 : kSumBlock;
    V s = V::set1(T(0)), ex = s, wx = s;
    for_vectors<T>(len, [&](std::int64_t jj, std::int64_t n) {
      const std::int64_t j = j0 + jj;
      const V xv = load_lanes(x + j, n, -std::numeric_limits<T>::infinity());
      const V e = exp<true>(sub(xv, vm));  // 0 in the padding lanes
      const V xs = sub(xv, vshift);
      s = add(s, e);
      ex = add(ex, keep_where_nonzero(e, mul(e, xs)));  // 0 log 0 = 0
      if (smoothing) {  // padding lanes have weight 0 (and x - shift = -inf: 0 kept, not NaN)
        const V w = load_lanes(a.class_weight + j, n, T(0));
        wx = add(wx, keep_where_nonzero(w, mul(w, xs)));
      }
    });
    s_total += static_cast<double>(reduce_add(s));
    ex_total += static_cast<double>(reduce_add(ex));
    wx_total += static_cast<double>(reduce_add(wx));
  }
  RowStats st{};
  st.max = m;
  st.shift = shift;
  st.exp_sum = s_total;
  const T lse_shifted = static_cast<T>((m - shift) + std::log(st.exp_sum));
  st.lse_shifted = lse_shifted;
  a.lse[r] = shift + lse_shifted;
  if (a.entropy) a.entropy[r] = static_cast<T>(lse_shifted - ex_total / s_total);
  const std::int64_t t = a.target[r];
  if (t == a.ignore_index) {
    a.loss[r] = 0;
    if (a.logprob) a.logprob[r] = 0;
    return st;
  }
  const T eps = a.label_smoothing, x_t = x[t] - shift;
  T loss = (T(1) - eps) * a.class_weight[t] * (lse_shifted - x_t);
  if (smoothing) loss += eps / T(C) * (a.class_weight_sum * lse_shifted - static_cast<T>(wx_total));
  a.loss[r] = loss;
  if (a.logprob) a.logprob[r] = x_t - lse_shifted;
  return st;
}

// Row r of tempered logits x becomes dL/dz (Note [fused linear cross-entropy]).
template <class S, class T = compute_t<S>>
void row_backward(const LinearCrossEntropyArgs<S>& a, std::int64_t r, const RowStats& st, T* x) {
  using V = Vec<T>;
  const std::int64_t C = a.v, t = a.target[r];
  if (t == a.ignore_index) {
    row_fill(x, C, T(0));
    return;
  }
  const T ce_scale = a.ce_scale ? a.ce_scale[r] : a.ce_scale_all;
  const T z_scale = a.z_scale ? a.z_scale[r] : a.z_scale_all;
  const T eps = a.label_smoothing, keep = T(1) - eps, eps_c = eps / T(C), w_t = a.class_weight[t];
  const T lse = static_cast<T>(st.shift + st.lse_shifted);
  const T target_weight = eps > 0 ? keep * w_t + eps_c * a.class_weight_sum : w_t;
  const T z_term = z_scale != 0 ? T(2) * z_scale * lse : T(0);  // no 0 * inf without a z-loss
  const T coef = (ce_scale * target_weight + z_term) / static_cast<T>(st.exp_sum);
  const T cap = a.softcap, inv_t = a.inv_temperature;
  // the softcap's tanh(z / c) is x T / c
  const V vcoef = V::set1(coef), vm = V::set1(static_cast<T>(st.max)), vinv_t = V::set1(inv_t),
          vb = V::set1(-ce_scale * eps_c), vtanh = V::set1(cap > 0 ? T(1) / (cap * inv_t) : T(0)),
          one = V::set1(T(1));
  const T x_t = x[t];
  for_vectors<T>(C, [&](std::int64_t j, std::int64_t n) {
    const V xv = load_lanes(x + j, n, T(0));
    V g = mul(exp<true>(sub(xv, vm)), vcoef);
    if (eps > 0) g = fma(vb, load_lanes(a.class_weight + j, n, T(0)), g);
    g = mul(g, vinv_t);
    if (cap > 0) {
      const V th = mul(xv, vtanh);
      g = mul(g, fma(th, sub(V::set1(T(0)), th), one));  // 1 - tanh^2
    }
    store_lanes(g, x + j, n);
  });
  T chain_t = inv_t;
  if (cap > 0) {
    const T th = x_t / (cap * inv_t);
    chain_t *= T(1) - th * th;
  }
  x[t] -= ce_scale * keep * w_t * chain_t;
}

// One chunk of rows [r0, r0 + rows): logits into z (rows x V), the forward values, and with
// gradients dZ in place of z and the three gradient products.
template <class S, class T = compute_t<S>>
void run_chunk(const LinearCrossEntropyArgs<S>& a, std::int64_t r0, std::int64_t rows, T* z, T* dw,
               T* db) {
  const std::int64_t V = a.v, D = a.d;
  const S* h = a.hidden + r0 * a.hidden_rs;
  gemm_blocked<T>(
      rows, V, D,
      [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
        pack_a_strided(h, a.hidden_rs, a.hidden_cs, rows, i0, mc, k0, kc, dst);
      },
      [&](std::int64_t k0, std::int64_t kc, std::int64_t j0, std::int64_t nc, T* dst) {
        pack_b_strided(a.weight, a.weight_cs, a.weight_rs, k0, kc, j0, nc, dst);  // W^T
      },
      z, V, false);
  const bool grads = a.d_hidden != nullptr;
  parallel_for(rows, 24 * V, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t i = first; i < last; ++i) {
      T* x = z + i * V;
      tempered_logits(a, x);
      const RowStats st = row_forward(a, r0 + i, x);
      if (grads) row_backward(a, r0 + i, st, x);
    }
  });
  if (!grads) return;
  // dH_c = dZ W  (rows x D, K = V)
  gemm_blocked<T>(
      rows, D, V,
      [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
        pack_a_strided(static_cast<const T*>(z), V, std::int64_t{1}, rows, i0, mc, k0, kc, dst);
      },
      [&](std::int64_t k0, std::int64_t kc, std::int64_t j0, std::int64_t nc, T* dst) {
        pack_b_strided(a.weight, a.weight_rs, a.weight_cs, k0, kc, j0, nc, dst);
      },
      a.d_hidden + r0 * D, D, false);
  // dW (+)= dZ^T H_c  (V x D, K = rows); the first chunk writes
  gemm_blocked<T>(
      V, D, rows,
      [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
        pack_a_strided(static_cast<const T*>(z), std::int64_t{1}, V, V, i0, mc, k0, kc, dst);
      },
      [&](std::int64_t k0, std::int64_t kc, std::int64_t j0, std::int64_t nc, T* dst) {
        pack_b_strided(h, a.hidden_rs, a.hidden_cs, k0, kc, j0, nc, dst);
      },
      dw, D, r0 > 0);
  if (db) {  // column sums, each column's rows in order on one thread
    parallel_for(V, rows, [&](std::int64_t first, std::int64_t last) {
      for (std::int64_t i = 0; i < rows; ++i) {
        const T* g = z + i * V;
        if (r0 == 0 && i == 0) {
          for (std::int64_t j = first; j < last; ++j) db[j] = g[j];
        } else {
          for (std::int64_t j = first; j < last; ++j) db[j] += g[j];
        }
      }
    });
  }
}

template <class S>
void linear_cross_entropy(const LinearCrossEntropyArgs<S>& a) {
  using T = compute_t<S>;
  if (a.n <= 0) return;
  const std::int64_t chunk = chunk_tokens(a);
  Scratch<T> z(chunk * a.v);
  const bool grads = a.d_hidden != nullptr;
  // dW and db: straight into the outputs for float32 / float64; 16-bit ones are summed in float32
  // and rounded once at the end
  constexpr bool narrow_out = is_16bit<S>;
  Scratch<T> dw_acc(narrow_out && grads ? a.v * a.d : 1);
  Scratch<T> db_acc(a.d_bias && narrow_out ? a.v : 1);
  T* dw = nullptr;
  T* db = nullptr;
  if (grads) {
    if constexpr (narrow_out) {
      dw = dw_acc.data;
      db = a.d_bias ? db_acc.data : nullptr;
    } else {
      dw = a.d_weight;
      db = a.d_bias;
    }
  }
  for (std::int64_t r0 = 0; r0 < a.n; r0 += chunk) {
    if (interrupted()) return;  // Note [interrupts] (dispatch/threads.cpp)
    run_chunk(a, r0, a.n - r0 < chunk ? a.n - r0 : chunk, z.data, dw, db);
  }
  if constexpr (narrow_out) {
    if (!grads) return;
    const std::int64_t total = a.v * a.d;
    parallel_for(total, 1, [&](std::int64_t first, std::int64_t last) {
      for (std::int64_t i = first; i < last; ++i) a.d_weight[i] = narrow<S>(dw[i]);
    });
    if (db)
      for (std::int64_t j = 0; j < a.v; ++j) a.d_bias[j] = narrow<S>(db[j]);
  }
}

}  // namespace

void linear_cross_entropy_f32(const LinearCrossEntropyArgs<float>& args) {
  linear_cross_entropy(args);
}
void linear_cross_entropy_f64(const LinearCrossEntropyArgs<double>& args) {
  linear_cross_entropy(args);
}
void linear_cross_entropy_bf16(const LinearCrossEntropyArgs<bf16>& args) {
  linear_cross_entropy(args);
}
void linear_cross_entropy_f16(const LinearCrossEntropyArgs<f16>& args) {
  linear_cross_entropy(args);
}

MLMATH_ISA_END
