// Winograd convolution forward, F(2x2, 3x3) and F(4x4, 3x3): 3x3 kernels, stride 1, dilation 1,
// one group.
//
// With tiles of m x m outputs and a = m + 2, each output tile Y of one (image, output channel)
// comes from the a x a input patch d at (m ti - pt, m tj - pl) as
//   Y = A^T [ sum_c (G g_kc G^T) o (B^T d_c B) ] A          (o: element-wise, a*a products)
// instead of 9 m^2 products per channel pair: 16 for 4 outputs (F2: 2.25x fewer) or 36 for 16
// (F4: 4x fewer).  The matrices are in the Tile structs below.  The sum over c for each of the
// a*a positions xi is a GEMM:  M[xi] (K x T) = U[xi] (K x C) . V[xi] (C x T)  over T tiles.
//
// Tiles are processed in blocks of whole tile rows (Note [winograd blocks]); a block is one task:
// input transform into V, a*a GEMMs on the shared core (single-threaded inside the task), output
// transform into y (+ bias).  The filter transform U is computed once per call, packed as the
// GEMMs' A.  Every output element is produced by one task in a fixed order, so results do not
// depend on the number of threads.
//
// Every transform is a 1-D one applied along rows and then along columns, each vectorised over a
// whole row of tiles (unit-stride loops over the tile index).
//
// Accuracy: F2's transforms only add and halve, so its float32 error stays within a small
// multiple of direct convolution's; F4's use factors up to 8 (A) and 5 (B), about 10x more
// rounding error (tests/test_conv.py states both tolerances).
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common/gemm_core.h"
#include "common/parallel.h"
#include "kernels/conv_stage.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

void conv2d_f32(const Conv2dArgs<float>& args);  // direct convolution (kernels/conv.cpp)
void conv2d_f64(const Conv2dArgs<double>& args);

