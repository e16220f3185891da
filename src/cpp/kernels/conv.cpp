// 2-D convolution forward (PyTorch's conv2d, zero padding), see Conv2dArgs in mlmath.h.
//
// Implicit GEMM: for image n and group g,
//   Y[n, g] (Kg x Ho*Wo) = W[g] (Kg x Cg*R*S) . Col (Cg*R*S x Ho*Wo),
//   Col[(c, r, s)][(i, j)] = x[n][g*Cg + c][i*sh - pt + r*dh][j*sw - pl + s*dw]   (0 outside)
// The GEMM core asks for B panels of KC rows x NC columns; pack_col gathers exactly those from
// x, so the im2col matrix never exists (scratch: one KC x NC block shared by the threads, one
// MC x KC block of W per thread).  A 1x1, stride-1, unpadded convolution reads x directly as
// B.  Depthwise convolutions (one input channel per group) skip the GEMM: each output plane is
// a sum of R*S shifted, scaled input rows, vectorised along the output row.
//
// Work is split over images and groups when there are enough of them (each GEMM then runs on
// one thread), else inside each GEMM; either way every output element is computed by one
// thread in a fixed order, so results do not depend on the number of threads.
//
// bf16 / f16 data run these float32 kernels on float32 staging buffers, one rounding per
// result: Note [16-bit convolution] in kernels/conv_stage.h.
#include <atomic>
#include <cstdint>

#include "common/gemm_core.h"
#include "common/parallel.h"
#include "kernels/conv_stage.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

