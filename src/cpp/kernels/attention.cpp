// Scaled dot-product attention forward, blocked with an online softmax (FlashAttention):
//
//   S = Q K^T * scale (+ float mask; boolean and causal masks select -inf),
//   P = softmax over the keys (fully masked rows: P = 0),  O = P V,  lse = log sum_j exp S.
//
// Per task, one block of BQ queries of one (batch, query head), the keys are visited in blocks
// of BK = KC keys, keeping per query the running max m, the running sum l and the unnormalised
// output, all in transposed form so that the per-query statistics are vectors along the
// queries:
//   S^T (BK x BQ) = K_blk (BK x D) . (Q_blk * scale)^T (D x BQ)      (GEMM: K packed once)
//   m' = max(m, max_j S^T[j]),  P^T = exp(S^T - m'),  l = e^{m - m'} l + sum_j P^T[j]
//   O^T (Dv x BQ) = e^{m - m'} O^T + V_blk^T (Dv x BK) . P^T          (GEMM: V^T packed once)
// and at the end out = O^T^T / l, lse = m + log l.  Scratch per task is O(BK * BQ + D * BQ),
// never L x L.  Key blocks wholly above the causal diagonal are skipped.  Each output row is
// computed by one task in a fixed order: results do not depend on the number of threads.
//
// Few queries against a long cache (decoding) take their own path instead: chunks of keys read
// in place for every query head of a kv head's group, merged by log-sum-exp (Note [decode]).
//
// Options (issue 22): a sliding window limits the visited key blocks like causal does (Note
// [attention band]); softcapping and ALiBi transform each block of raw scores before the masks
// (transform_block); a sink joins l when a row is finished.
//
// Dropout (Note [dropout hash]) multiplies P^T by keep / (1 - p) before the second GEMM; the
// returned lse is that of the undropped scores.
//
// 16-bit storage (bf16, f16; Note [16-bit storage] in common/half.h): the kernels are templated
// on the storage type S and compute in T = compute_t<S> (float for 16-bit).  q, k, v (and
// grad_out, out in the backward) are widened where they are packed or transposed into the
// float scratch the float32 machinery runs on; the statistics, a float mask and the lse are
// float; out, dq, dk and dv are each rounded once, when stored, from float sums (dk and dv over
// the query heads of a group and every query block, dq over every key group).
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/gemm_core.h"
#include "common/parallel.h"
#include "common/vmath.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

namespace {

// Note [dropout hash]
// Whether weight (bh, i, j) survives dropout: a counter-based hash, so any block of the matrix
// can be drawn in any order (the reference implements the same, reference/transformer_attention):
//   key  = mix(seed ^ (bh * 0x9E3779B97F4A7C15)),  bits = mix(key ^ (((i << 32) | j) *
//   0xD1B54A32D192ED03)) keep = (bits >> 40) / 2^24 >= p
// with mix the splitmix64 finaliser and bh = batch * Hq + query head.
inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Queries per task (a multiple of every ISA's NR) and keys per block (one KC block of V^T).
constexpr std::int64_t kBlockQ = 96;

// Note [attention band]
// Which keys a query may see under causal and the sliding window together: query i sits at key
// position i + off (off = lk - lq in the lower-right alignment, else 0) and sees the keys
//   i + off - left <= j <= i + off + right,
// where -1 leaves a side unlimited and causal makes right 0 (the window is intersected with it).
// Blocks of keys wholly outside a block's band are never visited (the cost of a window is
// O(L x window)), and blocks wholly inside it are not masked.  With kv_len, batch b has lk =
// kv_len[b] keys (the alignment follows: off = kv_len[b] - lq) and keys past it do not exist.
struct Band {
  std::int64_t off, left, right, lq, lk;
  template <class S>
  Band(const AttentionArgs<S>& a, std::int64_t b)
      : off(a.causal == 2 ? keys(a, b) - a.lq : 0),
        left(a.window_left),
        right(a.causal != 0 ? 0 : a.window_right),
        lq(a.lq),
        lk(keys(a, b)) {}
  template <class S>
  static std::int64_t keys(const AttentionArgs<S>& a, std::int64_t b) {
    return a.kv_len != nullptr ? a.kv_len[b] : a.lk;
  }
  static std::int64_t clamp(std::int64_t x, std::int64_t hi) { return x < 0 ? 0 : x < hi ? x : hi; }
  bool limited() const { return left >= 0 || right >= 0; }
  // keys [key_begin(i0), key_end(i1)) are those queries [i0, i1) may see (none if begin >= end)
  std::int64_t key_begin(std::int64_t i0) const {
    return left < 0 ? 0 : clamp(i0 + off - left, lk);
  }
  std::int64_t key_end(std::int64_t i1) const {
    return right < 0 ? lk : clamp(i1 + off + right, lk);
  }
  // queries [query_begin(j0), query_end(j1)) are those that may see a key of [j0, j1)
  std::int64_t query_begin(std::int64_t j0) const {
    return right < 0 ? 0 : clamp(j0 - off - right, lq);
  }
  std::int64_t query_end(std::int64_t j1) const {
    return left < 0 ? lq : clamp(j1 - off + left, lq);
  }
  // whether every query of [i0, i1) sees every key of [j0, j1)
  bool covers(std::int64_t i0, std::int64_t i1, std::int64_t j0, std::int64_t j1) const {
    return (left < 0 || j0 >= i1 - 1 + off - left) && (right < 0 || j1 - 1 <= i0 + off + right) &&
           j1 <= lk;
  }
};

// Softcapping and ALiBi on a block of raw scores s[(i - i0) * si + (j - j0) * sj] of query head
// h (queries i0 <= i < i0 + nq, keys j0 <= j < j0 + nk), one of si and sj being 1:
//   s = c tanh(s / c)          (tanh kept in tanh_out, laid out like s, when it is not null)
//   s -= slope_h |i + off - j|
template <class S, class T>
void transform_block(const AttentionArgs<S>& a, const Band& band, std::int64_t h, std::int64_t i0,
                     std::int64_t nq, std::int64_t j0, std::int64_t nk, T* s, std::int64_t si,
                     std::int64_t sj, T* tanh_out) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const bool queries_inner = si == 1;  // S^T (the forward) rather than S (the backward)
  const std::int64_t n_outer = queries_inner ? nk : nq, n_inner = queries_inner ? nq : nk;
  const std::int64_t stride = queries_inner ? sj : si;
  const std::int64_t off = band.off;
  const T cap = a.softcap, inv_cap = cap > T(0) ? T(1) / cap : T(0);
  const T slope = a.alibi != nullptr ? a.alibi[h] : T(0);
  T lane[W];
  for (std::int64_t e = 0; e < W; ++e) lane[e] = T(e);
  const V iota = V::load(lane);
  for (std::int64_t o = 0; o < n_outer; ++o) {
    T* row = s + o * stride;
    T* trow = tanh_out != nullptr ? tanh_out + o * stride : nullptr;
    // |i + off - j| = |inner index - t|
    const T t = queries_inner ? T(j0 + o - i0 - off) : T(i0 + o + off - j0);
    for (std::int64_t c = 0; c < n_inner; c += W) {
      const std::int64_t n = n_inner - c < W ? n_inner - c : W;
      V x = n == W ? V::load(row + c) : V::load_partial(row + c, n, T(0));
      if (cap > T(0)) {
        const V th = tanh(mul(x, V::set1(inv_cap)));
        if (trow != nullptr) (n == W ? th.store(trow + c) : th.store_partial(trow + c, n));
        x = mul(th, V::set1(cap));
      }
      if (a.alibi != nullptr) {
        const V d = sub(add(iota, V::set1(T(c))), V::set1(t));
        x = sub(x, mul(V::set1(slope), max(d, sub(V::set1(T(0)), d))));
      }
      if (n == W) {
        x.store(row + c);
      } else {
        x.store_partial(row + c, n);
      }
    }
  }
}

// The masks, by selection, on a block of scores of (batch b, query head h):
// s[(i - i0) * si + (j - j0) * sj] for queries i0 <= i < i0 + nq and keys j0 <= j < j0 + nk.
// A float mask is added (a -inf entry selects -inf, whatever the score); a boolean mask and
// the band of causal and the window (Note [attention band]) select -inf.
template <class S, class T>
void mask_block(const AttentionArgs<S>& a, const Band& band, std::int64_t b, std::int64_t h,
                std::int64_t i0, std::int64_t nq, std::int64_t j0, std::int64_t nk, T* s,
                std::int64_t si, std::int64_t sj) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const std::int64_t* ms = a.mask_stride;
  for (std::int64_t i = 0; i < nq; ++i) {
    T* row = s + i * si;
    if (a.mask != nullptr) {
      const std::int64_t base = b * ms[0] + h * ms[1] + (i0 + i) * ms[2] + j0 * ms[3];
      if (a.mask_is_bool) {
        const auto* mk = static_cast<const std::uint8_t*>(a.mask) + base;
        for (std::int64_t j = 0; j < nk; ++j)
          if (!mk[j * ms[3]]) row[j * sj] = neg_inf;
      } else {
        const T* mk = static_cast<const T*>(a.mask) + base;
        for (std::int64_t j = 0; j < nk; ++j) {  // a -inf entry masks by selection too
          const T mv = mk[j * ms[3]];
          row[j * sj] = mv == neg_inf ? neg_inf : row[j * sj] + mv;
        }
      }
    }
    if (band.limited() || j0 + nk > band.lk) {  // keys j0 + j outside [lo, hi] of query i0 + i
      const std::int64_t pos = i0 + i + band.off - j0;
      const std::int64_t lo = band.left < 0 ? 0 : pos - band.left;
      std::int64_t hi = band.right < 0 ? nk : pos + band.right + 1;
      hi = hi < band.lk - j0 ? hi : band.lk - j0;
      for (std::int64_t j = 0; j < nk && j < lo; ++j) row[j * sj] = neg_inf;
      for (std::int64_t j = hi < 0 ? 0 : hi; j < nk; ++j) row[j * sj] = neg_inf;
    }
  }
}