namespace {

// The 1-D transforms, written once for scalars (the filter) and vectors (rows of tiles):
// filter: u = G g (3 -> a values); input: B^T d (a -> a); output: A^T M (a -> m).
template <class T>
T add(T a, T b) {
  return a + b;
}
template <class T>
T sub(T a, T b) {
  return a - b;
}
template <class V, class T>
V times(T c, V x) {  // c x for a constant c
  if constexpr (std::is_same_v<V, T>) {
    return c * x;
  } else {
    return mul(V::set1(c), x);
  }
}

// F(2x2, 3x3):  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],
//               G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],  A^T = [1 1 1 0; 0 1 -1 -1]
struct TileF2 {
  static constexpr int m = 2, a = 4;
  template <class T>
  static void filter(const T g[3], T u[4]) {
    u[0] = g[0];
    u[1] = T(0.5) * (g[0] + g[1] + g[2]);
    u[2] = T(0.5) * (g[0] - g[1] + g[2]);
    u[3] = g[2];
  }
  template <class T, class V>
  static void input(const V d[4], V out[4]) {
    out[0] = sub(d[0], d[2]);
    out[1] = add(d[1], d[2]);
    out[2] = sub(d[2], d[1]);
    out[3] = sub(d[1], d[3]);
  }
  template <class T, class V>
  static void output(const V x[4], V y[2]) {
    y[0] = add(add(x[0], x[1]), x[2]);
    y[1] = sub(sub(x[1], x[2]), x[3]);
  }
};

// F(4x4, 3x3) (Lavin and Gray, 2016):
//   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
//   G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]
//   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
struct TileF4 {
  static constexpr int m = 4, a = 6;
  template <class T>
  static void filter(const T g[3], T u[6]) {
    const T even = g[0] + g[2], quarter_even = T(0.25) * g[0] + g[2];
    u[0] = T(0.25) * g[0];
    u[1] = T(-1) / T(6) * (even + g[1]);
    u[2] = T(-1) / T(6) * (even - g[1]);
    u[3] = T(1) / T(6) * (quarter_even + T(0.5) * g[1]);  // g0/24 + g1/12 + g2/6
    u[4] = T(1) / T(6) * (quarter_even - T(0.5) * g[1]);
    u[5] = g[2];
  }
  template <class T, class V>
  static void input(const V d[6], V out[6]) {
    const V p = sub(d[4], times<V>(T(4), d[2])), q = sub(d[3], times<V>(T(4), d[1]));
    const V r = sub(d[4], d[2]), s = times<V>(T(2), sub(d[3], d[1]));
    out[0] = add(sub(times<V>(T(4), d[0]), times<V>(T(5), d[2])), d[4]);
    out[1] = add(p, q);  // -4 d1 - 4 d2 + d3 + d4
    out[2] = sub(p, q);  //  4 d1 - 4 d2 - d3 + d4
    out[3] = add(r, s);  // -2 d1 - d2 + 2 d3 + d4
    out[4] = sub(r, s);  //  2 d1 - d2 - 2 d3 + d4
    out[5] = add(sub(times<V>(T(4), d[1]), times<V>(T(5), d[3])), d[5]);
  }
  template <class T, class V>
  static void output(const V x[6], V y[4]) {
    const V s12 = add(x[1], x[2]), d12 = sub(x[1], x[2]);
    const V s34 = add(x[3], x[4]), d34 = sub(x[3], x[4]);
    y[0] = add(add(x[0], s12), s34);
    y[1] = add(d12, times<V>(T(2), d34));
    y[2] = add(s12, times<V>(T(4), s34));
    y[3] = add(add(d12, times<V>(T(8), d34)), x[5]);
  }
};

// out[i][x] = (B^T in)[i][x] for x < n, a vector of x at a time
template <class Tile, class T>
void input_rows(const T* const in[Tile::a], T* const out[Tile::a], std::int64_t n) {
  using V = Vec<T>;
  constexpr int al = Tile::a;
  constexpr std::int64_t W = V::width;
  std::int64_t x = 0;
  for (; x + W <= n; x += W) {
    V d[al], e[al];
    for (int i = 0; i < al; ++i) d[i] = V::load(in[i] + x);
    Tile::template input<T>(d, e);
    for (int i = 0; i < al; ++i) e[i].store(out[i] + x);
  }
  if (x < n) {
    V d[al], e[al];
    for (int i = 0; i < al; ++i) d[i] = V::load_partial(in[i] + x, n - x, T(0));
    Tile::template input<T>(d, e);
    for (int i = 0; i < al; ++i) e[i].store_partial(out[i] + x, n - x);
  }
}

// out[b][x] = (A^T in)[b][x] + bias for x < n; check += out - out (0 while every out is finite,
// Note [winograd non-finite])
template <class Tile, class T>
void output_rows(const T* const in[Tile::a], T* const out[Tile::m], std::int64_t n, T bias,
                 Vec<T>& check) {
  using V = Vec<T>;
  constexpr int al = Tile::a, m = Tile::m;
  constexpr std::int64_t W = V::width;
  const V vb = V::set1(bias);
  std::int64_t x = 0;
  for (; x + W <= n; x += W) {
    V d[al], y[m];
    for (int i = 0; i < al; ++i) d[i] = V::load(in[i] + x);
    Tile::template output<T>(d, y);
    for (int b = 0; b < m; ++b) {
      const V yb = add(y[b], vb);
      check = add(check, sub(yb, yb));
      yb.store(out[b] + x);
    }
  }
  if (x < n) {  // lanes past n come from zeros: finite
    V d[al], y[m];
    for (int i = 0; i < al; ++i) d[i] = V::load_partial(in[i] + x, n - x, T(0));
    Tile::template output<T>(d, y);
    for (int b = 0; b < m; ++b) {
      const V yb = add(y[b], vb);
      check = add(check, sub(yb, yb));
      yb.store_partial(out[b] + x, n - x);
    }
  }
}

// Note [winograd blocks]
// A block is a run of whole tile rows, counted across images (global tile row = n * th + ti),
// of about kTilesPerBlock F2 tiles' worth of V (a*a*T values per input channel), with as many
// blocks as make an even split over the threads.  V [a*a][C][T] and M [a*a][K][T] then live in
// L2/L3; the GEMMs read U (packed once) and V in place.
constexpr std::int64_t kTilesPerBlock = 1024;
// Output channels up to which the GEMMs read V in place instead of packing it (gemm_rows).
constexpr std::int64_t kFewOutputs = 256;

// Note [winograd non-finite]
// Winograd's transforms mix a tile's inputs and a filter's taps before the products, so a NaN or
// an infinity in x or w spreads over whole tiles (inf - inf = NaN) where direct convolution
// keeps it in the windows that hold it.  The reverse holds exactly: an output that direct
// convolution makes non-finite is non-finite here too (the transforms reproduce each of its
// products x[p] w[t] along a path of nonzero factors, and NaN and inf do not turn finite under
// + - and nonzero scaling), so when every output here is finite no non-finite value took part
// and the outputs are right.  So the output transform checks its results (out - out is 0 for
// finite values), and if any is NaN or inf (or overflowed) direct convolution computes the
// layer again (Note [non-finite inputs] in conv.cpp).  Finite inputs pay one add and one
// subtract per output vector.
template <class Tile, class T>
void winograd_tiles(const Conv2dArgs<T>& a, std::atomic<bool>& finite) {
  // An empty output (no image, channel or position) has no tile: nothing to do.  (The block
  // sizes below divide by the tile rows; an empty batch divided by zero.)
  if (a.n == 0 || a.k == 0 || a.ho == 0 || a.wo == 0) return;
  constexpr int m = Tile::m, al = Tile::a, npos = al * al;
  const std::int64_t C = a.c, K = a.k, H = a.h, W = a.w;
  const std::int64_t th = (a.ho + m - 1) / m, tw = (a.wo + m - 1) / m;  // tiles per column / row
  // U[xi] = (G g G^T)[xi] as a K x C matrix, packed once for the GEMMs (Note [prepacked A]);
  // a task takes whole MR-row panels, so each of the a*a matrices is written front to back.
  // The matrices lie usize apart, one cache line more than their size: with a power-of-two
  // size, the write streams would all map to one L1 set and evict each other.
  using S = GemmShape<T>;
  const std::int64_t kpad = (K + S::MR - 1) / S::MR * S::MR;
  const std::int64_t line = 64 / static_cast<std::int64_t>(sizeof(T));
  const std::int64_t usize = kpad * C + line;
  Scratch<T> u(npos * usize);
  parallel_for(kpad / S::MR, S::MR * C * 128, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      for (std::int64_t c = 0; c < C; ++c) {
        const std::int64_t base = prepacked_a_index<T>(K, p * S::MR, C, c);
        for (int r = 0; r < S::MR; ++r) {
          const std::int64_t k = p * S::MR + r;
          T* uk = u.data + base + r;  // U[xi](k, c) at uk[xi * usize]
          if (k >= K) {
            for (int xi = 0; xi < npos; ++xi) uk[xi * usize] = T(0);
            continue;
          }
          const T* g = a.weight + (k * C + c) * 9;
          T gg[3][al];  // (G g)^T: gg[j] = G times column j of g
          for (int j = 0; j < 3; ++j) {
            const T col[3] = {g[j], g[3 + j], g[6 + j]};
            Tile::filter(col, gg[j]);
          }
          for (int i = 0; i < al; ++i) {  // row i of (G g) G^T
            const T row[3] = {gg[0][i], gg[1][i], gg[2][i]};
            T out[al];
            Tile::filter(row, out);
            for (int j = 0; j < al; ++j) uk[(i * al + j) * usize] = out[j];
          }
        }
      }
    }
  });
  // blocks of tile rows, sized by the V they need (Note [winograd blocks])
  const std::int64_t tiles_per_block = kTilesPerBlock * 16 / npos;
  const std::int64_t total_rows = a.n * th, threads = get_num_threads();
  const std::int64_t per_thread = (total_rows * tw + threads - 1) / threads;
  const std::int64_t rounds = (per_thread + tiles_per_block - 1) / tiles_per_block;
  const std::int64_t num_blocks = threads * rounds;
  std::int64_t rows = (total_rows + num_blocks - 1) / num_blocks;
  rows = rows < 1 ? 1 : rows;
  const std::int64_t blocks = (total_rows + rows - 1) / rows;
  const std::int64_t wpad = m * tw + 2;  // a padded input row, wide enough for every tile

  parallel_for(blocks, rows * tw * C * K * 2, [&](std::int64_t b0, std::int64_t b1) {
    // V[xi][c][t] at v[xi * vplane + c * ld + t], M[xi][k][t] at m[xi * mplane + k * ld + t]:
    // rows and planes padded off multiples of 1 KiB, so that the rows of a GEMM panel and the
    // streams of a transform do not all fall into the same L1 sets.
    const std::int64_t tmax = rows * tw;
    std::int64_t ld = (tmax + line - 1) / line * line;
    if (ld % (16 * line) == 0) ld += line;
    const std::int64_t vplane = C * ld + line, mplane = K * ld + line;
    // per tile row: al input rows and their row transform; per block (so that the column
    // transforms run over all of the block's tiles at once, in long vectors): the al*al
    // column phases of the input, the m*al half-transformed and m*m transformed outputs
    Scratch<T> v(npos * vplane), mm(npos * mplane), rowbuf(al * wpad), tr(al * wpad),
        phase(npos * ld), orow(m * al * ld), yrow(m * m * ld);
    Vec<T> check = Vec<T>::set1(T(0)), unchecked = Vec<T>::set1(T(0));
    for (std::int64_t blk = b0; blk < b1; ++blk) {
      const std::int64_t row0 = blk * rows;
      const std::int64_t nrows = total_rows - row0 < rows ? total_rows - row0 : rows;
      const std::int64_t tiles = nrows * tw;
      // input transform: V[xi][c][t], t = r * tw + tj for the block's r-th tile row
      for (std::int64_t c = 0; c < C; ++c) {
        for (std::int64_t r = 0; r < nrows; ++r) {
          const std::int64_t n = (row0 + r) / th, ti = (row0 + r) % th;
          const T* plane = a.x + (n * C + c) * H * W;
          const std::int64_t y0 = m * ti - a.pad_top;
          const T* d[al];
          T* e[al];
          for (int i = 0; i < al; ++i) {  // the al input rows, zero-padded to wpad
            T* row = rowbuf.data + i * wpad;
            d[i] = row;
            e[i] = tr.data + i * wpad;
            const std::int64_t yy = y0 + i;
            if (yy < 0 || yy >= H) {
              for (std::int64_t x = 0; x < wpad; ++x) row[x] = T(0);
              continue;
            }
            const std::int64_t x0 = a.pad_left < wpad ? a.pad_left : wpad;
            const std::int64_t x1 = a.pad_left + W < wpad ? a.pad_left + W : wpad;
            for (std::int64_t x = 0; x < x0; ++x) row[x] = T(0);
            const T* src = plane + yy * W;  // input column x - pad_left
            for (std::int64_t x = x0; x < x1; ++x) row[x] = src[x - a.pad_left];
            for (std::int64_t x = x1; x < wpad; ++x) row[x] = T(0);
          }
          input_rows<Tile>(d, e, wpad);  // B^T d, along the whole row
          // column l of tile tj is m tj + l: phase (i, l) gathers it for every tile
          for (int i = 0; i < al; ++i)
            for (int l = 0; l < al; ++l) {
              T* dst = phase.data + (i * al + l) * ld + r * tw;
              const T* src = e[i] + l;
              for (std::int64_t tj = 0; tj < tw; ++tj) dst[tj] = src[m * tj];
            }
        }
        // (B^T d) B for all of the block's tiles
        for (int i = 0; i < al; ++i) {
          const T* ph[al];
          T* out[al];
          for (int l = 0; l < al; ++l) {
            ph[l] = phase.data + (i * al + l) * ld;
            out[l] = v.data + (i * al + l) * vplane + c * ld;
          }
          input_rows<Tile>(ph, out, tiles);
        }
      }
      // npos GEMMs: M[xi] (K x tiles) = U[xi] (K x C) V[xi] (C x tiles)
      for (int xi = 0; xi < npos; ++xi) {
        const T* uxi = u.data + xi * usize;
        const T* vxi = v.data + xi * vplane;
        auto pack_u = [&](std::int64_t i0, std::int64_t, std::int64_t k0, std::int64_t,
                          T*) -> const T* { return uxi + prepacked_a_index<T>(K, i0, C, k0); };
        if (K <= kFewOutputs) {  // V's rows are contiguous: read them in place
          gemm_rows<T>(
              K, tiles, C, pack_u, [&](std::int64_t c) { return vxi + c * ld; },
              mm.data + xi * mplane, ld);
        } else {
          gemm_blocked<T>(
              K, tiles, C, pack_u,
              [&](std::int64_t k0, std::int64_t kc, std::int64_t j0, std::int64_t nc, T* dst) {
                pack_b_strided(vxi, ld, std::int64_t{1}, k0, kc, j0, nc, dst);
              },
              mm.data + xi * mplane, ld, false);
        }
      }
      // output transform: Y = A^T M A per tile (+ bias), for all of the block's tiles at once,
      // then written out row by row, clipped to the output
      for (std::int64_t k = 0; k < K; ++k) {
        const T bias = a.bias ? a.bias[k] : T(0);
        for (int j = 0; j < al; ++j) {  // (A^T M)[b][j] at orow[(b * al + j) * ld + t]
          const T* col[al];
          T* dst[m];
          for (int i = 0; i < al; ++i) col[i] = mm.data + (i * al + j) * mplane + k * ld;
          for (int b = 0; b < m; ++b) dst[b] = orow.data + (b * al + j) * ld;
          output_rows<Tile>(col, dst, tiles, T(0), unchecked);
        }
        for (int b = 0; b < m; ++b) {  // (A^T M A)[b][l] at yrow[(b * m + l) * ld + t]
          const T* t[al];
          T* y[m];
          for (int j = 0; j < al; ++j) t[j] = orow.data + (b * al + j) * ld;
          for (int l = 0; l < m; ++l) y[l] = yrow.data + (b * m + l) * ld;
          output_rows<Tile>(t, y, tiles, bias, check);
        }
        const std::int64_t full = a.wo / m;  // tiles wholly inside a row
        for (std::int64_t r = 0; r < nrows; ++r) {
          const std::int64_t n = (row0 + r) / th, oy = m * ((row0 + r) % th);
          T* out = a.y + (n * K + k) * a.ho * a.wo;
          for (int b = 0; b < m && oy + b < a.ho; ++b) {  // output row oy + b
            T* o = out + (oy + b) * a.wo;
            const T* y = yrow.data + b * m * ld + r * tw;  // y[l * ld + tj]: column m tj + l
            for (std::int64_t tj = 0; tj < full; ++tj)
              for (int l = 0; l < m; ++l) o[m * tj + l] = y[l * ld + tj];
            for (std::int64_t l = 0; m * full + l < a.wo; ++l) o[m * full + l] = y[l * ld + full];
          }
        }
      }
    }
    if (!(reduce_add(check) == T(0))) finite.store(false, std::memory_order_relaxed);
  });
}