namespace {

// B panels for the implicit GEMM of image n, group g (see the formula above).
template <class T>
void pack_col(const Conv2dArgs<T>& a, const T* xg, std::int64_t k0, std::int64_t kc,
              std::int64_t j0, std::int64_t nc, T* dst) {
  constexpr int NR = GemmShape<T>::NR;
  const std::int64_t rs = a.r * a.s;
  for (std::int64_t q = 0; q < nc; q += NR) {
    const std::int64_t cols = nc - q < NR ? nc - q : NR;
    T* out = dst + q * kc;
    // the output position of the panel's first column
    const std::int64_t jstart = j0 + q;
    for (std::int64_t kk = 0; kk < kc; ++kk) {
      const std::int64_t row = k0 + kk;
      const std::int64_t c = row / rs, r = (row % rs) / a.s, s = row % a.s;
      const T* plane = xg + c * a.h * a.w;
      const std::int64_t dy = r * a.dil_h - a.pad_top, dx = s * a.dil_w - a.pad_left;
      T* o = out + kk * NR;
      std::int64_t i = jstart / a.wo, j = jstart % a.wo;
      for (std::int64_t col = 0; col < cols;) {
        // a run of columns on output row i
        const std::int64_t run = (a.wo - j < cols - col) ? a.wo - j : cols - col;
        const std::int64_t ih = i * a.stride_h + dy;
        if (ih < 0 || ih >= a.h) {
          for (std::int64_t t = 0; t < run; ++t) o[col + t] = T(0);
        } else if (a.stride_w == 1) {
          // input columns j + t + dx: zeros left of 0, a contiguous copy, zeros from W on
          const T* src = plane + ih * a.w + j + dx;
          std::int64_t t0 = -(j + dx), t1 = a.w - (j + dx);
          t0 = t0 < 0 ? 0 : (t0 > run ? run : t0);
          t1 = t1 > run ? run : (t1 < t0 ? t0 : t1);
          T* dst_run = o + col;
          for (std::int64_t t = 0; t < t0; ++t) dst_run[t] = T(0);
          for (std::int64_t t = t0; t < t1; ++t) dst_run[t] = src[t];
          for (std::int64_t t = t1; t < run; ++t) dst_run[t] = T(0);
        } else {
          const T* src = plane + ih * a.w;
          for (std::int64_t t = 0; t < run; ++t) {
            const std::int64_t iw = (j + t) * a.stride_w + dx;
            o[col + t] = (iw >= 0 && iw < a.w) ? src[iw] : T(0);
          }
        }
        col += run;
        j = 0;
        ++i;
      }
      for (std::int64_t col = cols; col < NR; ++col) o[col] = T(0);
    }
  }
}

// Note [shifted rows]
// For stride 1, copy the group's input into a zero-padded buffer xp [Cg][Hp][Wp] and compute the
// output on the padded width: with p = i * Wp + j,
//   Col[(c, r, s)][p] = xp[c * Hp*Wp + r*dh*Wp + s*dw + p],
// so every row of the GEMM's B is a contiguous run of xp at a fixed shift and packing is a plain
// copy.  Columns j >= Wo of each output row read past the row's end and are dropped; the valid
// ones (j + s*dw <= Wp - 1) are exact.  The buffer has (S - 1) * dw slack elements at its end
// for the dropped columns of the last row.  Scratch: the padded input and the Kg x Ho*Wp result.
// dst [cg][hp][wp] (+ slack zeros) = the cg planes x [cg][h][w] placed at (pad_top, pad_left)
// in zeros (rows or columns beyond hp x wp are cut): the padded buffer of Note [shifted rows].
template <class T>
void copy_padded(const T* x, std::int64_t cg, std::int64_t h, std::int64_t w, std::int64_t pad_top,
                 std::int64_t pad_left, std::int64_t hp, std::int64_t wp, std::int64_t slack,
                 T* dst) {
  const std::int64_t plane = hp * wp;
  for (std::int64_t i = 0; i < cg * plane + slack; ++i) dst[i] = T(0);
  const std::int64_t cols = w < wp - pad_left ? w : wp - pad_left;
  for (std::int64_t c = 0; c < cg; ++c)
    for (std::int64_t ih = 0; ih < h && ih + pad_top < hp; ++ih) {
      const T* src = x + (c * h + ih) * w;
      T* out = dst + c * plane + (ih + pad_top) * wp + pad_left;
      for (std::int64_t j = 0; j < cols; ++j) out[j] = src[j];
    }
}

// Where B row (c, r, s) of a shifted-row GEMM starts in the padded buffer xp [C][Hp][Wp]
// (Note [shifted rows]).
inline std::int64_t shifted_row_start(std::int64_t row, std::int64_t r_taps, std::int64_t s_taps,
                                      std::int64_t plane, std::int64_t wp, std::int64_t dil_h,
                                      std::int64_t dil_w) {
  const std::int64_t taps = r_taps * s_taps;
  return (row / taps) * plane + ((row % taps) / s_taps) * dil_h * wp + (row % s_taps) * dil_w;
}

// Output channels up to which a shifted-row convolution skips packing B (gemm_rows).
constexpr std::int64_t kFewOutputChannels = 64;

template <class T>
void conv_shifted(const Conv2dArgs<T>& a, const T* xg, const T* wg, std::int64_t kg, T* yg) {
  const std::int64_t cg = a.c / a.groups, kdim = cg * a.r * a.s;
  const std::int64_t pad_bottom = (a.ho - 1) + a.dil_h * (a.r - 1) + 1 - a.h - a.pad_top;
  const std::int64_t pad_right = (a.wo - 1) + a.dil_w * (a.s - 1) + 1 - a.w - a.pad_left;
  const std::int64_t hp = a.h + a.pad_top + (pad_bottom > 0 ? pad_bottom : 0);
  const std::int64_t wp = a.w + a.pad_left + (pad_right > 0 ? pad_right : 0);
  const std::int64_t plane = hp * wp, slack = (a.s - 1) * a.dil_w;
  Scratch<T> xp(cg * plane + slack);
  copy_padded(xg, cg, a.h, a.w, a.pad_top, a.pad_left, hp, wp, slack, xp.data);
  const std::int64_t wide = a.ho * wp;  // output positions on the padded width
  Scratch<T> out(kg * wide);
  auto shift = [&](std::int64_t row) {
    return shifted_row_start(row, a.r, a.s, plane, wp, a.dil_h, a.dil_w);
  };
  auto pack_w = [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* d) {
    pack_a_strided(wg, kdim, std::int64_t{1}, kg, i0, mc, k0, kc, d);
  };
  {
    gemm_blocked<T>(
        kg, wide, kdim, pack_w,
        [&](std::int64_t k0, std::int64_t kc, std::int64_t j0, std::int64_t nc, T* d) {
          constexpr int NR = GemmShape<T>::NR;
          for (std::int64_t q = 0; q < nc; q += NR) {
            const std::int64_t cols = nc - q < NR ? nc - q : NR;
            for (std::int64_t k = 0; k < kc; ++k) {
              const T* src = xp.data + shift(k0 + k) + j0 + q;
              T* o = d + q * kc + k * NR;
              for (std::int64_t t = 0; t < cols; ++t) o[t] = src[t];
              for (std::int64_t t = cols; t < NR; ++t) o[t] = T(0);
            }
          }
        },
        out.data, wide, false);
  }
  for (std::int64_t k = 0; k < kg; ++k)
    for (std::int64_t i = 0; i < a.ho; ++i) {
      const T* src = out.data + k * wide + i * wp;
      T* dst = yg + (k * a.ho + i) * a.wo;
      for (std::int64_t j = 0; j < a.wo; ++j) dst[j] = src[j];
    }
}

// Stride 1 with few output channels (Note [shifted rows]), all images at once: the padded
// inputs are copied first, the weights packed once per group; then each task, one run of
// output rows of one (image, group), reads the shifted rows in place (gemm_rows: few output
// channels would not amortise packing B) into a Kg x rows*Wp scratch that stays in L2, and
// copies its valid columns out (+ bias).  The runs keep every thread busy on one image too.
// Each output element is one task's sum over the same K in the same order, so the results do
// not depend on the runs or the threads.
template <class T>
void conv_shifted_rows(const Conv2dArgs<T>& a) {
  using S = GemmShape<T>;
  const std::int64_t cg = a.c / a.groups, kg = a.k / a.groups, kdim = cg * a.r * a.s;
  const std::int64_t pad_bottom = (a.ho - 1) + a.dil_h * (a.r - 1) + 1 - a.h - a.pad_top;
  const std::int64_t pad_right = (a.wo - 1) + a.dil_w * (a.s - 1) + 1 - a.w - a.pad_left;
  const std::int64_t hp = a.h + a.pad_top + (pad_bottom > 0 ? pad_bottom : 0);
  const std::int64_t wp = a.w + a.pad_left + (pad_right > 0 ? pad_right : 0);
  const std::int64_t plane = hp * wp, slack = (a.s - 1) * a.dil_w, xsize = cg * plane + slack;
  const std::int64_t images = a.n * a.groups;
  Scratch<T> xp(images * xsize);
  parallel_for(images, xsize, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t n = t / a.groups, g = t % a.groups;
      copy_padded(a.x + (n * a.c + g * cg) * a.h * a.w, cg, a.h, a.w, a.pad_top, a.pad_left, hp, wp,
                  slack, xp.data + t * xsize);
    }
  });
  const std::int64_t wsize = (kg + S::MR - 1) / S::MR * S::MR * kdim;
  Scratch<T> wpack(a.groups * wsize);
  for (std::int64_t g = 0; g < a.groups; ++g) {
    const T* wg = a.weight + g * kg * kdim;
    prepack_a<T>(
        kg, kdim,
        [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* d) {
          pack_a_strided(wg, kdim, std::int64_t{1}, kg, i0, mc, k0, kc, d);
        },
        wpack.data + g * wsize);
  }
  std::int64_t rows = (std::int64_t{1} << 16) / (kg * wp);  // about 64K values of scratch
  rows = rows < 1 ? 1 : (rows > a.ho ? a.ho : rows);
  const std::int64_t runs = (a.ho + rows - 1) / rows;
  parallel_for(images * runs, kg * rows * wp * kdim, [&](std::int64_t t0, std::int64_t t1) {
    Scratch<T> out(kg * rows * wp);
    for (std::int64_t t = t0; t < t1; ++t) {
      if (interrupted()) return;  // Note [interrupts] (dispatch/threads.cpp)
      const std::int64_t image = t / runs, i0 = t % runs * rows;
      const std::int64_t n = image / a.groups, g = image % a.groups;
      const std::int64_t nr = a.ho - i0 < rows ? a.ho - i0 : rows, wide = nr * wp;
      const T* xi = xp.data + image * xsize + i0 * wp;
      const T* wg = wpack.data + g * wsize;
      gemm_rows<T>(
          kg, wide, kdim,
          [&](std::int64_t r0, std::int64_t, std::int64_t k0, std::int64_t, T*) -> const T* {
            return wg + prepacked_a_index<T>(kg, r0, kdim, k0);
          },
          [&](std::int64_t row) {
            return xi + shifted_row_start(row, a.r, a.s, plane, wp, a.dil_h, a.dil_w);
          },
          out.data, wide);
      for (std::int64_t k = 0; k < kg; ++k) {
        const T b = a.bias ? a.bias[g * kg + k] : T(0);
        for (std::int64_t i = 0; i < nr; ++i) {
          const T* src = out.data + k * wide + i * wp;
          T* dst = a.y + ((n * a.k + g * kg + k) * a.ho + i0 + i) * a.wo;
          for (std::int64_t j = 0; j < a.wo; ++j) dst[j] = src[j] + b;
        }
      }
    }
  });
}

