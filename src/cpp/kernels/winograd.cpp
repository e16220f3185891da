// Winograd F(2x2, 3x3) convolution forward: 3x3 kernels, stride 1, dilation 1, one group.
//
// Each 2x2 output tile Y of one (image, output channel) comes from the 4x4 input patch d at
// (2 ti - pt, 2 tj - pl) as
//   Y = A^T [ sum_c (G g_kc G^T) o (B^T d_c B) ] A          (o: element-wise, 16 products)
// with
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1],
// i.e. 16 multiplications per tile and channel pair instead of 36.  The sum over c for each of
// the 16 positions xi is a GEMM:  M[xi] (K x T) = U[xi] (K x C) . V[xi] (C x T)  over T tiles.
//
// Tiles are processed in blocks of whole tile rows (Note [winograd blocks]); a block is one task:
// input transform into V, 16 GEMMs on the shared core (single-threaded inside the task), output
// transform into y (+ bias).  The filter transform U is computed once per call.  Every output
// element is produced by one task in a fixed order, so results do not depend on the number of
// threads.
//
// Accuracy: the transforms add and halve, so the float32 error stays within a small multiple of
// direct convolution's (see tests/test_conv.py for the stated tolerance).
#include <cstdint>

#include "common/gemm_core.h"
#include "common/parallel.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

