// The packed, register-blocked GEMM core shared by matmul, convolution and attention:
//
//   C[i][j] (+)= sum_k A[i][k] B[k][j],    i < M, j < N, k < K
//
// Blocking (the BLIS/GotoBLAS scheme):
//   for jc in N by NC:                       B block  [KC][NC]   packed once, shared
//     for pc in K by KC:
//       pack B[pc:pc+KC][jc:jc+NC] into NR-column panels      (threads split the panels)
//       barrier
//       tasks = MC-row blocks of A x thread slices of the B panels:
//         pack A[ic:ic+MC][pc:pc+KC] into MR-row panels        (per thread, in L2)
//         for each B panel jr: for each A panel ir: micro-kernel MR x NR over KC
//       barrier
// Packed panels are padded with zeros to whole MR / NR, so the micro-kernel always runs full;
// only its stores are cut to the tile.  A and B reach the core only through two packing
// callbacks, so a convolution packs its B panels straight from the input (implicit im2col)
// without ever forming the im2col matrix.
//
// Determinism: each C element is owned by one task per pc step, and the pc steps run in order,
// so C does not depend on the number of threads.
//
// Packing callbacks:
//   pack_a(i0, mc, k0, kc, dst): dst[p][k][r] = A[i0 + p*MR + r][k0 + k]   (0 past M)
//   pack_b(k0, kc, j0, nc, dst): dst[q][k][c] = B[k0 + k][j0 + q*NR + c]   (0 past N)
// A pack_a that returns a const T* instead of filling dst hands over panels packed beforehand
// (Note [prepacked A]).
//
// Note [16-bit GEMM]
// bf16 / f16 operands (Note [16-bit storage] in half.h) run on the float32 core: the packing
// functions widen them to float32 as they pack (pack_a_strided / pack_b_strided take any
// storage type), so the micro-kernel runs at the float32 rate.  gemm_blocked with a 16-bit C
// rounds each result once: with K in one KC block the micro-kernel rounds its accumulators
// straight into C; with several, the sums of the KC steps are kept in a float32 panel of C
// (M x NC, the rows of the current jc block) and the last step's micro-kernel adds its
// accumulators to them and rounds into C.  A rounded 16-bit C is never read back (accumulate
// must be false there).
#pragma once

#include <atomic>
#include <cstdint>
#include <new>
#include <type_traits>
#include <utility>

#include "common/parallel.h"
#include "common/vec.h"