// Note [dropout hash] applied to a block laid out like mask_block's: weights that survive are
// multiplied by keep_scale = 1 / (1 - p), the others set to 0.
template <class S, class T>
void dropout_block(const AttentionArgs<S>& a, std::int64_t bh, std::int64_t i0, std::int64_t nq,
                   std::int64_t j0, std::int64_t nk, T* s, std::int64_t si, std::int64_t sj) {
  const std::uint64_t key = mix64(
      a.seed ^ (static_cast<std::uint64_t>(a.dropout_bh_offset + bh) * 0x9E3779B97F4A7C15ULL));
  const std::uint64_t threshold =
      static_cast<std::uint64_t>(std::ceil(a.dropout_p * static_cast<double>(1 << 24)));
  const T keep_scale = T(1.0 / (1.0 - a.dropout_p));
  for (std::int64_t i = 0; i < nq; ++i) {
    const std::uint64_t hi = static_cast<std::uint64_t>(i0 + i) << 32;
    for (std::int64_t j = 0; j < nk; ++j) {
      const std::uint64_t ctr = hi | static_cast<std::uint64_t>(j0 + j);
      const std::uint64_t bits = mix64(key ^ (ctr * 0xD1B54A32D192ED03ULL));
      T& x = s[i * si + j * sj];
      x = (bits >> 40) >= threshold ? x * keep_scale : T(0);
    }
  }
}

// A finished row of query head h, from its statistics m (max) and l (sum of exp(s - m)):
// out = O * inv (0 for rows that saw no key), lse = m + log l.  A sink joins l with its logit:
// m' = max(m, sink), l' = e^{m - m'} l + e^{sink - m'}, out = e^{m - m'} O / l'.
template <class T>
struct RowEnd {
  T inv, lse;
  template <class S>
  RowEnd(const AttentionArgs<S>& a, std::int64_t h, T m, T l) {
    const T neg_inf = -std::numeric_limits<T>::infinity();
    T weight = T(1);
    if (a.sinks != nullptr && a.sinks[h] != neg_inf) {  // a sink of -inf is none
      const T sink = a.sinks[h], m_all = m > sink ? m : sink;
      weight = l == T(0) ? T(0) : std::exp(m - m_all);
      l = weight * l + std::exp(sink - m_all);
      m = m_all;
    }
    inv = l == T(0) ? T(0) : weight / l;
    lse = l == T(0) ? neg_inf : m + std::log(l);
  }
};

// Note [decode]
// Few queries against a long cache (Lq <= kDecodeMaxQueries, at most kDecodeMaxRows query rows
// per kv head): the GEMM path would pack all of K and V (a copy of the cache) for a handful of
// columns, and its tasks (batch x query heads) leave threads idle when there are few heads.
// Here each task takes one (batch, kv head) and one chunk of keys (flash-decoding):
//   - the rows of every query head of the kv head's group (R = group x Lq) are served by one
//     pass over the chunk's keys and values, read in place (GQA reads each kv head once);
//   - scores by dot products along D, s (R x chunk) = Q K^T; transform, masks, softmax within
//     the chunk: m = max, p = exp(s - m), l = sum p; then O (R x Dv) = P V in register tiles
//     over blocks of keys;
//   - the partial (m, l, O) of every chunk is merged in chunk order:
//       M = max_c m_c,  L = sum_c e^{m_c - M} l_c,  out = sum_c e^{m_c - M} O_c / L.
// The chunk length depends on the shapes (and num_splits) only, never on the thread count, so
// the result is bitwise the same for any number of threads.
constexpr std::int64_t kDecodeMaxQueries = 16;
// Beyond this many rows per kv head the GEMM path's register blocking does the score and value
// products more cheaply than dot products.  Measured (Lk 32768, D 128, one kv head, 2 threads,
// microseconds per query row): this path 247 at 32 rows, 242 at 64, 245 at 128; the GEMM path
// 744 at 40 rows (Hq 8, Lq 5; its query blocks are mostly padding), 264 at 64, 205 at 128.
constexpr std::int64_t kDecodeMaxRows = 64;
// Keys per chunk when num_splits is 0: four GEMM key blocks (768) amortise a chunk's setup and
// its partial output (R x Dv values written and merged per 768 x (D + Dv) read) and still make
// 42 chunks of a 32768-key cache, enough for 16 threads with one (batch, kv head).
constexpr std::int64_t kDecodeChunkKeys = 768;
// Cap on the partial outputs held for the merge (values): longer chunks beyond it.
constexpr std::int64_t kDecodePartialValues = std::int64_t{1} << 24;