template <class T>
void conv_gemm(const Conv2dArgs<T>& a) {
  const std::int64_t cg = a.c / a.groups, kg = a.k / a.groups;
  const std::int64_t kdim = cg * a.r * a.s, pixels = a.ho * a.wo;
  const bool pointwise = a.r == 1 && a.s == 1 && a.stride_h == 1 && a.stride_w == 1 &&
                         a.pad_top == 0 && a.pad_left == 0 && a.ho == a.h && a.wo == a.w;
  if (!pointwise && a.stride_h == 1 && a.stride_w == 1 && kg <= kFewOutputChannels) {
    conv_shifted_rows(a);
    return;
  }
  auto one = [&](std::int64_t task) {
    const std::int64_t n = task / a.groups, g = task % a.groups;
    const T* xg = a.x + (n * a.c + g * cg) * a.h * a.w;
    const T* wg = a.weight + g * kg * kdim;
    T* yg = a.y + (n * a.k + g * kg) * pixels;
    auto pack_a = [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* d) {
      pack_a_strided(wg, kdim, std::int64_t{1}, kg, i0, mc, k0, kc, d);
    };
    if (pointwise) {
      gemm_blocked<T>(
          kg, pixels, kdim, pack_a,
          [&](std::int64_t k0, std::int64_t kc, std::int64_t j0, std::int64_t nc, T* d) {
            pack_b_strided(xg, pixels, std::int64_t{1}, k0, kc, j0, nc, d);
          },
          yg, pixels, false);
    } else if (a.stride_h == 1 && a.stride_w == 1) {
      conv_shifted(a, xg, wg, kg, yg);
    } else {
      gemm_blocked<T>(
          kg, pixels, kdim, pack_a,
          [&](std::int64_t k0, std::int64_t kc, std::int64_t j0, std::int64_t nc, T* d) {
            pack_col(a, xg, k0, kc, j0, nc, d);
          },
          yg, pixels, false);
    }
    if (a.bias) {
      for (std::int64_t k = 0; k < kg; ++k) {
        const T b = a.bias[g * kg + k];
        T* row = yg + k * pixels;
        for (std::int64_t p = 0; p < pixels; ++p) row[p] += b;
      }
    }
  };
  const std::int64_t tasks = a.n * a.groups;
  const std::int64_t per_task = kg * pixels * kdim;
  if (tasks >= 2 * get_num_threads() || per_task < (std::int64_t{1} << 22)) {
    // many small GEMMs: one per thread at a time (gemm_blocked then runs single-threaded)
    parallel_for(tasks, per_task / 64, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t t = b; t < e; ++t) one(t);
    });
  } else {
    for (std::int64_t t = 0; t < tasks; ++t) one(t);
  }
}