MLMATH_ISA_BEGIN
namespace {

// Micro-kernel tile per ISA and type: MR rows x NRV vectors of columns (MR * NRV accumulator
// registers plus NRV for B and one broadcast of A must fit the register file).
template <class T>
struct GemmShape {
#if defined(MLMATH_ISA_AVX512)
  static constexpr int MR = 8, NRV = 3;  // 24 of 32 zmm registers
#elif defined(MLMATH_ISA_AVX2)
  static constexpr int MR = 6, NRV = 2;  // 12 of 16 ymm registers
#elif defined(MLMATH_ISA_NEON)
  // 24 of 32 q registers (8x12 float32, 8x6 float64); 3 hold the B row and the A column takes
  // the rest, so the loop needs no spills.
  static constexpr int MR = 8, NRV = 3;
#else
  static constexpr int MR = 4, NRV = 4;  // scalar: 16 accumulators
#endif
  static constexpr int NR = NRV * Vec<T>::width;
  static constexpr std::int64_t KC = 192;
  static constexpr std::int64_t MC = MR * 16;
  static constexpr std::int64_t NC = NR * 64;
};

// 64-byte aligned scratch (a plain new[] of T would work too, but alignment helps the loads).
template <class T>
struct Scratch {
  T* data = nullptr;
  explicit Scratch(std::int64_t n)
      : data(static_cast<T*>(::operator new(sizeof(T) * (n > 0 ? n : 1), std::align_val_t{64}))) {}
  ~Scratch() { ::operator delete(data, std::align_val_t{64}); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Note [prepacked A]
// An A matrix used by many GEMMs (a Winograd filter transform) is packed once, every
// (ic, pc) block in the layout pack_a writes, one after another: with Mpad = M rounded up to
// MR and kc = min(KC, K - pc), block (ic, pc) starts at pc * Mpad + ic * kc, so element (i, k)
// lives at  pc * Mpad + (i - i % MR) * kc + (k - pc) * MR + i % MR,  pc = k - k % KC.
template <class T>
std::int64_t prepacked_a_index(std::int64_t M, std::int64_t i, std::int64_t K, std::int64_t k) {
  using S = GemmShape<T>;
  const std::int64_t mpad = (M + S::MR - 1) / S::MR * S::MR;
  const std::int64_t pc = k - k % S::KC, kc = K - pc < S::KC ? K - pc : S::KC;
  return pc * mpad + (i - i % S::MR) * kc + (k - pc) * S::MR + i % S::MR;
}

// Packs all of A (M x K) with pack_a into dst (Note [prepacked A]; prepacked_a_index(M, M, K, 0)
// values).
template <class T, class PackA>
void prepack_a(std::int64_t M, std::int64_t K, const PackA& pack_a, T* dst) {
  using S = GemmShape<T>;
  const std::int64_t mpad = (M + S::MR - 1) / S::MR * S::MR;
  for (std::int64_t pc = 0; pc < K; pc += S::KC)
    pack_a(std::int64_t{0}, mpad, pc, K - pc < S::KC ? K - pc : S::KC, dst + pc * mpad);
}

// The packed panels of A's block (i0, k0): pack_a fills dst, or returns panels packed before.
template <class T, class PackA>
const T* packed_a(const PackA& pack_a, std::int64_t i0, std::int64_t mc, std::int64_t k0,
                  std::int64_t kc, T* dst) {
  if constexpr (std::is_void_v<decltype(pack_a(i0, mc, k0, kc, dst))>) {
    pack_a(i0, mc, k0, kc, dst);
    return dst;
  } else {
    return pack_a(i0, mc, k0, kc, dst);
  }
}

// Where the micro-kernel reads row k of its B panel: a packed panel (rows BS apart), or rows
// of an unpacked matrix given by pointers (gemm_rows below).
template <class T, int BS>
struct PackedPanel {
  const T* b;
  const T* row(std::int64_t k) const { return b + k * BS; }
};
template <class T>
struct RowPointers {
  const T* const* rows;  // rows[k]: row k of B
  std::int64_t col;      // the panel's first column
  const T* row(std::int64_t k) const { return rows[k] + col; }
};

#if defined(MLMATH_ISA_NEON)
// One k step of the micro-kernel with A's column in registers: acc[i][j] += a[i] * b[j], with
// a[i] lane i % width of av[i / width] (FMLA by element; MR a multiple of the width).
template <int I, int MR, int NRV, class V>
inline void fma_row_by_lane(V (&acc)[MR][NRV], const V* av, const V* bv) {
  constexpr int W = V::width;
  for (int j = 0; j < NRV; ++j) acc[I][j] = fma_lane<I % W>(av[I / W], bv[j], acc[I][j]);
}
template <int MR, int NRV, class V, int... I>
inline void fma_rows_by_lane(V (&acc)[MR][NRV], const V* av, const V* bv,
                             std::integer_sequence<int, I...>) {
  (fma_row_by_lane<I>(acc, av, bv), ...);
}
#endif

// acc[MR][NRV] = sum_k a[k][r] * b[k][c]; then C[0:m][0:n] = acc (+ C when load_c).
// NRV * width may be less than the panel's width, so a narrower instance serves the last,
// partial panel of a row of C without computing padding.  With a 16-bit O, the sum
// acc (+ C when load_c) is rounded into out (row stride ldo) instead, and C is only read
// (Note [16-bit GEMM]).
template <int MR, int NRV, class T, class Panel, class O = T>
void gemm_ukernel(std::int64_t kc, const T* a, const Panel& b, T* c, std::int64_t ldc,
                  std::int64_t m, std::int64_t n, bool load_c, O* out = nullptr,
                  std::int64_t ldo = 0) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  V acc[MR][NRV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NRV; ++j) acc[i][j] = V::set1(T(0));
  for (std::int64_t k = 0; k < kc; ++k) {
    const T* brow = b.row(k);
    V bv[NRV];
    for (int j = 0; j < NRV; ++j) bv[j] = V::load(brow + j * W);
#if defined(MLMATH_ISA_NEON)
    if constexpr (MR % W == 0) {
      V av[MR / W];
      for (int q = 0; q < MR / W; ++q) av[q] = V::load(a + k * MR + q * W);
      fma_rows_by_lane(acc, av, bv, std::make_integer_sequence<int, MR>{});
      continue;
    }
#endif
    for (int i = 0; i < MR; ++i) {
      const V av = V::set1(a[k * MR + i]);
      for (int j = 0; j < NRV; ++j) acc[i][j] = fma(av, bv[j], acc[i][j]);
    }
  }
#if defined(MLMATH_ISA_NEON)
  // GCC (12) spills the accumulators where they are defined, i.e. on every k step, when they
  // are still live in the stores below; put them in memory once here and store from there.
  alignas(16) T tile[MR][NRV * W];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NRV; ++j) acc[i][j].store(&tile[i][j * W]);
  const auto acc_at = [&](int i, int j) { return V::load(&tile[i][j * W]); };
#else
  const auto acc_at = [&](int i, int j) { return acc[i][j]; };
#endif
  const bool full = m == MR && n == NRV * W;
  for (int i = 0; i < MR; ++i) {
    if (i >= m) break;
    T* row = c + i * ldc;
    for (int j = 0; j < NRV; ++j) {
      const std::int64_t cols = n - j * W;
      if (cols <= 0) break;
      O* orow;  // C itself, or the 16-bit out that takes the sum's one rounding
      if constexpr (std::is_same_v<O, T>) {
        orow = row;
      } else {
        orow = out + i * ldo;
      }
      if (full || cols >= W) {
        const V sum = load_c ? add(acc_at(i, j), V::load(row + j * W)) : acc_at(i, j);
        sum.store(orow + j * W);
      } else {
        const V sum =
            load_c ? add(acc_at(i, j), V::load_partial(row + j * W, cols, T(0))) : acc_at(i, j);
        sum.store_partial(orow + j * W, cols);
      }
    }
  }
}

// One MR x NR tile of C; a partial last panel (n < NR) runs only the vectors it needs
// (NRV is at most 4 on every ISA).  out, ldo: as gemm_ukernel's.
template <class T, class O = T>
void gemm_tile(std::int64_t kc, const T* a, const T* b, T* c, std::int64_t ldc, std::int64_t m,
               std::int64_t n, bool load_c, O* out = nullptr, std::int64_t ldo = 0) {
  using S = GemmShape<T>;
  constexpr std::int64_t W = Vec<T>::width;
  using P = PackedPanel<T, S::NR>;
  constexpr int kNRV = S::NRV, kTwo = kNRV < 2 ? kNRV : 2, kThree = kNRV < 3 ? kNRV : 3;
  switch ((n + W - 1) / W) {
    case 1:
      gemm_ukernel<S::MR, 1>(kc, a, P{b}, c, ldc, m, n, load_c, out, ldo);
      break;
    case 2:
      gemm_ukernel<S::MR, kTwo>(kc, a, P{b}, c, ldc, m, n, load_c, out, ldo);
      break;
    case 3:
      gemm_ukernel<S::MR, kThree>(kc, a, P{b}, c, ldc, m, n, load_c, out, ldo);
      break;
    default:
      gemm_ukernel<S::MR, kNRV>(kc, a, P{b}, c, ldc, m, n, load_c, out, ldo);
      break;
  }
}

// C (ldc: row stride) = A B, or C += A B when accumulate.  Threads: all that pay for the work.
// C may be 16-bit (CT = bf16 / f16 with T = float): Note [16-bit GEMM], accumulate false.
template <class T, class PackA, class PackB, class CT>
void gemm_blocked(std::int64_t M, std::int64_t N, std::int64_t K, const PackA& pack_a,
                  const PackB& pack_b, CT* C, std::int64_t ldc, bool accumulate) {
  using S = GemmShape<T>;
  constexpr int MR = S::MR, NR = S::NR;
  constexpr bool narrow_c = !std::is_same_v<CT, T>;
  static_assert(!narrow_c || (std::is_same_v<T, float> && is_16bit<CT>));
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (std::int64_t i = 0; i < M; ++i)
        for (std::int64_t j = 0; j < N; ++j) C[i * ldc + j] = CT{};
    return;
  }
  const std::int64_t nc_max = N < S::NC ? N : S::NC;
  const std::int64_t kc_max = K < S::KC ? K : S::KC;
  const std::int64_t b_panels_max = (nc_max + NR - 1) / NR;
  Scratch<T> bpack(b_panels_max * NR * kc_max);
  const int threads = threads_for(M * N * K / 64);
  // every allocation before the region: nothing in it may throw (parallel_region)
  Scratch<T> apack_all(threads * S::MC * kc_max);
  // narrow_c with K in several KC blocks: cpanel [M][nc_max], the float sums of the jc block
  const bool use_panel = narrow_c && K > S::KC;
  Scratch<T> cpanel(use_panel ? M * nc_max : 1);
  std::atomic<bool> stop{false};  // Note [interrupts]: thread 0 decides for the team
  parallel_region(threads, [&](int tid, int team) {
    T* const apack = apack_all.data + tid * S::MC * kc_max;
    for (std::int64_t jc = 0; jc < N; jc += S::NC) {
      const std::int64_t nc = N - jc < S::NC ? N - jc : S::NC;
      const std::int64_t b_panels = (nc + NR - 1) / NR;
      for (std::int64_t pc = 0; pc < K; pc += S::KC) {
        const std::int64_t kc = K - pc < S::KC ? K - pc : S::KC;
        // pack B: threads take contiguous runs of panels
        {
          const std::int64_t p0 = b_panels * tid / team, p1 = b_panels * (tid + 1) / team;
          if (p0 < p1) {
            const std::int64_t j0 = jc + p0 * NR;
            const std::int64_t cols = (p1 * NR < nc ? p1 * NR : nc) - p0 * NR;
            pack_b(pc, kc, j0, cols, bpack.data + p0 * NR * kc);
          }
        }
        barrier(team);
        // tasks: MC blocks of rows x `team` slices of the B panels
        const std::int64_t m_blocks = (M + S::MC - 1) / S::MC;
        const std::int64_t slices = b_panels < team ? b_panels : team;
        const std::int64_t tasks = m_blocks * slices;
        const bool load_c = accumulate || pc > 0;
        for (std::int64_t t = tid; t < tasks; t += team) {
          if (interrupted()) break;  // Note [interrupts]: to the barrier
          const std::int64_t ib = t / slices, s = t % slices;
          const std::int64_t ic = ib * S::MC;
          const std::int64_t mc = M - ic < S::MC ? M - ic : S::MC;
          const T* ap = packed_a(pack_a, ic, mc, pc, kc, apack);
          const std::int64_t q0 = b_panels * s / slices, q1 = b_panels * (s + 1) / slices;
          for (std::int64_t q = q0; q < q1; ++q) {
            const std::int64_t j = jc + q * NR;
            const std::int64_t n = N - j < NR ? N - j : NR;
            for (std::int64_t ir = 0; ir < mc; ir += MR) {
              const std::int64_t m = mc - ir < MR ? mc - ir : MR;
              const T* bp = bpack.data + q * NR * kc;
              if constexpr (narrow_c) {  // Note [16-bit GEMM]
                T* cp = cpanel.data + (ic + ir) * nc_max + (j - jc);
                CT* out = C + (ic + ir) * ldc + j;
                if (pc + kc < K) {
                  gemm_tile<T>(kc, ap + ir * kc, bp, cp, nc_max, m, n, pc > 0);
                } else {
                  gemm_tile<T>(kc, ap + ir * kc, bp, cp, nc_max, m, n, pc > 0, out, ldc);
                }
              } else {
                gemm_tile<T>(kc, ap + ir * kc, bp, C + (ic + ir) * ldc + j, ldc, m, n, load_c);
              }
            }
          }
        }
        if (tid == 0) stop.store(interrupted(), std::memory_order_relaxed);
        barrier(team);
        if (stop.load(std::memory_order_relaxed)) return;  // all threads, after one barrier
      }
    }
  });
}