template <class St>
bool use_decode(const AttentionArgs<St>& a) {
  return a.lq <= kDecodeMaxQueries && a.hq / a.hkv * a.lq <= kDecodeMaxRows;
}

// s[r * ss + j] = q_r . k_j (D values) for rows r < NR of q (row stride qs, zero-padded to whole
// vectors) and keys j < NK (row stride ks): NK keys share each load of q.
template <int NR, int NK, class St, class T>
void dot_tile(const T* q, std::int64_t qs, const St* k, std::int64_t ks, std::int64_t D, T* s,
              std::int64_t ss) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  V acc[NR][NK];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NK; ++j) acc[r][j] = V::set1(T(0));
  auto step = [&](std::int64_t d, const V(&kv)[NK]) {
    for (int r = 0; r < NR; ++r) {
      const V qv = V::load(q + r * qs + d);
      for (int j = 0; j < NK; ++j) acc[r][j] = fma(kv[j], qv, acc[r][j]);
    }
  };
  std::int64_t d = 0;
  for (; d + W <= D; d += W) {
    V kv[NK];
    for (int j = 0; j < NK; ++j) kv[j] = V::load(k + j * ks + d);
    step(d, kv);
  }
  if (d < D) {
    V kv[NK];
    for (int j = 0; j < NK; ++j) kv[j] = V::load_partial(k + j * ks + d, D - d, T(0));
    step(d, kv);
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NK; ++j) s[r * ss + j] = reduce_add(acc[r][j]);
}

// Bytes of a cache line, the unit of prefetch.
constexpr std::int64_t kCacheLine = 64;
// How far ahead of the keys being multiplied their rows are prefetched: 16 keys of D = 128 are
// 8 KB in float32, about the memory latency's worth of reading at the rate one core consumes.
constexpr std::int64_t kDecodePrefetchKeys = 16;

// Prefetch n bytes from p, a cache line at a time.
inline void prefetch_bytes(const void* p, std::int64_t n) {
  for (std::int64_t b = 0; b < n; b += kCacheLine) prefetch(static_cast<const char*>(p) + b);
}

// Scores of rows r < R against keys j < nk: s[r * ss + j] = q_r . k_j.
template <class St, class T>
void decode_scores(const T* q, std::int64_t qs, std::int64_t R, const St* k, std::int64_t nk,
                   std::int64_t D, T* s, std::int64_t ss) {
  const std::int64_t row_bytes = D * static_cast<std::int64_t>(sizeof(St));
  // the NK keys from j against every row, four rows at a time
  auto keys = [&](auto nk_keys, std::int64_t j) {
    constexpr int NK = decltype(nk_keys)::value;
    std::int64_t r = 0;
    for (; r + 4 <= R; r += 4) dot_tile<4, NK>(q + r * qs, qs, k + j * D, D, D, s + r * ss + j, ss);
    for (; r < R; ++r) dot_tile<1, NK>(q + r * qs, qs, k + j * D, D, D, s + r * ss + j, ss);
  };
  std::int64_t j = 0;
  for (; j + 2 <= nk; j += 2) {
    if (j + kDecodePrefetchKeys + 2 <= nk)
      prefetch_bytes(k + (j + kDecodePrefetchKeys) * D, 2 * row_bytes);
    keys(std::integral_constant<int, 2>{}, j);
  }
  if (j < nk) keys(std::integral_constant<int, 1>{}, j);
}

// o[r * os + c] += sum_{j < nk} p[r * ps + j] v[j * vs + c] for rows r < NR and the columns of NV
// vectors from c = 0; the accumulators stay in registers over the keys.
template <int NR, int NV, class T>
void pv_tile(const T* p, std::int64_t ps, const T* v, std::int64_t vs, std::int64_t nk, T* o,
             std::int64_t os) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  V acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = V::load(o + r * os + n * W);
  for (std::int64_t j = 0; j < nk; ++j) {
    V vv[NV];
    for (int n = 0; n < NV; ++n) vv[n] = V::load(v + j * vs + n * W);
    for (int r = 0; r < NR; ++r) {
      const V pr = V::set1(p[r * ps + j]);
      for (int n = 0; n < NV; ++n) acc[r][n] = fma(pr, vv[n], acc[r][n]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n].store(o + r * os + n * W);
}

// Keys per block of values: at Dv = 128 a block (16 KB in float32) stays in a 32 KB L1 while
// the tiles of columns pass over it.
constexpr std::int64_t kDecodeValueKeys = 32;

// O (R x Dvp, row stride os) += P (R x nk, row stride ps) V (nk x Dv, row stride Dv), a block of
// keys at a time: the block is first copied (widened) in row order into vb (kDecodeValueKeys x
// Dvp, zero past Dv), a sequential read that the hardware prefetchers stream at full rate (the
// tiles' column strips would meet the memory latency at every row), then multiplied in tiles
// of 4 rows x 2 vectors of columns.
template <class St, class T>
void decode_values(const T* p, std::int64_t ps, std::int64_t R, const St* v, std::int64_t nk,
                   std::int64_t Dv, std::int64_t Dvp, T* vb, T* o, std::int64_t os) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  auto rows = [&](auto nr, std::int64_t r, std::int64_t j0, std::int64_t nb) {
    constexpr int NR = decltype(nr)::value;
    std::int64_t c = 0;
    for (; c + 2 * W <= Dvp; c += 2 * W)
      pv_tile<NR, 2>(p + r * ps + j0, ps, vb + c, Dvp, nb, o + r * os + c, os);
    if (c < Dvp) pv_tile<NR, 1>(p + r * ps + j0, ps, vb + c, Dvp, nb, o + r * os + c, os);
  };
  const std::int64_t full = Dv / W * W;
  for (std::int64_t j0 = 0; j0 < nk; j0 += kDecodeValueKeys) {
    const std::int64_t nb = nk - j0 < kDecodeValueKeys ? nk - j0 : kDecodeValueKeys;
    for (std::int64_t j = 0; j < nb; ++j) {
      const St* src = v + (j0 + j) * Dv;
      T* dst = vb + j * Dvp;
      for (std::int64_t c = 0; c < full; c += W) V::load(src + c).store(dst + c);
      if (full < Dv) V::load_partial(src + full, Dv - full, T(0)).store(dst + full);
    }
    std::int64_t r = 0;
    for (; r + 4 <= R; r += 4) rows(std::integral_constant<int, 4>{}, r, j0, nb);
    for (; r < R; ++r) rows(std::integral_constant<int, 1>{}, r, j0, nb);
  }
}