// Depthwise: each output channel k reads input channel k / (K / C) (groups == C).  Per (image,
// channel) task the input plane is copied into a zero-padded scratch (small: it stays in L1),
// so the loops need no bounds checks; with stride 1 each vector of an output row is summed over
// the R*S taps in registers and stored once.
// One output row of a 3x3 depthwise layer, stride 1: out[j] = b + sum_{r,s} w[r][s] *
// in[r * rs + s * ds + j] (rows rs apart, taps ds apart); one accumulator per kernel row, so
// the three chains of FMAs overlap.
template <class T>
void depthwise_row3x3(const T* in, std::int64_t rs, std::int64_t ds, const T* w, T b, T* out,
                      std::int64_t n) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  V wv[9];
  for (int q = 0; q < 9; ++q) wv[q] = V::set1(w[q]);
  const V vb = V::set1(b);
  for (std::int64_t j = 0; j < n; j += W) {
    V acc[3];
    for (int r = 0; r < 3; ++r) {
      const T* row = in + r * rs + j;
      acc[r] = mul(wv[3 * r], V::load(row));
      acc[r] = fma(wv[3 * r + 1], V::load(row + ds), acc[r]);
      acc[r] = fma(wv[3 * r + 2], V::load(row + 2 * ds), acc[r]);
    }
    const V sum = add(add(acc[0], vb), add(acc[1], acc[2]));
    if (j + W <= n) {
      sum.store(out + j);
    } else {
      sum.store_partial(out + j, n - j);
    }
  }
}

template <class T>
void conv_depthwise(const Conv2dArgs<T>& a) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const std::int64_t mult = a.k / a.c, taps = a.r * a.s;
  // the padded plane: every row and column a window reaches
  const std::int64_t hp = (a.ho - 1) * a.stride_h + (a.r - 1) * a.dil_h + 1;
  const std::int64_t wp = (a.wo - 1) * a.stride_w + (a.s - 1) * a.dil_w + 1;
  parallel_for(a.n * a.k, a.ho * a.wo * taps, [&](std::int64_t b, std::int64_t e) {
    Scratch<T> xp(hp * wp + W);  // + W: the last vector of a row may read past the plane
    Scratch<T> wv(taps);
    for (std::int64_t t = b; t < e; ++t) {
      const std::int64_t n = t / a.k, k = t % a.k;
      const T* plane = a.x + (n * a.c + k / mult) * a.h * a.w;
      for (std::int64_t y = 0; y < hp; ++y) {
        const std::int64_t iy = y - a.pad_top;
        T* row = xp.data + y * wp;
        if (iy < 0 || iy >= a.h) {
          for (std::int64_t x = 0; x < wp; ++x) row[x] = T(0);
          continue;
        }
        const std::int64_t x0 = a.pad_left < wp ? a.pad_left : wp;
        const std::int64_t x1 = a.pad_left + a.w < wp ? a.pad_left + a.w : wp;
        const T* src = plane + iy * a.w;  // input column x - pad_left
        for (std::int64_t x = 0; x < x0; ++x) row[x] = T(0);
        for (std::int64_t x = x0; x < x1; ++x) row[x] = src[x - a.pad_left];
        for (std::int64_t x = x1; x < wp; ++x) row[x] = T(0);
      }
      for (std::int64_t x = 0; x < W; ++x) xp.data[hp * wp + x] = T(0);
      for (std::int64_t q = 0; q < taps; ++q) wv.data[q] = a.weight[k * taps + q];
      T* out = a.y + t * a.ho * a.wo;
      const T b0 = a.bias ? a.bias[k] : T(0);
      for (std::int64_t i = 0; i < a.ho; ++i) {
        T* orow = out + i * a.wo;
        const T* top = xp.data + i * a.stride_h * wp;  // window row 0 of output row i
        if (a.stride_w != 1) {
          for (std::int64_t j = 0; j < a.wo; ++j) {
            T acc = b0;
            for (std::int64_t r = 0; r < a.r; ++r) {
              const T* in = top + r * a.dil_h * wp + j * a.stride_w;
              for (std::int64_t s = 0; s < a.s; ++s) acc += wv.data[r * a.s + s] * in[s * a.dil_w];
            }
            orow[j] = acc;
          }
          continue;
        }
        if (a.r == 3 && a.s == 3) {
          depthwise_row3x3(top, a.dil_h * wp, a.dil_w, wv.data, b0, orow, a.wo);
          continue;
        }
        for (std::int64_t j = 0; j < a.wo; j += W) {
          V acc = V::set1(b0);
          for (std::int64_t r = 0; r < a.r; ++r) {
            const T* in = top + r * a.dil_h * wp + j;
            for (std::int64_t s = 0; s < a.s; ++s)
              acc = fma(V::set1(wv.data[r * a.s + s]), V::load(in + s * a.dil_w), acc);
          }
          if (j + W <= a.wo) {
            acc.store(orow + j);
          } else {
            acc.store_partial(orow + j, a.wo - j);
          }
        }
      }
    }
  });
}

template <class T>
void conv2d(const Conv2dArgs<T>& a) {
  if (a.n == 0 || a.k == 0 || a.ho == 0 || a.wo == 0) return;
  if (a.groups == a.c && (a.groups > 1 || a.k == 1)) {  // depthwise, or one plane to one
    conv_depthwise(a);
  } else {
    conv_gemm(a);
  }
}

// Note [weight gradient]
// With x' image n's zero-padded input in (row, column, channel) order and p = (i, j) an output
// position, per group
//   grad_w[k][(r, s, c)] = sum_n sum_p G_n[k][p] . Row_n[p][(r, s, c)],
//   Row_n[p][(r, s, c)] = x'_n[i*sh + r*dh][j*sw + s*dw][g*Cg + c],
// G_n the Kg x P rows of grad_out.  The Cg entries of one (r, s) are contiguous in x', and with
// dilation 1 and one group the S*C entries of one r are, so a block of KC rows of Row_n is built
// by copying runs, and the GEMM (M = Kg, N = R*S*Cg, K = the block's rows) reads those rows in
// place (gemm_rows): no transposed packing of the large operand.
// Work: the N = R*S*Cg columns are cut into slices (whole NR panels), the P positions of each
// image into `parts` runs; per group and slice, the (image, part) pairs are dealt in order into
// buckets, each summed by one thread into its own partial, and the partials are added in bucket
// order.  Every count depends only on the shapes, so the result is the same for any number of
// threads.  Slices come first (they need no partials); buckets make up the rest of about
// kTasks tasks.
constexpr std::int64_t kTasks = 16;