namespace {

// Note [winograd blocks]
// A block is a run of whole tile rows, counted across images (global tile row = n * th + ti),
// of about 1024 tiles, with as many blocks as make an even split over the threads.  Each block
// packs the 16 transformed filters U[xi] again, which costs about 1/T of the GEMM's work per
// tile but runs at memory speed, so blocks must hold hundreds of tiles; their scratch
// V [16][C][T] and M [16][K][T] then lives in L3 rather than L2.
constexpr std::int64_t kTilesPerBlock = 1024;
// Output channels up to which the 16 GEMMs read V in place instead of packing it (gemm_rows).
constexpr std::int64_t kFewOutputs = 256;

template <class T>
void winograd_f23(const Conv2dArgs<T>& a) {
  const std::int64_t C = a.c, K = a.k, H = a.h, W = a.w;
  const std::int64_t th = (a.ho + 1) / 2, tw = (a.wo + 1) / 2;  // tiles per column / row
  // U[xi] = (G g G^T)[xi] as a K x C matrix, packed once for the GEMMs (Note [prepacked A]);
  // a task takes whole MR-row panels, so each of the 16 matrices is written front to back.
  // The matrices lie usize apart, one cache line more than their size: with a power-of-two
  // size, the 16 write streams would all map to one L1 set and evict each other.
  using S = GemmShape<T>;
  const std::int64_t kpad = (K + S::MR - 1) / S::MR * S::MR;
  const std::int64_t usize = kpad * C + 64 / static_cast<std::int64_t>(sizeof(T));
  Scratch<T> u(16 * usize);
  parallel_for(kpad / S::MR, S::MR * C * 64, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      for (std::int64_t c = 0; c < C; ++c) {
        const std::int64_t base = prepacked_a_index<T>(K, p * S::MR, C, c);
        for (int r = 0; r < S::MR; ++r) {
          const std::int64_t k = p * S::MR + r;
          T* uk = u.data + base + r;  // U[xi](k, c) at uk[xi * usize]
          if (k >= K) {
            for (int xi = 0; xi < 16; ++xi) uk[xi * usize] = T(0);
            continue;
          }
          const T* g = a.weight + (k * C + c) * 9;
          T gg[4][3];  // G g
          for (int j = 0; j < 3; ++j) {
            gg[0][j] = g[j];
            gg[1][j] = T(0.5) * (g[j] + g[3 + j] + g[6 + j]);
            gg[2][j] = T(0.5) * (g[j] - g[3 + j] + g[6 + j]);
            gg[3][j] = g[6 + j];
          }
          for (int i = 0; i < 4; ++i) {  // (G g) G^T
            uk[(i * 4 + 0) * usize] = gg[i][0];
            uk[(i * 4 + 1) * usize] = T(0.5) * (gg[i][0] + gg[i][1] + gg[i][2]);
            uk[(i * 4 + 2) * usize] = T(0.5) * (gg[i][0] - gg[i][1] + gg[i][2]);
            uk[(i * 4 + 3) * usize] = gg[i][2];
          }
        }
      }
    }
  });
  const std::int64_t total_rows = a.n * th, threads = get_num_threads();
  const std::int64_t per_thread = (total_rows * tw + threads - 1) / threads;
  const std::int64_t rounds = (per_thread + kTilesPerBlock - 1) / kTilesPerBlock;
  const std::int64_t num_blocks = threads * rounds;
  std::int64_t rows = (total_rows + num_blocks - 1) / num_blocks;
  rows = rows < 1 ? 1 : rows;
  const std::int64_t blocks = (total_rows + rows - 1) / rows;
  const std::int64_t wpad = 2 * tw + 2;  // a padded input row, wide enough for every tile

  parallel_for(blocks, rows * tw * C * K, [&](std::int64_t b0, std::int64_t b1) {
    // V[xi][c][t] at v[xi * vplane + c * ld + t], M[xi][k][t] at m[xi * mplane + k * ld + t]:
    // rows and planes padded off multiples of 1 KiB, so that the rows of a GEMM panel and the
    // 16 streams of a transform do not all fall into the same L1 sets.
    const std::int64_t tmax = rows * tw, line = 64 / static_cast<std::int64_t>(sizeof(T));
    std::int64_t ld = (tmax + line - 1) / line * line;
    if (ld % (16 * line) == 0) ld += line;
    const std::int64_t vplane = C * ld + line, mplane = K * ld + line;
    Scratch<T> v(16 * vplane), m(16 * mplane), rowbuf(4 * wpad), tr(4 * wpad), split(4 * (tw + 1));
    for (std::int64_t blk = b0; blk < b1; ++blk) {
      const std::int64_t row0 = blk * rows;
      const std::int64_t nrows = total_rows - row0 < rows ? total_rows - row0 : rows;
      const std::int64_t tiles = nrows * tw;
      // input transform: V[xi][c][t], t = r * tw + tj for the block's r-th tile row
      for (std::int64_t c = 0; c < C; ++c) {
        for (std::int64_t r = 0; r < nrows; ++r) {
          const std::int64_t n = (row0 + r) / th, ti = (row0 + r) % th;
          const T* plane = a.x + (n * C + c) * H * W;
          const std::int64_t y0 = 2 * ti - a.pad_top;
          T* d[4];
          for (int i = 0; i < 4; ++i) {  // the 4 input rows, zero-padded to wpad
            d[i] = rowbuf.data + i * wpad;
            const std::int64_t yy = y0 + i;
            for (std::int64_t x = 0; x < wpad; ++x) d[i][x] = T(0);
            if (yy < 0 || yy >= H) continue;
            const std::int64_t x0 = a.pad_left,
                               x1 = (a.pad_left + W < wpad ? a.pad_left + W : wpad);
            const T* src = plane + yy * W;
            for (std::int64_t x = x0; x < x1; ++x) d[i][x] = src[x - a.pad_left];
          }
          // B^T d: rows combined, along the whole row
          T* e[4];
          for (int i = 0; i < 4; ++i) e[i] = tr.data + i * wpad;
          for (std::int64_t x = 0; x < wpad; ++x) {
            e[0][x] = d[0][x] - d[2][x];
            e[1][x] = d[1][x] + d[2][x];
            e[2][x] = d[2][x] - d[1][x];
            e[3][x] = d[1][x] - d[3][x];
          }
          // (B^T d) B: columns 2tj .. 2tj+3 of each tile
          // even and odd columns apart, so that the tile loop below reads with unit stride
          T* ev = split.data;
          T* od = split.data + (tw + 1);
          for (int i = 0; i < 4; ++i) {
            const T* row = e[i];
            for (std::int64_t x = 0; x <= tw; ++x) {
              ev[x] = row[2 * x];
              od[x] = row[2 * x + 1];
            }
            T* v0 = v.data + (i * 4 + 0) * vplane + c * ld + r * tw;
            T* v1 = v.data + (i * 4 + 1) * vplane + c * ld + r * tw;
            T* v2 = v.data + (i * 4 + 2) * vplane + c * ld + r * tw;
            T* v3 = v.data + (i * 4 + 3) * vplane + c * ld + r * tw;
            for (std::int64_t tj = 0; tj < tw; ++tj) {  // columns 2tj, 2tj+1, 2tj+2, 2tj+3
              v0[tj] = ev[tj] - ev[tj + 1];
              v1[tj] = od[tj] + ev[tj + 1];
              v2[tj] = ev[tj + 1] - od[tj];
              v3[tj] = od[tj] - od[tj + 1];
            }
          }
        }
      }
      // 16 GEMMs: M[xi] (K x tiles) = U[xi] (K x C) V[xi] (C x tiles)
      for (int xi = 0; xi < 16; ++xi) {
        const T* uxi = u.data + xi * usize;
        const T* vxi = v.data + xi * vplane;
        auto pack_u = [&](std::int64_t i0, std::int64_t, std::int64_t k0, std::int64_t,
                          T*) -> const T* { return uxi + prepacked_a_index<T>(K, i0, C, k0); };
        if (K <= kFewOutputs) {  // V's rows are contiguous: read them in place
          gemm_rows<T>(
              K, tiles, C, pack_u, [&](std::int64_t c) { return vxi + c * ld; },
              m.data + xi * mplane, ld);
        } else {
          gemm_blocked<T>(
              K, tiles, C, pack_u,
              [&](std::int64_t k0, std::int64_t kc, std::int64_t j0, std::int64_t nc, T* dst) {
                pack_b_strided(vxi, ld, std::int64_t{1}, k0, kc, j0, nc, dst);
              },
              m.data + xi * mplane, ld, false);
        }
      }
      // output transform: Y = A^T M A per tile, clipped to the output
      for (std::int64_t k = 0; k < K; ++k) {
        const T bias = a.bias ? a.bias[k] : T(0);
        for (std::int64_t r = 0; r < nrows; ++r) {
          const std::int64_t n = (row0 + r) / th, oy = 2 * ((row0 + r) % th);
          T* out = a.y + (n * K + k) * a.ho * a.wo;
          const T* mm[16];
          for (int xi = 0; xi < 16; ++xi) mm[xi] = m.data + xi * mplane + k * ld + r * tw;
          // A^T M A for all tiles of the row at once (unit-stride loops), then interleaved
          T* y0r = split.data;  // y0r[2tj + b] = output row oy, column 2tj + b
          T* y1r = split.data + 2 * tw;
          for (std::int64_t tj = 0; tj < tw; ++tj) {
            T t0[4], t1[4];
            for (int j = 0; j < 4; ++j) {
              t0[j] = mm[j][tj] + mm[4 + j][tj] + mm[8 + j][tj];
              t1[j] = mm[4 + j][tj] - mm[8 + j][tj] - mm[12 + j][tj];
            }
            y0r[2 * tj] = t0[0] + t0[1] + t0[2] + bias;
            y0r[2 * tj + 1] = t0[1] - t0[2] - t0[3] + bias;
            y1r[2 * tj] = t1[0] + t1[1] + t1[2] + bias;
            y1r[2 * tj + 1] = t1[1] - t1[2] - t1[3] + bias;
          }
          T* o0 = out + oy * a.wo;
          for (std::int64_t x = 0; x < a.wo; ++x) o0[x] = y0r[x];
          if (oy + 1 < a.ho)
            for (std::int64_t x = 0; x < a.wo; ++x) o0[a.wo + x] = y1r[x];
        }
      }
    }
  });
}

}  // namespace

void conv2d_winograd_f32(const Conv2dArgs<float>& args) { winograd_f23(args); }
void conv2d_winograd_f64(const Conv2dArgs<double>& args) { winograd_f23(args); }

MLMATH_ISA_END