template <class St>
void attention_decode(const AttentionArgs<St>& a) {
  using T = compute_t<St>;
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const std::int64_t D = a.d, Dv = a.dv, Lq = a.lq, Lk = a.lk;
  const std::int64_t group = a.hq / a.hkv, R = group * Lq;
  const std::int64_t Dp = (D + W - 1) / W * W, Dvp = (Dv + W - 1) / W * W;
  const std::int64_t groups = a.batch * a.hkv;
  // chunk length: a multiple of the vector width, from the shapes only
  std::int64_t chunk = a.num_splits > 0 ? (Lk + a.num_splits - 1) / a.num_splits : kDecodeChunkKeys;
  chunk = chunk < 1 ? 1 : (chunk + W - 1) / W * W;
  auto count = [&](std::int64_t c) { return Lk == 0 ? 1 : (Lk + c - 1) / c; };
  while (groups * count(chunk) * R * (Dvp + 2) > kDecodePartialValues && count(chunk) > 1)
    chunk *= 2;
  const std::int64_t chunks = count(chunk), tasks = groups * chunks;
  Scratch<T> part_o(tasks * R * Dvp), part_m(tasks * R), part_l(tasks * R);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const bool transformed = a.softcap > T(0) || a.alibi != nullptr;
  const std::int64_t Cs = (chunk + W - 1) / W * W;  // row stride of the scores
  parallel_for(tasks, chunk * (D + Dv) * (R + 1), [&](std::int64_t t0, std::int64_t t1) {
    Scratch<T> qs(R * Dp + 1), s(R * Cs + 1), vb(kDecodeValueKeys * Dvp + 1);
    for (std::int64_t t = t0; t < t1; ++t) {
      if (interrupted()) return;  // Note [interrupts] (dispatch/threads.cpp)
      const std::int64_t g = t / chunks, c = t % chunks, b = g / a.hkv, hk = g % a.hkv;
      const Band band(a, b);
      const std::int64_t lo = band.key_begin(0), hi = band.key_end(Lq);
      const std::int64_t j0 = c * chunk > lo ? c * chunk : lo;
      const std::int64_t j1 = (c + 1) * chunk < hi ? (c + 1) * chunk : hi;
      T* m = part_m.data + t * R;
      T* l = part_l.data + t * R;
      T* o = part_o.data + t * R * Dvp;
      for (std::int64_t r = 0; r < R; ++r) m[r] = neg_inf, l[r] = T(0);
      if (j0 >= j1) continue;  // no key of this chunk is seen: merged with weight 0
      const std::int64_t nk = j1 - j0, nkp = (nk + W - 1) / W * W;
      const std::int64_t bh0 = b * a.hq + hk * group;  // the group's first query head
      const St* kh = a.k + b * a.k_batch_stride + (hk * Lk + j0) * D;  // stride 0: shared
      const St* vh = a.v + b * a.v_batch_stride + (hk * Lk + j0) * Dv;
      for (std::int64_t r = 0; r < R; ++r) {  // rows of the group's queries, scaled
        const St* qr = a.q + (bh0 * Lq + r) * D;
        for (std::int64_t d = 0; d < Dp; ++d)
          qs.data[r * Dp + d] = d < D ? widen(qr[d]) * a.scale : T(0);
      }
      decode_scores(qs.data, Dp, R, kh, nk, D, s.data, Cs);
      for (std::int64_t hh = 0; hh < group; ++hh) {
        T* sh = s.data + hh * Lq * Cs;
        if (transformed)
          transform_block(a, band, hk * group + hh, 0, Lq, j0, nk, sh, Cs, std::int64_t{1},
                          static_cast<T*>(nullptr));
        if (a.mask != nullptr || !band.covers(0, Lq, j0, j1))
          mask_block(a, band, b, hk * group + hh, 0, Lq, j0, nk, sh, Cs, std::int64_t{1});
      }
      for (std::int64_t r = 0; r < R; ++r) {  // softmax within the chunk
        T* row = s.data + r * Cs;
        for (std::int64_t j = nk; j < nkp; ++j) row[j] = neg_inf;
        V mv = V::set1(neg_inf);
        for (std::int64_t j = 0; j < nkp; j += W) mv = max(mv, V::load(row + j));
        const T mr = reduce_max(mv);
        m[r] = mr;
        const V ms = V::set1(mr == neg_inf ? T(0) : mr);  // a row with no key: p = 0
        V sum = V::set1(T(0));
        for (std::int64_t j = 0; j < nkp; j += W) {
          const V e = exp(sub(V::load(row + j), ms));
          e.store(row + j);
          sum = add(sum, e);
        }
        l[r] = reduce_add(sum);
      }
      if (a.dropout_p > 0)
        for (std::int64_t hh = 0; hh < group; ++hh)
          dropout_block(a, bh0 + hh, 0, Lq, j0, nk, s.data + hh * Lq * Cs, Cs, std::int64_t{1});
      for (std::int64_t e = 0; e < R * Dvp; ++e) o[e] = T(0);
      decode_values(s.data, Cs, R, vh, nk, Dv, Dvp, vb.data, o, Dvp);
    }
  });
  // an interrupted call raises: tasks skipped above left their partials unset, so no merge
  if (interrupted()) return;
  // the merge, in chunk order, and the sinks (as in attention's finalisation)
  parallel_for(groups, chunks * R * Dvp, [&](std::int64_t g0, std::int64_t g1) {
    Scratch<T> acc(Dvp);
    for (std::int64_t g = g0; g < g1; ++g) {
      const std::int64_t b = g / a.hkv, hk = g % a.hkv;
      for (std::int64_t r = 0; r < R; ++r) {
        const std::int64_t h = hk * group + r / Lq, row = (b * a.hq + h) * Lq + r % Lq;
        T mc = neg_inf;
        for (std::int64_t c = 0; c < chunks; ++c) {
          const T mi = part_m.data[(g * chunks + c) * R + r];
          mc = mi > mc ? mi : mc;
        }
        T lc = T(0);
        for (std::int64_t d = 0; d < Dvp; ++d) acc.data[d] = T(0);
        for (std::int64_t c = 0; c < chunks; ++c) {
          const std::int64_t t = g * chunks + c;
          // a chunk that saw no key (its o is not even written); NaN scores leave m = -inf
          // with l = NaN, which must reach the result
          if (part_m.data[t * R + r] == neg_inf && part_l.data[t * R + r] == T(0)) continue;
          const T w = std::exp(part_m.data[t * R + r] - mc);
          lc += w * part_l.data[t * R + r];
          const T* oc = part_o.data + (t * R + r) * Dvp;
          for (std::int64_t d = 0; d < Dvp; d += W)
            fma(V::set1(w), V::load(oc + d), V::load(acc.data + d)).store(acc.data + d);
        }
        const RowEnd<T> end(a, h, mc, lc);
        for (std::int64_t d = 0; d < Dv; ++d)
          a.out[row * Dv + d] = narrow<St>(acc.data[d] * end.inv);
        if (a.lse != nullptr) a.lse[row] = end.lse;
      }
    }
  });
}