// C (ldc) = A B (C += A B when accumulate) on the calling thread, where row k of B is the
// contiguous run b_row(k)[0, N):
// no B packing at all; the micro-kernel loads B straight from those rows.  For convolutions
// whose B rows are shifted runs of one buffer (Note [shifted rows] in kernels/conv.cpp) and
// whose few output channels would not amortise packing B.  The last, partial panel of columns
// is packed (so no load reads past a row's end).
template <class T, class PackA, class BRow>
void gemm_rows(std::int64_t M, std::int64_t N, std::int64_t K, const PackA& pack_a,
               const BRow& b_row, T* C, std::int64_t ldc, bool accumulate = false) {
  using S = GemmShape<T>;
  constexpr int MR = S::MR, NR = S::NR;
  if (M <= 0 || N <= 0) return;
  const std::int64_t kc_max = K < S::KC ? K : S::KC;
  constexpr bool prepacked =
      !std::is_void_v<decltype(pack_a(std::int64_t{0}, std::int64_t{0}, std::int64_t{0},
                                      std::int64_t{0}, static_cast<T*>(nullptr)))>;
  Scratch<T> apack(prepacked ? 1 : ((M + MR - 1) / MR) * MR * (kc_max > 0 ? kc_max : 1));
  Scratch<const T*> rows(kc_max > 0 ? kc_max : 1);
  Scratch<T> tail(NR * (kc_max > 0 ? kc_max : 1));
  if (K <= 0) {
    if (!accumulate)
      for (std::int64_t i = 0; i < M; ++i)
        for (std::int64_t j = 0; j < N; ++j) C[i * ldc + j] = T(0);
    return;
  }
  const std::int64_t full = N / NR * NR;
  for (std::int64_t pc = 0; pc < K; pc += S::KC) {
    const std::int64_t kc = K - pc < S::KC ? K - pc : S::KC;
    const bool load_c = accumulate || pc > 0;
    for (std::int64_t k = 0; k < kc; ++k) rows.data[k] = b_row(pc + k);
    for (std::int64_t ic = 0; ic < M; ic += S::MC) {
      const std::int64_t mc = M - ic < S::MC ? M - ic : S::MC;
      const T* ap = packed_a(pack_a, ic, mc, pc, kc, apack.data);
      for (std::int64_t j = 0; j < full; j += NR) {
        const RowPointers<T> panel{rows.data, j};
        for (std::int64_t ir = 0; ir < mc; ir += MR) {
          const std::int64_t m = mc - ir < MR ? mc - ir : MR;
          gemm_ukernel<MR, S::NRV>(kc, ap + ir * kc, panel, C + (ic + ir) * ldc + j, ldc, m,
                                   std::int64_t{NR}, load_c);
        }
      }
      if (full < N) {  // the partial last panel, packed
        const std::int64_t cols = N - full;
        for (std::int64_t k = 0; k < kc; ++k) {
          T* o = tail.data + k * NR;
          for (std::int64_t c = 0; c < cols; ++c) o[c] = rows.data[k][full + c];
          for (std::int64_t c = cols; c < NR; ++c) o[c] = T(0);
        }
        for (std::int64_t ir = 0; ir < mc; ir += MR) {
          const std::int64_t m = mc - ir < MR ? mc - ir : MR;
          gemm_tile<T>(kc, ap + ir * kc, tail.data, C + (ic + ir) * ldc + full, ldc, m, cols,
                       load_c);
        }
      }
    }
  }
}