template <class T>
void conv_grad_weight(const Conv2dWeightGradArgs<T>& a) {
  const std::int64_t cg = a.c / a.groups, kg = a.k / a.groups, taps = a.r * a.s;
  const std::int64_t kdim = taps * cg, per_group = kg * kdim, P = a.ho * a.wo;
  if (a.n == 0 || P == 0) {
    for (std::int64_t e = 0; e < a.k * kdim; ++e) a.grad_weight[e] = T(0);
    return;
  }
  if (per_group == 0) return;
  // x' [n][hp][wp][c]: only the rows and columns the windows reach
  const std::int64_t hp = (a.ho - 1) * a.stride_h + a.dil_h * (a.r - 1) + 1;
  const std::int64_t wp = (a.wo - 1) * a.stride_w + a.dil_w * (a.s - 1) + 1;
  Scratch<T> xt(a.n * hp * wp * a.c);
  parallel_for(a.n * hp, wp * a.c, [&](std::int64_t q0, std::int64_t q1) {
    const std::int64_t x0 = a.pad_left, x1 = a.pad_left + a.w < wp ? a.pad_left + a.w : wp;
    for (std::int64_t q = q0; q < q1; ++q) {
      const std::int64_t n = q / hp, iy = q % hp - a.pad_top;
      T* dst = xt.data + q * wp * a.c;  // wp * C values: small enough to stay in L1
      for (std::int64_t e = 0; e < wp * a.c; ++e) dst[e] = T(0);
      if (iy < 0 || iy >= a.h) continue;
      // each input row is read front to back (the planes lie a power of two apart on common
      // shapes, so reading across them would thrash one cache set)
      for (std::int64_t c = 0; c < a.c; ++c) {
        const T* src = a.x + ((n * a.c + c) * a.h + iy) * a.w - a.pad_left;
        for (std::int64_t xx = x0; xx < x1; ++xx) dst[xx * a.c + c] = src[xx];
      }
    }
  });
  // G_n of every image and group, packed once as the GEMMs' A (Note [prepacked A]):
  // gpack + (n * groups + g) * gsize, P blocks of KC positions
  using S = GemmShape<T>;
  const std::int64_t kpad = (kg + S::MR - 1) / S::MR * S::MR, gsize = kpad * P;
  const std::int64_t pblocks = (P + S::KC - 1) / S::KC;
  Scratch<T> gpack(a.n * a.groups * gsize);
  parallel_for(a.n * a.groups * pblocks, kpad * S::KC, [&](std::int64_t q0, std::int64_t q1) {
    for (std::int64_t q = q0; q < q1; ++q) {
      const std::int64_t ng = q / pblocks, pc = q % pblocks * S::KC;
      const std::int64_t kc = P - pc < S::KC ? P - pc : S::KC;
      pack_a_strided(a.grad_out + ng * kg * P, P, std::int64_t{1}, kg, std::int64_t{0}, kpad, pc,
                     kc, gpack.data + ng * gsize + pc * kpad);
    }
  });
  // slices, parts and buckets (Note [weight gradient]); slices only where the partials of
  // kTasks buckets would be large
  const std::int64_t panels = (kdim + S::NR - 1) / S::NR;
  const bool large = per_group * kTasks * static_cast<std::int64_t>(sizeof(T)) > (8 << 20);
  std::int64_t slices = !large ? 1 : (panels / 4 < kTasks ? panels / 4 : kTasks);
  slices = slices < 1 ? 1 : slices;
  const std::int64_t slice_cols = (panels + slices - 1) / slices * S::NR;
  slices = (kdim + slice_cols - 1) / slice_cols;
  const std::int64_t want = (kTasks + slices - 1) / slices;  // buckets per (group, slice)
  std::int64_t parts = (want + a.n - 1) / a.n;               // runs of whole P blocks
  parts = parts > pblocks ? pblocks : parts;
  const std::int64_t items = a.n * parts;  // (image, part) pairs per group
  const std::int64_t buckets = items < want ? items : want;
  const std::int64_t line = 64 / static_cast<std::int64_t>(sizeof(T));
  std::int64_t ldr = (slice_cols + line - 1) / line * line;  // row stride, off 1 KiB multiples
  if (ldr % (16 * line) == 0) ldr += line;
  const bool one_run = a.dil_w == 1 && a.groups == 1;  // the S*C entries of one r: one run
  // runs of at least two panels are read in place from x' (one GEMM per r), shorter ones copied
  const bool in_place = one_run && a.s * cg >= 2 * S::NR;
  // partial[g][bucket][k][(r, s, c)]
  Scratch<T> partial(a.groups * buckets * per_group);
  const std::int64_t tasks = a.groups * slices * buckets;
  const std::int64_t work = per_group * (a.n * P / buckets) * 2 / slices;
  parallel_for(tasks, work, [&](std::int64_t t0, std::int64_t t1) {
    Scratch<T> rows(S::KC * ldr);
    for (std::int64_t t = t0; t < t1; ++t) {
      if (interrupted()) return;  // Note [interrupts] (dispatch/threads.cpp)
      const std::int64_t gi = t / (slices * buckets), sl = (t / buckets) % slices;
      const std::int64_t b = t % buckets;
      const std::int64_t col0 = sl * slice_cols;
      const std::int64_t ncols = kdim - col0 < slice_cols ? kdim - col0 : slice_cols;
      T* out = partial.data + (gi * buckets + b) * per_group + col0;  // ldc kdim
      for (std::int64_t k = 0; k < kg; ++k)
        for (std::int64_t e = 0; e < ncols; ++e) out[k * kdim + e] = T(0);
      for (std::int64_t item = items * b / buckets; item < items * (b + 1) / buckets; ++item) {
        const std::int64_t n = item / parts, part = item % parts;
        const T* ximg = xt.data + n * hp * wp * a.c + gi * cg;
        const T* gn = gpack.data + (n * a.groups + gi) * gsize;
        const std::int64_t begin = pblocks * part / parts * S::KC;
        const std::int64_t end_block = pblocks * (part + 1) / parts * S::KC;
        const std::int64_t end = end_block < P ? end_block : P;
        for (std::int64_t pc = begin; pc < end; pc += S::KC) {
          const std::int64_t kc = end - pc < S::KC ? end - pc : S::KC;
          auto a_block = [&](std::int64_t i0, std::int64_t, std::int64_t, std::int64_t,
                             T*) -> const T* { return gn + prepacked_a_index<T>(kg, i0, P, pc); };
          if (in_place) {  // the slice's columns, cut at the runs of each r
            for (std::int64_t q = 0; q < ncols;) {
              const std::int64_t col = col0 + q, r = col / (a.s * cg), off = col % (a.s * cg);
              const std::int64_t run = a.s * cg - off < ncols - q ? a.s * cg - off : ncols - q;
              const T* base = ximg + r * a.dil_h * wp * a.c + off;
              gemm_rows<T>(
                  kg, run, kc, a_block,
                  [&](std::int64_t e) {
                    const std::int64_t i = (pc + e) / a.wo, j = (pc + e) % a.wo;
                    return base + (i * a.stride_h * wp + j * a.stride_w) * a.c;
                  },
                  out + q, kdim, true);
              q += run;
            }
            continue;
          }
          for (std::int64_t e = 0; e < kc; ++e) {  // rows[e] = Row_n[pc + e][col0, col0 + ncols)
            const std::int64_t i = (pc + e) / a.wo, j = (pc + e) % a.wo;
            const T* src = ximg + (i * a.stride_h * wp + j * a.stride_w) * a.c;
            T* o = rows.data + e * ldr;
            if (one_run) {  // column (r, s, c) = r * S*C + (s*C + c): x' row r, offset s*C + c
              for (std::int64_t q = 0; q < ncols;) {
                const std::int64_t col = col0 + q, r = col / (a.s * cg), off = col % (a.s * cg);
                const std::int64_t run = a.s * cg - off < ncols - q ? a.s * cg - off : ncols - q;
                const T* from = src + r * a.dil_h * wp * a.c + off;
                for (std::int64_t u = 0; u < run; ++u) o[q + u] = from[u];
                q += run;
              }
              continue;
            }
            for (std::int64_t q = 0; q < ncols;) {  // runs of Cg: column (tap, c)
              const std::int64_t col = col0 + q, tap = col / cg, c = col % cg;
              const std::int64_t run = cg - c < ncols - q ? cg - c : ncols - q;
              const T* from = src + ((tap / a.s) * a.dil_h * wp + (tap % a.s) * a.dil_w) * a.c + c;
              for (std::int64_t u = 0; u < run; ++u) o[q + u] = from[u];
              q += run;
            }
          }
          gemm_rows<T>(
              kg, ncols, kc, a_block, [&](std::int64_t e) { return rows.data + e * ldr; }, out,
              kdim, true);
        }
      }
    }
  });
  // grad_w[g*Kg + k][c][r][s] = sum over the group's buckets, in order, of partial[k][(r, s, c)]
  parallel_for(a.k, kdim * (buckets + 1), [&](std::int64_t k0, std::int64_t k1) {
    Scratch<T> sum(kdim);
    for (std::int64_t kk = k0; kk < k1; ++kk) {
      const std::int64_t gi = kk / kg, k = kk % kg;
      const T* first = partial.data + gi * buckets * per_group + k * kdim;
      for (std::int64_t e = 0; e < kdim; ++e) sum.data[e] = first[e];
      for (std::int64_t b = 1; b < buckets; ++b) {
        const T* src = first + b * per_group;
        for (std::int64_t e = 0; e < kdim; ++e) sum.data[e] += src[e];
      }
      T* dst = a.grad_weight + kk * kdim;
      for (std::int64_t c = 0; c < cg; ++c)
        for (std::int64_t tap = 0; tap < taps; ++tap) dst[c * taps + tap] = sum.data[tap * cg + c];
    }
  });
}