template <class St>
void attention(const AttentionArgs<St>& a) {
  using T = compute_t<St>;
  using S = GemmShape<T>;
  using V = Vec<T>;
  constexpr std::int64_t W = V::width, BQ = kBlockQ, BK = S::KC;
  const std::int64_t D = a.d, Dv = a.dv, Lq = a.lq, Lk = a.lk;
  if (a.batch == 0 || a.hq == 0 || Lq == 0) return;
  if (use_decode(a)) return attention_decode(a);  // Note [decode]
  const std::int64_t group = a.hq / a.hkv;        // query heads per kv head
  // K of every (batch, kv head) packed once as the first GEMM's A (Lk x D), V^T as the
  // second's (Dv x Lk) (Note [prepacked A] in gemm_core.h).  With kv_len, batch b's packs hold
  // its kv_len[b] keys only (one pack per batch even for a shared cache): no key past them is
  // ever multiplied, so whatever a preallocated cache holds there cannot reach the output.
  const bool per_batch = a.kv_len != nullptr;
  const std::int64_t kv_batches = per_batch || a.k_batch_stride != 0 ? a.batch : 1;
  const std::int64_t v_batches = per_batch || a.v_batch_stride != 0 ? a.batch : 1;
  auto packed_keys = [&](std::int64_t pb) { return per_batch ? a.kv_len[pb] : Lk; };
  auto ksize = [&](std::int64_t pb) { return (packed_keys(pb) + S::MR - 1) / S::MR * S::MR * D; };
  auto vsize = [&](std::int64_t pb) { return (Dv + S::MR - 1) / S::MR * S::MR * packed_keys(pb); };
  std::vector<std::int64_t> koff(kv_batches + 1, 0), voff(v_batches + 1, 0);  // per batch
  for (std::int64_t pb = 0; pb < kv_batches; ++pb) koff[pb + 1] = koff[pb] + a.hkv * ksize(pb);
  for (std::int64_t pb = 0; pb < v_batches; ++pb) voff[pb + 1] = voff[pb] + a.hkv * vsize(pb);
  Scratch<T> kpack(koff[kv_batches] + 1), vpack(voff[v_batches] + 1);
  parallel_for(kv_batches * a.hkv, Lk * D, [&](std::int64_t h0, std::int64_t h1) {
    for (std::int64_t h = h0; h < h1; ++h) {
      const std::int64_t pb = h / a.hkv, hk = h % a.hkv, lp = packed_keys(pb);
      const St* kh = a.k + pb * a.k_batch_stride + hk * Lk * D;
      prepack_a<T>(
          lp, D,
          [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
            pack_a_strided(kh, D, std::int64_t{1}, lp, i0, mc, k0, kc, dst);
          },
          kpack.data + koff[pb] + hk * ksize(pb));
    }
  });
  parallel_for(v_batches * a.hkv, Lk * Dv, [&](std::int64_t h0, std::int64_t h1) {
    for (std::int64_t h = h0; h < h1; ++h) {
      const std::int64_t pb = h / a.hkv, hk = h % a.hkv;
      const St* vh = a.v + pb * a.v_batch_stride + hk * Lk * Dv;
      prepack_a<T>(
          Dv, packed_keys(pb),
          [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
            pack_a_strided(vh, std::int64_t{1}, Dv, Dv, i0, mc, k0, kc, dst);
          },
          vpack.data + voff[pb] + hk * vsize(pb));
    }
  });

  const std::int64_t qblocks = (Lq + BQ - 1) / BQ;
  const std::int64_t tasks = a.batch * a.hq * qblocks;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const bool transformed = a.softcap > T(0) || a.alibi != nullptr;
  parallel_for(tasks, BQ * Lk * (D + Dv) * 2, [&](std::int64_t t0, std::int64_t t1) {
    Scratch<T> qt(D * BQ + 1), st(BK * BQ), ot(Dv * BQ + 1), m(BQ), l(BQ), alpha(BQ);
    for (std::int64_t t = t0; t < t1; ++t) {
      if (interrupted()) return;  // Note [interrupts] (dispatch/threads.cpp)
      const std::int64_t bh = t / qblocks, i0 = t % qblocks * BQ;
      const std::int64_t b = bh / a.hq, h = bh % a.hq, hk = h / group;
      const std::int64_t nq = Lq - i0 < BQ ? Lq - i0 : BQ;
      const std::int64_t nc = (nq + W - 1) / W * W;  // the columns computed (a short last block)
      const St* qb = a.q + (bh * Lq + i0) * D;
      const Band band(a, b);
      const std::int64_t kb = kv_batches == 1 ? 0 : b, vb = v_batches == 1 ? 0 : b;
      const T* kp = kpack.data + koff[kb] + hk * ksize(kb);
      const T* vp = vpack.data + voff[vb] + hk * vsize(vb);
      const std::int64_t Lp = packed_keys(kb);  // the keys packed (== packed_keys(vb))
      // (Q_blk * scale)^T, zero past the last query
      for (std::int64_t dd = 0; dd < D; ++dd) {
        T* row = qt.data + dd * BQ;
        for (std::int64_t c = 0; c < nq; ++c) row[c] = widen(qb[c * D + dd]) * a.scale;
        for (std::int64_t c = nq; c < BQ; ++c) row[c] = T(0);
      }
      for (std::int64_t c = 0; c < BQ; ++c) {
        m.data[c] = neg_inf;
        l.data[c] = T(0);
      }
      for (std::int64_t e = 0; e < Dv * BQ; ++e) ot.data[e] = T(0);
      // the key blocks this block of queries may see (Note [attention band]); blocks start at
      // multiples of BK, as V^T's packed blocks do
      const std::int64_t kbegin = band.key_begin(i0) / BK * BK, kend = band.key_end(i0 + nq);
      for (std::int64_t j0 = kbegin; j0 < kend; j0 += BK) {
        const std::int64_t nk = kend - j0 < BK ? kend - j0 : BK;
        gemm_rows<T>(
            nk, nc, D,
            [&](std::int64_t r0, std::int64_t, std::int64_t k0, std::int64_t, T*) -> const T* {
              return kp + prepacked_a_index<T>(Lp, j0 + r0, D, k0);
            },
            [&](std::int64_t dd) { return qt.data + dd * BQ; }, st.data, BQ);
        if (transformed)
          transform_block(a, band, h, i0, nq, j0, nk, st.data, std::int64_t{1}, BQ,
                          static_cast<T*>(nullptr));
        // masks, by selection (S^T: queries along a row)
        if (a.mask != nullptr || !band.covers(i0, i0 + nq, j0, j0 + nk))
          mask_block(a, band, b, h, i0, nq, j0, nk, st.data, std::int64_t{1}, BQ);
        // online softmax, a vector of queries at a time
        for (std::int64_t c = 0; c < nc; c += W) {
          V mb = V::set1(neg_inf);
          for (std::int64_t j = 0; j < nk; ++j) mb = max(mb, V::load(st.data + j * BQ + c));
          const V m_old = V::load(m.data + c);
          const V m_new = max(m_old, mb);
          m_new.store(m.data + c);
          // a row with no key yet keeps m = -inf: subtract 0 instead (exp(-inf) = 0)
          T mn[W], mo[W];
          m_new.store(mn);
          m_old.store(mo);
          for (std::int64_t e = 0; e < W; ++e) {
            if (mn[e] == neg_inf) mn[e] = T(0);
            mo[e] = mo[e] - mn[e];
          }
          const V m_safe = V::load(mn);
          const V al = exp(V::load(mo));
          al.store(alpha.data + c);
          V sum = V::set1(T(0));
          for (std::int64_t j = 0; j < nk; ++j) {
            T* p = st.data + j * BQ + c;
            const V e = exp(sub(V::load(p), m_safe));
            e.store(p);
            sum = add(sum, e);
          }
          fma(al, V::load(l.data + c), sum).store(l.data + c);
        }
        for (std::int64_t dd = 0; dd < Dv; ++dd) {  // O^T rows *= alpha
          T* row = ot.data + dd * BQ;
          for (std::int64_t c = 0; c < nc; c += W)
            mul(V::load(row + c), V::load(alpha.data + c)).store(row + c);
        }
        if (a.dropout_p > 0) dropout_block(a, bh, i0, nq, j0, nk, st.data, std::int64_t{1}, BQ);
        // V^T's block is packed for kc = min(BK, Lp - j0) keys: a block cut shorter (causal,
        // window, kv_len) runs over the whole block with zero weights for the keys it lacks
        const std::int64_t kc = Lp - j0 < BK ? Lp - j0 : BK;
        for (std::int64_t e = nk * BQ; e < kc * BQ; ++e) st.data[e] = T(0);
        gemm_rows<T>(
            Dv, nc, kc,
            [&](std::int64_t r0, std::int64_t, std::int64_t, std::int64_t, T*) -> const T* {
              return vp + prepacked_a_index<T>(Dv, r0, Lp, j0);
            },
            [&](std::int64_t j) { return st.data + j * BQ; }, ot.data, BQ, true);
      }
      St* ob = a.out + (bh * Lq + i0) * Dv;
      for (std::int64_t c = 0; c < nq; ++c) {
        const RowEnd<T> end(a, h, m.data[c], l.data[c]);
        for (std::int64_t dd = 0; dd < Dv; ++dd)
          ob[c * Dv + dd] = narrow<St>(ot.data[dd * BQ + c] * end.inv);
        if (a.lse != nullptr) a.lse[bh * Lq + i0 + c] = end.lse;
      }
    }
  });
}

