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
// Dropout (Note [dropout hash]) multiplies P^T by keep / (1 - p) before the second GEMM; the
// returned lse is that of the undropped scores.
#include <cmath>
#include <cstdint>
#include <limits>

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

template <class T>
void attention(const AttentionArgs<T>& a) {
  using S = GemmShape<T>;
  using V = Vec<T>;
  constexpr std::int64_t W = V::width, BQ = kBlockQ, BK = S::KC;
  const std::int64_t D = a.d, Dv = a.dv, Lq = a.lq, Lk = a.lk;
  if (a.batch == 0 || a.hq == 0 || Lq == 0) return;
  const std::int64_t kv_batches = a.k_batch_stride == 0 ? 1 : a.batch;
  const std::int64_t v_batches = a.v_batch_stride == 0 ? 1 : a.batch;
  const std::int64_t group = a.hq / a.hkv;  // query heads per kv head
  // K of every (batch, kv head) packed once as the first GEMM's A (Lk x D), V^T as the
  // second's (Dv x Lk) (Note [prepacked A] in gemm_core.h)
  const std::int64_t ksize = (Lk + S::MR - 1) / S::MR * S::MR * D;
  const std::int64_t vsize = (Dv + S::MR - 1) / S::MR * S::MR * Lk;
  Scratch<T> kpack(kv_batches * a.hkv * ksize), vpack(v_batches * a.hkv * vsize);
  parallel_for(kv_batches * a.hkv, ksize, [&](std::int64_t h0, std::int64_t h1) {
    for (std::int64_t h = h0; h < h1; ++h) {
      const T* kh = a.k + h * Lk * D;
      prepack_a<T>(
          Lk, D,
          [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
            pack_a_strided(kh, D, std::int64_t{1}, Lk, i0, mc, k0, kc, dst);
          },
          kpack.data + h * ksize);
    }
  });
  parallel_for(v_batches * a.hkv, vsize, [&](std::int64_t h0, std::int64_t h1) {
    for (std::int64_t h = h0; h < h1; ++h) {
      const T* vh = a.v + h * Lk * Dv;
      prepack_a<T>(
          Dv, Lk,
          [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
            pack_a_strided(vh, std::int64_t{1}, Dv, Dv, i0, mc, k0, kc, dst);
          },
          vpack.data + h * vsize);
    }
  });

  const std::int64_t qblocks = (Lq + BQ - 1) / BQ;
  const std::int64_t tasks = a.batch * a.hq * qblocks;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T keep_scale = a.dropout_p > 0 ? T(1.0 / (1.0 - a.dropout_p)) : T(1);
  // keep iff (bits >> 40) >= threshold, i.e. (bits >> 40) / 2^24 >= p
  const std::uint64_t threshold =
      static_cast<std::uint64_t>(std::ceil(a.dropout_p * static_cast<double>(1 << 24)));
  parallel_for(tasks, BQ * Lk * (D + Dv) * 2, [&](std::int64_t t0, std::int64_t t1) {
    Scratch<T> qt(D * BQ + 1), st(BK * BQ), ot(Dv * BQ + 1), m(BQ), l(BQ), alpha(BQ);
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t bh = t / qblocks, i0 = t % qblocks * BQ;
      const std::int64_t b = bh / a.hq, h = bh % a.hq, hk = h / group;
      const std::int64_t nq = Lq - i0 < BQ ? Lq - i0 : BQ;
      const T* qb = a.q + (bh * Lq + i0) * D;
      const T* kp = kpack.data + ((a.k_batch_stride == 0 ? 0 : b) * a.hkv + hk) * ksize;
      const T* vp = vpack.data + ((a.v_batch_stride == 0 ? 0 : b) * a.hkv + hk) * vsize;
      // (Q_blk * scale)^T, zero past the last query
      for (std::int64_t dd = 0; dd < D; ++dd) {
        T* row = qt.data + dd * BQ;
        for (std::int64_t c = 0; c < nq; ++c) row[c] = qb[c * D + dd] * a.scale;
        for (std::int64_t c = nq; c < BQ; ++c) row[c] = T(0);
      }
      for (std::int64_t c = 0; c < BQ; ++c) {
        m.data[c] = neg_inf;
        l.data[c] = T(0);
      }
      for (std::int64_t e = 0; e < Dv * BQ; ++e) ot.data[e] = T(0);
      // keys this block may see: causal limits them to j <= i + offset
      const std::int64_t offset = a.causal == 2 ? Lk - Lq : 0;
      std::int64_t kend = Lk;
      if (a.causal != 0) {
        const std::int64_t last = i0 + nq - 1 + offset + 1;
        kend = last < kend ? last : kend;
      }
      for (std::int64_t j0 = 0; j0 < kend; j0 += BK) {
        const std::int64_t nk = kend - j0 < BK ? kend - j0 : BK;
        gemm_rows<T>(
            nk, BQ, D,
            [&](std::int64_t r0, std::int64_t, std::int64_t k0, std::int64_t, T*) -> const T* {
              return kp + prepacked_a_index<T>(Lk, j0 + r0, D, k0);
            },
            [&](std::int64_t dd) { return qt.data + dd * BQ; }, st.data, BQ);
        // masks, by selection
        const bool diagonal = a.causal != 0 && j0 + nk - 1 > i0 + offset;
        if (a.mask != nullptr || diagonal) {
          const std::int64_t* ms = a.mask_stride;
          for (std::int64_t j = 0; j < nk; ++j) {
            T* row = st.data + j * BQ;
            const std::int64_t jj = j0 + j;
            if (a.mask != nullptr) {
              const std::int64_t base = b * ms[0] + h * ms[1] + i0 * ms[2] + jj * ms[3];
              if (a.mask_is_bool) {
                const auto* mk = static_cast<const std::uint8_t*>(a.mask) + base;
                for (std::int64_t c = 0; c < nq; ++c)
                  if (!mk[c * ms[2]]) row[c] = neg_inf;
              } else {
                const T* mk = static_cast<const T*>(a.mask) + base;
                for (std::int64_t c = 0; c < nq; ++c) row[c] += mk[c * ms[2]];
              }
            }
            if (diagonal) {  // query i0 + c sees key jj iff c >= jj - i0 - offset
              const std::int64_t first = jj - i0 - offset;
              for (std::int64_t c = 0; c < (first < BQ ? first : BQ); ++c) row[c] = neg_inf;
            }
          }
        }
        // online softmax, a vector of queries at a time
        for (std::int64_t c = 0; c < BQ; c += W) {
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
          for (std::int64_t c = 0; c < BQ; c += W)
            mul(V::load(row + c), V::load(alpha.data + c)).store(row + c);
        }
        if (a.dropout_p > 0) {  // Note [dropout hash]
          const std::uint64_t key =
              mix64(a.seed ^ (static_cast<std::uint64_t>(bh) * 0x9E3779B97F4A7C15ULL));
          for (std::int64_t j = 0; j < nk; ++j) {
            T* row = st.data + j * BQ;
            const std::uint64_t jj = static_cast<std::uint64_t>(j0 + j);
            for (std::int64_t c = 0; c < nq; ++c) {
              const std::uint64_t ctr = (static_cast<std::uint64_t>(i0 + c) << 32) | jj;
              const std::uint64_t bits = mix64(key ^ (ctr * 0xD1B54A32D192ED03ULL));
              row[c] = (bits >> 40) >= threshold ? row[c] * keep_scale : T(0);
            }
          }
        }
        // V^T's block is packed for kc = min(BK, Lk - j0) keys: a causal block cut shorter
        // runs over the whole block with zero weights for the keys it does not see
        const std::int64_t kc = Lk - j0 < BK ? Lk - j0 : BK;
        for (std::int64_t e = nk * BQ; e < kc * BQ; ++e) st.data[e] = T(0);
        gemm_rows<T>(
            Dv, BQ, kc,
            [&](std::int64_t r0, std::int64_t, std::int64_t, std::int64_t, T*) -> const T* {
              return vp + prepacked_a_index<T>(Dv, r0, Lk, j0);
            },
            [&](std::int64_t j) { return st.data + j * BQ; }, ot.data, BQ, true);
      }
      // out = O / l (0 for rows that saw no key), lse = m + log l
      T* ob = a.out + (bh * Lq + i0) * Dv;
      for (std::int64_t c = 0; c < nq; ++c) {
        const T lc = l.data[c];
        const T inv = lc == T(0) ? T(0) : T(1) / lc;
        for (std::int64_t dd = 0; dd < Dv; ++dd) ob[c * Dv + dd] = ot.data[dd * BQ + c] * inv;
        if (a.lse != nullptr)
          a.lse[bh * Lq + i0 + c] = lc == T(0) ? neg_inf : m.data[c] + std::log(lc);
      }
    }
  });
}

}  // namespace

void attention_f32(const AttentionArgs<float>& args) { attention(args); }
void attention_f64(const AttentionArgs<double>& args) { attention(args); }

MLMATH_ISA_END