// Input gradient as GEMM + col2im (any stride; the conv2d_backward path for strided layers):
// per (image, group), in runs of output rows,
//   dCol (Cg*R*S x P_run) = W_g^T (Cg*R*S x Kg) . G (Kg x P_run)     (G: grad_out rows, in place)
// then each row (c, r, s) of dCol is added onto its strided window of grad_xp, rows and
// positions in order.  One task per (image, group): each writes only its own part of grad_xp,
// so the sums do not depend on the number of threads.
template <class T>
void conv_grad_input(const Conv2dInputGradArgs<T>& a) {
  using S = GemmShape<T>;
  const std::int64_t cg = a.c / a.groups, kg = a.k / a.groups, taps = a.r * a.s;
  const std::int64_t kdim = cg * taps, P = a.ho * a.wo, plane = a.hp * a.wp;
  const std::int64_t images = a.n * a.groups;
  // W_g^T packed once per group: A[(c, r, s)][k] = w[g*Kg + k][c][r][s]
  const std::int64_t asize = (kdim + S::MR - 1) / S::MR * S::MR * kg;
  Scratch<T> wpack(a.groups * asize);
  for (std::int64_t g = 0; g < a.groups; ++g) {
    prepack_a<T>(
        kdim, kg,
        [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* d) {
          pack_a_strided(a.weight + g * kg * kdim, std::int64_t{1}, kdim, kdim, i0, mc, k0, kc, d);
        },
        wpack.data + g * asize);
  }
  std::int64_t rows = (std::int64_t{1} << 16) / (kdim * (a.wo > 0 ? a.wo : 1));
  rows = rows < 1 ? 1 : (rows > a.ho ? a.ho : rows);
  parallel_for(images, kdim * kg * P, [&](std::int64_t t0, std::int64_t t1) {
    Scratch<T> dcol(kdim * rows * a.wo);
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t n = t / a.groups, g = t % a.groups;
      T* gx = a.grad_input + (n * a.c + g * cg) * plane;
      for (std::int64_t e = 0; e < cg * plane; ++e) gx[e] = T(0);
      const T* gk = a.grad_out + (n * a.k + g * kg) * P;  // G [kg][P]
      const T* wg = wpack.data + g * asize;
      for (std::int64_t i0 = 0; i0 < a.ho; i0 += rows) {
        const std::int64_t nr = a.ho - i0 < rows ? a.ho - i0 : rows, np = nr * a.wo;
        gemm_rows<T>(
            kdim, np, kg,
            [&](std::int64_t r0, std::int64_t, std::int64_t k0, std::int64_t, T*) -> const T* {
              return wg + prepacked_a_index<T>(kdim, r0, kg, k0);
            },
            [&](std::int64_t k) { return gk + k * P + i0 * a.wo; }, dcol.data, np);
        for (std::int64_t row = 0; row < kdim; ++row) {  // col2im of the run
          const std::int64_t c = row / taps, r = (row % taps) / a.s, s = row % a.s;
          const T* src = dcol.data + row * np;
          for (std::int64_t i = 0; i < nr; ++i) {
            T* dst = gx + c * plane + ((i0 + i) * a.stride_h + r * a.dil_h) * a.wp + s * a.dil_w;
            const T* in = src + i * a.wo;
            for (std::int64_t j = 0; j < a.wo; ++j) dst[j * a.stride_w] += in[j];
          }
        }
      }
    }
  });
}