// Note [dq partials]
// dQ_i sums over every key block.  Instead of a second pass that recomputes S and dP per query
// block (two more GEMMs), the key blocks are cut into at most kDqGroups groups, fixed by the
// shapes; the task of a group adds its dS K into the group's own partial dQ, and the partials
// are added in group order at the end: deterministic, and O(groups x Lq x D) memory per head
// (capped at kDqPartialValues values by using fewer groups).
constexpr std::int64_t kDqGroups = 8;
constexpr std::int64_t kDqPartialValues = std::int64_t{1} << 26;

// Backward (FlashAttention-2's recomputation, deterministic: no atomics).  With P = exp(S - lse)
// (0 where masked), Pd = P o keep / (1 - p), Dr_i = dO_i . O_i:
//   dV = Pd^T dO,   dPd = dO V^T,   dS = P o (dPd o keep / (1 - p) - Dr),
//   dK = scale dS^T Q,   dQ = scale dS K.
// One task per (kv batch, kv head, group of key blocks) sums, for each of its key blocks, dK and
// dV over its query heads, batches and query blocks in order, and adds dS K into the group's
// partial dQ (Note [dq partials]).  S, P and dPd are recomputed block by block, in the
// orientation whose GEMM operands are rows in place or cheap to pack: Q^T, dO^T, K^T and V^T
// are transposed once per head.
template <class St>
void attention_backward(const AttentionBackwardArgs<St>& g) {
  using T = compute_t<St>;
  using S = GemmShape<T>;
  using V = Vec<T>;
  constexpr bool same = std::is_same_v<St, T>;  // no widening (float, double)
  const AttentionArgs<St>& a = g.fwd;
  // query blocks of KC, so that they are the K blocks of the packed Q^T and dO^T
  constexpr std::int64_t W = V::width, BQ = S::KC, BK = S::KC;
  const std::int64_t D = a.d, Dv = a.dv, Lq = a.lq, Lk = a.lk, B = a.batch;
  // k and v: one batch for all (or neither).  Both strides must say so: with D = 0, k's stride
  // is 0 for any batch (a fuzz finding: dV of every batch was summed into one).
  const bool shared = a.k_batch_stride == 0 && a.v_batch_stride == 0;
  const std::int64_t kvb = shared ? 1 : B, group = a.hkv > 0 ? a.hq / a.hkv : 1;
  const std::int64_t kv_heads = kvb * a.hkv, q_heads = B * a.hq;
  for (std::int64_t e = 0; e < q_heads * Lq * D; ++e) g.dq[e] = St{};
  for (std::int64_t e = 0; e < kv_heads * Lk * D; ++e) g.dk[e] = St{};
  for (std::int64_t e = 0; e < kv_heads * Lk * Dv; ++e) g.dv[e] = St{};
  if (g.dsinks != nullptr)
    for (std::int64_t h = 0; h < a.hq; ++h) g.dsinks[h] = 0;
  if (q_heads == 0 || Lq == 0 || Lk == 0) return;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T inf = std::numeric_limits<T>::infinity();
  // per query head: (Q scale)^T [D][Lq], dO^T [Dv][Lq], Dr [Lq]; per kv head: K^T, V^T; rows
  // lq and lk apart, padded off multiples of 1 KiB (the GEMMs read blocks of these rows, which
  // would otherwise all fall into the same L1 sets for the usual power-of-two lengths)
  auto padded = [](std::int64_t n) {
    constexpr std::int64_t line = 64 / static_cast<std::int64_t>(sizeof(T));
    const std::int64_t ld = (n + line - 1) / line * line;
    return ld % (16 * line) == 0 ? ld + line : ld;
  };
  const std::int64_t lq_ = padded(Lq), lk_ = padded(Lk);
  Scratch<T> qt(q_heads * D * lq_ + 1), dot(q_heads * Dv * lq_ + 1), dr(q_heads * Lq);
  Scratch<T> kt(kv_heads * D * lk_ + 1), vt(kv_heads * Dv * lk_ + 1);
  // 16-bit K widened (the B rows of the dQ GEMM); float and double read k in place
  Scratch<T> kw(same ? 1 : kv_heads * Lk * D + 1);
  parallel_for(q_heads, Lq * (D + Dv) * 2, [&](std::int64_t h0, std::int64_t h1) {
    for (std::int64_t bh = h0; bh < h1; ++bh) {
      const St* q = a.q + bh * Lq * D;
      const St* o = a.out + bh * Lq * Dv;
      const St* go = g.grad_out + bh * Lq * Dv;
      for (std::int64_t i = 0; i < Lq; ++i) {
        for (std::int64_t d = 0; d < D; ++d)
          qt.data[(bh * D + d) * lq_ + i] = widen(q[i * D + d]) * a.scale;
        T sum = T(0);
        for (std::int64_t d = 0; d < Dv; ++d) {
          const T gv = widen(go[i * Dv + d]);
          dot.data[(bh * Dv + d) * lq_ + i] = gv;
          sum += gv * widen(o[i * Dv + d]);
        }
        dr.data[bh * Lq + i] = sum;
      }
    }
  });
  // the A operands that only depend on the query head, packed once (Note [prepacked A]):
  // (Q scale) and dO as Lq x D / Lq x Dv, Q^T and dO^T as D x Lq / Dv x Lq
  const std::int64_t mq = (Lq + S::MR - 1) / S::MR * S::MR;
  const std::int64_t qa_size = mq * D, da_size = mq * Dv;
  const std::int64_t qta_size = (D + S::MR - 1) / S::MR * S::MR * Lq;
  const std::int64_t dta_size = (Dv + S::MR - 1) / S::MR * S::MR * Lq;
  Scratch<T> qa(q_heads * qa_size + 1), da(q_heads * da_size + 1), qta(q_heads * qta_size + 1),
      dta(q_heads * dta_size + 1);
  parallel_for(q_heads, Lq * (D + Dv) * 4, [&](std::int64_t h0, std::int64_t h1) {
    for (std::int64_t bh = h0; bh < h1; ++bh) {
      const T* qth = qt.data + bh * D * lq_;
      const T* doth = dot.data + bh * Dv * lq_;
      const St* qh = a.q + bh * Lq * D;
      const St* goh = g.grad_out + bh * Lq * Dv;
      auto transposed = [](const auto* base, std::int64_t ld, std::int64_t rows) {
        // A[i][k] = base[k * ld + i]: MR contiguous values per k (16-bit ones widened)
        return [=](std::int64_t r0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
          pack_a_strided(base, std::int64_t{1}, ld, rows, r0, mc, k0, kc, dst);
        };
      };
      prepack_a<T>(Lq, D, transposed(qth, lq_, Lq), qa.data + bh * qa_size);
      prepack_a<T>(Lq, Dv, transposed(doth, lq_, Lq), da.data + bh * da_size);
      prepack_a<T>(D, Lq, transposed(qh, D, D), qta.data + bh * qta_size);
      prepack_a<T>(Dv, Lq, transposed(goh, Dv, Dv), dta.data + bh * dta_size);
    }
  });
  parallel_for(kv_heads, Lk * (D + Dv) * 2, [&](std::int64_t h0, std::int64_t h1) {
    for (std::int64_t hh = h0; hh < h1; ++hh) {
      const St* k = a.k + hh * Lk * D;
      const St* v = a.v + hh * Lk * Dv;
      for (std::int64_t j = 0; j < Lk; ++j) {
        for (std::int64_t d = 0; d < D; ++d) {
          const T kv = widen(k[j * D + d]);
          kt.data[(hh * D + d) * lk_ + j] = kv;
          if constexpr (!same) kw.data[(hh * Lk + j) * D + d] = kv;
        }
        for (std::int64_t d = 0; d < Dv; ++d)
          vt.data[(hh * Dv + d) * lk_ + j] = widen(v[j * Dv + d]);
      }
    }
  });
  const bool transformed = a.softcap > T(0) || a.alibi != nullptr;
  // P = exp(S - lse) along a run of n scores of one query (lse -inf: a row with no key, P = 0)
  auto probabilities = [&](T* s, std::int64_t n, T lse) {
    const V l = V::set1(lse == neg_inf ? inf : lse);
    std::int64_t j = 0;
    for (; j + W <= n; j += W) exp(sub(V::load(s + j), l)).store(s + j);
    if (j < n) exp(sub(V::load_partial(s + j, n - j, T(0)), l)).store_partial(s + j, n - j);
  };

  // one task per (kv head, group of key blocks): dK and dV of each of its key blocks, and the
  // group's share of dQ for every query head it serves (Note [dq partials])
  const std::int64_t kblocks = (Lk + BK - 1) / BK;
  std::int64_t groups = kblocks < kDqGroups ? kblocks : kDqGroups;
  const std::int64_t per_group = q_heads * Lq * D;  // one partial dQ of every query head
  while (groups > 1 && groups * per_group > kDqPartialValues) --groups;
  Scratch<T> dq_part(groups * per_group + 1);  // [bh][group][Lq][D]
  const std::int64_t work = BK * Lq * (D + Dv) * 5 * group * (shared ? B : 1) * kblocks / groups;
  parallel_for(kv_heads * groups, work, [&](std::int64_t t0, std::int64_t t1) {
    Scratch<T> p(BQ * BK), pd(BQ * BK), dp(BQ * BK), dkt(D * BK + 1), dvt(Dv * BK + 1);
    Scratch<T> th(a.softcap > T(0) ? BQ * BK : 1);  // tanh(raw / softcap) of the block
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t hh = t / groups, gi = t % groups;
      const std::int64_t bk = hh / a.hkv, hk = hh % a.hkv;
      const std::int64_t b_first = shared ? 0 : bk, b_end = shared ? B : bk + 1;
      for (std::int64_t b = b_first; b < b_end; ++b)
        for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          T* part = dq_part.data + ((b * a.hq + h) * groups + gi) * Lq * D;
          for (std::int64_t e = 0; e < Lq * D; ++e) part[e] = T(0);
        }
      const T* kth = kt.data + hh * D * lk_;
      const T* vth = vt.data + hh * Dv * lk_;
      const T* kh = nullptr;  // K (Lk x D) of this kv head, in the compute type
      if constexpr (same) {
        kh = a.k + hh * Lk * D;
      } else {
        kh = kw.data + hh * Lk * D;
      }
      for (std::int64_t kb = kblocks * gi / groups; kb < kblocks * (gi + 1) / groups; ++kb) {
        const std::int64_t j0 = kb * BK, nk = Lk - j0 < BK ? Lk - j0 : BK;
        for (std::int64_t e = 0; e < D * BK; ++e) dkt.data[e] = T(0);
        for (std::int64_t e = 0; e < Dv * BK; ++e) dvt.data[e] = T(0);
        for (std::int64_t b = b_first; b < b_end; ++b) {
          // the query blocks that see a key of this block (Note [attention band])
          const Band band(a, b);
          if (j0 >= band.lk) continue;  // keys past kv_len[b]: no gradient
          const std::int64_t first = band.query_begin(j0) / BQ * BQ;
          const std::int64_t qend = band.query_end(j0 + nk);
          for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            const std::int64_t bh = b * a.hq + h;
            T* part = dq_part.data + (bh * groups + gi) * Lq * D;
            for (std::int64_t i0 = first; i0 < qend; i0 += BQ) {
              if (interrupted()) return;  // Note [interrupts] (dispatch/threads.cpp)
              // whole blocks up to Lq, as Q^T and dO^T are packed (their kc), masked past qend
              const std::int64_t nq = Lq - i0 < BQ ? Lq - i0 : BQ;
              // S (nq x nk) = (Q scale) K^T
              gemm_rows<T>(
                  nq, nk, D,
                  [&](std::int64_t r0, std::int64_t, std::int64_t k0, std::int64_t,
                      T*) -> const T* {
                    return qa.data + bh * qa_size + prepacked_a_index<T>(Lq, i0 + r0, D, k0);
                  },
                  [&](std::int64_t d) { return kth + d * lk_ + j0; }, p.data, BK);
              if (transformed)
                transform_block(a, band, h, i0, nq, j0, nk, p.data, BK, std::int64_t{1},
                                a.softcap > T(0) ? th.data : nullptr);
              if (a.mask != nullptr || !band.covers(i0, i0 + nq, j0, j0 + nk))
                mask_block(a, band, b, h, i0, nq, j0, nk, p.data, BK, std::int64_t{1});
              for (std::int64_t i = 0; i < nq; ++i)
                probabilities(p.data + i * BK, nk, a.lse[bh * Lq + i0 + i]);
              const T* pw = p.data;  // the weights that multiplied V
              if (a.dropout_p > 0) {
                for (std::int64_t e = 0; e < nq * BK; ++e) pd.data[e] = p.data[e];
                dropout_block(a, bh, i0, nq, j0, nk, pd.data, BK, std::int64_t{1});
                pw = pd.data;
              }
              // dV^T (Dv x nk) += dO^T (Dv x nq) Pd (nq x nk)
              gemm_rows<T>(
                  Dv, nk, nq,
                  [&](std::int64_t r0, std::int64_t, std::int64_t, std::int64_t, T*) -> const T* {
                    return dta.data + bh * dta_size + prepacked_a_index<T>(Dv, r0, Lq, i0);
                  },
                  [&](std::int64_t i) { return pw + i * BK; }, dvt.data, BK, true);
              // dPd (nq x nk) = dO V^T
              gemm_rows<T>(
                  nq, nk, Dv,
                  [&](std::int64_t r0, std::int64_t, std::int64_t k0, std::int64_t,
                      T*) -> const T* {
                    return da.data + bh * da_size + prepacked_a_index<T>(Lq, i0 + r0, Dv, k0);
                  },
                  [&](std::int64_t d) { return vth + d * lk_ + j0; }, dp.data, BK);
              if (a.dropout_p > 0)
                dropout_block(a, bh, i0, nq, j0, nk, dp.data, BK, std::int64_t{1});
              for (std::int64_t i = 0; i < nq; ++i) {  // dS = P o (dP - Dr_i)
                T* row = dp.data + i * BK;
                const T* pr = p.data + i * BK;
                const T di = dr.data[bh * Lq + i0 + i];
                for (std::int64_t j = 0; j < nk; ++j)
                  row[j] = pr[j] == T(0) ? T(0) : pr[j] * (row[j] - di);
                if (a.softcap > T(0)) {  // through s = c tanh(raw / c): dS_raw = dS (1 - tanh^2)
                  const T* tr = th.data + i * BK;  // (masked keys keep dS = 0, whatever tanh is)
                  for (std::int64_t j = 0; j < nk; ++j)
                    if (pr[j] != T(0)) row[j] *= T(1) - tr[j] * tr[j];
                }
              }
              // dK^T (D x nk) += Q^T (D x nq) dS (nq x nk)    (scale at the end)
              gemm_rows<T>(
                  D, nk, nq,
                  [&](std::int64_t r0, std::int64_t, std::int64_t, std::int64_t, T*) -> const T* {
                    return qta.data + bh * qta_size + prepacked_a_index<T>(D, r0, Lq, i0);
                  },
                  [&](std::int64_t i) { return dp.data + i * BK; }, dkt.data, BK, true);
              // dQ partial (nq x D) += dS (nq x nk) K (nk x D)    (scale at the end), over the
              // keys that exist (kv_len: whatever a cache holds past them is never multiplied)
              const std::int64_t nkv = band.lk - j0 < nk ? band.lk - j0 : nk;
              gemm_rows<T>(
                  nq, D, nkv,
                  [&](std::int64_t r0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
                    pack_a_strided(dp.data, BK, std::int64_t{1}, nq, r0, mc, k0, kc, dst);
                  },
                  [&](std::int64_t j) { return kh + (j0 + j) * D; }, part + i0 * D, D, true);
            }
          }
        }
        St* dkh = g.dk + (hh * Lk + j0) * D;
        St* dvh = g.dv + (hh * Lk + j0) * Dv;
        for (std::int64_t j = 0; j < nk; ++j) {
          for (std::int64_t d = 0; d < D; ++d)
            dkh[j * D + d] = narrow<St>(dkt.data[d * BK + j] * a.scale);
          for (std::int64_t d = 0; d < Dv; ++d) dvh[j * Dv + d] = narrow<St>(dvt.data[d * BK + j]);
        }
      }
    }
  });
  // dsinks_h = -sum over (batch, query) of P_sink Dr, P_sink = e^{sink_h - lse}: the softmax
  // backward of a logit whose value row is 0 (in double, in a fixed order)
  if (a.sinks != nullptr && g.dsinks != nullptr) {
    for (std::int64_t h = 0; h < a.hq; ++h) {
      if (a.sinks[h] == neg_inf) continue;  // no sink: P_sink = 0
      double sum = 0;
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t i = 0; i < Lq; ++i) {
          const std::int64_t row = (b * a.hq + h) * Lq + i;
          sum -= std::exp(double(a.sinks[h]) - double(a.lse[row])) * double(dr.data[row]);
        }
      g.dsinks[h] = static_cast<typename AttentionArgs<St>::C>(sum);
    }
  }
  // dQ = scale * the group partials, added in group order
  parallel_for(q_heads, Lq * D * groups, [&](std::int64_t h0, std::int64_t h1) {
    for (std::int64_t bh = h0; bh < h1; ++bh) {
      St* out = g.dq + bh * Lq * D;
      const T* part = dq_part.data + bh * groups * Lq * D;
      for (std::int64_t e = 0; e < Lq * D; ++e) {
        T sum = part[e];
        for (std::int64_t gi = 1; gi < groups; ++gi) sum += part[gi * Lq * D + e];
        out[e] = narrow<St>(sum * a.scale);
      }
    }
  });
}

}  // namespace

void attention_f32(const AttentionArgs<float>& args) { attention(args); }
void attention_f64(const AttentionArgs<double>& args) { attention(args); }
void attention_backward_f32(const AttentionBackwardArgs<float>& args) { attention_backward(args); }
void attention_backward_f64(const AttentionBackwardArgs<double>& args) { attention_backward(args); }
void attention_bf16(const AttentionArgs<bf16>& args) { attention(args); }
void attention_f16(const AttentionArgs<f16>& args) { attention(args); }
void attention_backward_bf16(const AttentionBackwardArgs<bf16>& args) { attention_backward(args); }
void attention_backward_f16(const AttentionBackwardArgs<f16>& args) { attention_backward(args); }

MLMATH_ISA_END