// Winograd, or direct convolution again where an output came out non-finite
// (Note [winograd non-finite]).
template <class Tile, class T>
void winograd(const Conv2dArgs<T>& a) {
  std::atomic<bool> finite{true};
  winograd_tiles<Tile>(a, finite);
  if (finite.load()) return;
  if constexpr (sizeof(T) == 4) {
    conv2d_f32(a);
  } else {
    conv2d_f64(a);
  }
}

}  // namespace

void conv2d_winograd_f32(const Conv2dArgs<float>& args) { winograd<TileF2>(args); }
void conv2d_winograd_f64(const Conv2dArgs<double>& args) { winograd<TileF2>(args); }
void conv2d_winograd4_f32(const Conv2dArgs<float>& args) { winograd<TileF4>(args); }
void conv2d_winograd4_f64(const Conv2dArgs<double>& args) { winograd<TileF4>(args); }
// 16-bit data: the float32 Winograd on float32 staging (Note [16-bit convolution]).
void conv2d_winograd_bf16(const Conv2dArgs<bf16>& args, float* y32) {
  conv2d_staged(args, y32, [](const Conv2dArgs<float>& f) { winograd<TileF2>(f); });
}
void conv2d_winograd_f16(const Conv2dArgs<f16>& args, float* y32) {
  conv2d_staged(args, y32, [](const Conv2dArgs<float>& f) { winograd<TileF2>(f); });
}
void conv2d_winograd4_bf16(const Conv2dArgs<bf16>& args, float* y32) {
  conv2d_staged(args, y32, [](const Conv2dArgs<float>& f) { winograd<TileF4>(f); });
}
void conv2d_winograd4_f16(const Conv2dArgs<f16>& args, float* y32) {
  conv2d_staged(args, y32, [](const Conv2dArgs<float>& f) { winograd<TileF4>(f); });
}

MLMATH_ISA_END