// Note [non-finite inputs]
// Every kernel in this file sums each output's own taps only (padding and the dropped columns of
// Note [shifted rows] included), so a NaN or an infinity reaches exactly the outputs whose
// window holds it, with the NaN/Inf pattern of the definition (inf * w + finite = inf, NaN from
// inf - inf or 0 * inf).  The fast paths do not: Winograd's transforms mix a tile's inputs and a
// filter's taps before the products (one inf becomes inf - inf = NaN across its tiles), and the
// strided space-to-depth path multiplies inputs outside a window by the zero taps it adds
// (0 * NaN).  Winograd checks its own outputs and runs these kernels again when one is not
// finite (Note [winograd non-finite] in winograd.cpp); for space to depth the dispatcher
// (python/mlmath_native/_conv.py) asks all_finite about x and w first.  The backward's
// transposed convolution multiplies grad_out's zero padding by w, so it asks about w too.
// all_finite: *out = no x[i] is NaN or +-inf.  x - x is 0 for a finite x and NaN otherwise; the
// sums of those differences are tested once per block of kFiniteBlock elements.
constexpr std::int64_t kFiniteBlock = std::int64_t{1} << 14;
// A block's cost for parallel_for (in multiply-adds): one cheap read per element, so the scan
// wakes a second thread only from 256 blocks (4M elements): below that one thread reads it in
// well under a millisecond, and a parallel region can cost more than that on a busy machine.
constexpr std::int64_t kFiniteBlockCost = kFiniteBlock / 64;

template <class T>
void all_finite(const T* x, std::int64_t n, bool* out) {
  using V = Vec<compute_t<T>>;  // 16-bit data widened as loaded
  constexpr std::int64_t W = V::width;
  std::atomic<bool> finite{true};
  parallel_for((n + kFiniteBlock - 1) / kFiniteBlock, kFiniteBlockCost,
               [&](std::int64_t b0, std::int64_t b1) {
                 for (std::int64_t b = b0; b < b1 && finite.load(std::memory_order_relaxed); ++b) {
                   const std::int64_t i0 = b * kFiniteBlock;
                   const std::int64_t i1 = n - i0 < kFiniteBlock ? n : i0 + kFiniteBlock;
                   V acc0 = V::set1(0), acc1 = V::set1(0);  // two chains of adds
                   std::int64_t i = i0;
                   for (; i + 2 * W <= i1; i += 2 * W) {
                     const V u = V::load(x + i), v = V::load(x + i + W);
                     acc0 = add(acc0, sub(u, u));
                     acc1 = add(acc1, sub(v, v));
                   }
                   for (; i < i1; i += W) {
                     const V u = i + W <= i1 ? V::load(x + i) : V::load_partial(x + i, i1 - i, 0);
                     acc0 = add(acc0, sub(u, u));
                   }
                   if (!(reduce_add(add(acc0, acc1)) == 0)) {
                     finite.store(false, std::memory_order_relaxed);
                   }
                 }
               });
  *out = finite.load();
}