// Packing from a strided matrix: element (i, k) of A at a[i * rs + k * cs].  A may be stored in
// a 16-bit type (Src) and is widened to T as it is packed (Note [16-bit GEMM]).
template <class Src, class T>
void pack_a_strided(const Src* a, std::int64_t rs, std::int64_t cs, std::int64_t M, std::int64_t i0,
                    std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
  constexpr int MR = GemmShape<T>::MR;
  for (std::int64_t p = 0; p < mc; p += MR) {
    if (rs == 1 && p + MR <= mc && i0 + p + MR <= M) {  // A^T row-major: MR contiguous per k
      const Src* src = a + (i0 + p) + k0 * cs;
      T* out = dst + p * kc;
      for (std::int64_t k = 0; k < kc; ++k)
        for (int r = 0; r < MR; ++r) out[k * MR + r] = widen(src[k * cs + r]);
      continue;
    }
    if (cs == 1 && p + MR <= mc && i0 + p + MR <= M) {  // A row-major: a transpose, in tiles
      const Src* src = a + (i0 + p) * rs + k0;
      T* out = dst + p * kc;
      std::int64_t k = 0;
      for (; k + 8 <= kc; k += 8) {
        T tile[MR][8];
        for (int r = 0; r < MR; ++r)
          for (int kk = 0; kk < 8; ++kk) tile[r][kk] = widen(src[r * rs + k + kk]);
        for (int kk = 0; kk < 8; ++kk)
          for (int r = 0; r < MR; ++r) out[(k + kk) * MR + r] = tile[r][kk];
      }
      for (; k < kc; ++k)
        for (int r = 0; r < MR; ++r) out[k * MR + r] = widen(src[r * rs + k]);
      continue;
    }
    for (int r = 0; r < MR; ++r) {
      const std::int64_t i = i0 + p + r;
      T* out = dst + p * kc + r;
      if (p + r < mc && i < M) {
        const Src* src = a + i * rs + k0 * cs;
        for (std::int64_t k = 0; k < kc; ++k) out[k * MR] = widen(src[k * cs]);
      } else {
        for (std::int64_t k = 0; k < kc; ++k) out[k * MR] = T(0);
      }
    }
  }
}