// The weight gradient of 16-bit data (Note [16-bit convolution]): the chunks' float32
// gradients added in chunk order, rounded once.
template <class S>
void conv_grad_weight_staged(const Conv2dWeightGradArgs<S>& a) {
  const std::int64_t wsize = a.k * (a.c / a.groups) * a.r * a.s;
  const std::int64_t xs = a.c * a.h * a.w, gs = a.k * a.ho * a.wo;
  const std::int64_t nb = stage_images(xs + gs, a.n > 0 ? a.n : 1);
  Scratch<float> acc(wsize), part(wsize), x32(nb * xs), g32(nb * gs);
  std::int64_t n0 = 0;
  do {                          // at least once: no images give zeros
    if (interrupted()) return;  // Note [interrupts] (dispatch/threads.cpp)
    const std::int64_t cnt = a.n - n0 < nb ? a.n - n0 : nb;
    convert_into(a.x + n0 * xs, cnt * xs, x32.data);
    convert_into(a.grad_out + n0 * gs, cnt * gs, g32.data);
    const Conv2dWeightGradArgs<float> f{
        x32.data,   cnt,     a.c,        a.h,        a.w,
        g32.data,   a.k,     a.ho,       a.wo,       n0 == 0 ? acc.data : part.data,
        a.r,        a.s,     a.stride_h, a.stride_w, a.pad_top,
        a.pad_left, a.dil_h, a.dil_w,    a.groups};
    conv_grad_weight(f);
    if (n0 > 0)
      for (std::int64_t e = 0; e < wsize; ++e) acc.data[e] += part.data[e];
    n0 += cnt;
  } while (n0 < a.n);
  convert_into(acc.data, wsize, a.grad_weight);
}

// The input gradient of 16-bit data (Note [16-bit convolution]): per chunk of images, rounded
// into a.grad_input, or left in float32 in out32 when it is not null.
template <class S>
void conv_grad_input_staged(const Conv2dInputGradArgs<S>& a, float* out32) {
  const std::int64_t wsize = a.k * (a.c / a.groups) * a.r * a.s;
  const std::int64_t gs = a.k * a.ho * a.wo, xs = a.c * a.hp * a.wp;
  const std::int64_t nb = stage_images(gs + (out32 ? 0 : xs), a.n);
  Scratch<float> w32(wsize), g32(nb * gs), out(out32 ? 1 : nb * xs);
  convert_into(a.weight, wsize, w32.data);
  for (std::int64_t n0 = 0; n0 < a.n; n0 += nb) {
    if (interrupted()) return;  // Note [interrupts] (dispatch/threads.cpp)
    const std::int64_t cnt = a.n - n0 < nb ? a.n - n0 : nb;
    convert_into(a.grad_out + n0 * gs, cnt * gs, g32.data);
    float* gx = out32 ? out32 + n0 * xs : out.data;
    const Conv2dInputGradArgs<float> f{g32.data,   cnt,        a.k,     a.ho,    a.wo,    w32.data,
                                       a.c,        a.r,        a.s,     gx,      a.hp,    a.wp,
                                       a.stride_h, a.stride_w, a.dil_h, a.dil_w, a.groups};
    conv_grad_input(f);
    if (!out32) convert_into(out.data, cnt * xs, a.grad_input + n0 * xs);
  }
}

}  // namespace

void all_finite_f32(const float* x, std::int64_t n, bool* out) { all_finite(x, n, out); }
void all_finite_f64(const double* x, std::int64_t n, bool* out) { all_finite(x, n, out); }
void conv2d_f32(const Conv2dArgs<float>& args) { conv2d(args); }
void conv2d_f64(const Conv2dArgs<double>& args) { conv2d(args); }
void conv2d_grad_weight_f32(const Conv2dWeightGradArgs<float>& args) { conv_grad_weight(args); }
void conv2d_grad_weight_f64(const Conv2dWeightGradArgs<double>& args) { conv_grad_weight(args); }
void conv2d_grad_input_f32(const Conv2dInputGradArgs<float>& args) { conv_grad_input(args); }
void conv2d_grad_input_f64(const Conv2dInputGradArgs<double>& args) { conv_grad_input(args); }
void all_finite_bf16(const bf16* x, std::int64_t n, bool* out) { all_finite(x, n, out); }
void all_finite_f16(const f16* x, std::int64_t n, bool* out) { all_finite(x, n, out); }
void conv2d_bf16(const Conv2dArgs<bf16>& args, float* y32) {
  conv2d_staged(args, y32, [](const Conv2dArgs<float>& f) { conv2d(f); });
}
void conv2d_f16(const Conv2dArgs<f16>& args, float* y32) {
  conv2d_staged(args, y32, [](const Conv2dArgs<float>& f) { conv2d(f); });
}
void conv2d_grad_weight_bf16(const Conv2dWeightGradArgs<bf16>& args) {
  conv_grad_weight_staged(args);
}
void conv2d_grad_weight_f16(const Conv2dWeightGradArgs<f16>& args) {
  conv_grad_weight_staged(args);
}
void conv2d_grad_input_bf16(const Conv2dInputGradArgs<bf16>& args, float* out32) {
  conv_grad_input_staged(args, out32);
}
void conv2d_grad_input_f16(const Conv2dInputGradArgs<f16>& args, float* out32) {
  conv_grad_input_staged(args, out32);
}

MLMATH_ISA_END