// Element (k, j) of B at b[k * rs + j * cs] (widened from a 16-bit Src as for A).
template <class Src, class T>
void pack_b_strided(const Src* b, std::int64_t rs, std::int64_t cs, std::int64_t k0,
                    std::int64_t kc, std::int64_t j0, std::int64_t nc, T* dst) {
  constexpr int NR = GemmShape<T>::NR;
  constexpr std::int64_t W = Vec<T>::width;
  for (std::int64_t q = 0; q < nc; q += NR) {
    const std::int64_t cols = nc - q < NR ? nc - q : NR;
    T* out = dst + q * kc;
    for (std::int64_t k = 0; k < kc; ++k) {
      const Src* src = b + (k0 + k) * rs + (j0 + q) * cs;
      T* o = out + k * NR;
      if constexpr (is_16bit<Src>) {
        if (cs == 1 && cols == NR) {  // whole vectors, widened in registers
          for (std::int64_t c = 0; c < NR; c += W) Vec<T>::load(src + c).store(o + c);
          continue;
        }
      }
      if (cs == 1) {
        for (std::int64_t c = 0; c < cols; ++c) o[c] = widen(src[c]);
      } else {
        for (std::int64_t c = 0; c < cols; ++c) o[c] = widen(src[c * cs]);
      }
      for (std::int64_t c = cols; c < NR; ++c) o[c] = T(0);
    }
  }
}

}  // namespace
MLMATH_ISA_END
