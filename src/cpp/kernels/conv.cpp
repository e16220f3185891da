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
#include <cstdint>

#include "common/gemm_core.h"
#include "common/parallel.h"
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
  if (kg <= kFewOutputChannels) {
    // few output channels would not amortise packing B: read the shifted rows in place
    gemm_rows<T>(
        kg, wide, kdim, pack_w, [&](std::int64_t row) { return xp.data + shift(row); }, out.data,
        wide);
  } else {
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

template <class T>
void conv_gemm(const Conv2dArgs<T>& a) {
  const std::int64_t cg = a.c / a.groups, kg = a.k / a.groups;
  const std::int64_t kdim = cg * a.r * a.s, pixels = a.ho * a.wo;
  const bool pointwise = a.r == 1 && a.s == 1 && a.stride_h == 1 && a.stride_w == 1 &&
                         a.pad_top == 0 && a.pad_left == 0 && a.ho == a.h && a.wo == a.w;
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

// Depthwise: each output channel k reads input channel k / (K / C) (groups == C).
template <class T>
void conv_depthwise(const Conv2dArgs<T>& a) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const std::int64_t mult = a.k / a.c;
  parallel_for(a.n * a.k, a.ho * a.wo * a.r * a.s, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t t = b; t < e; ++t) {
      const std::int64_t n = t / a.k, k = t % a.k;
      const T* plane = a.x + (n * a.c + k / mult) * a.h * a.w;
      const T* wk = a.weight + k * a.r * a.s;
      T* out = a.y + t * a.ho * a.wo;
      const T b0 = a.bias ? a.bias[k] : T(0);
      for (std::int64_t i = 0; i < a.ho; ++i) {
        T* orow = out + i * a.wo;
        for (std::int64_t j = 0; j < a.wo; ++j) orow[j] = b0;
        for (std::int64_t r = 0; r < a.r; ++r) {
          const std::int64_t ih = i * a.stride_h - a.pad_top + r * a.dil_h;
          if (ih < 0 || ih >= a.h) continue;
          const T* irow = plane + ih * a.w;
          for (std::int64_t s = 0; s < a.s; ++s) {
            const T wv = wk[r * a.s + s];
            const std::int64_t dx = s * a.dil_w - a.pad_left;
            // output columns j whose input column j*sw + dx lies in [0, W)
            std::int64_t j0 = dx >= 0 ? 0 : (-dx + a.stride_w - 1) / a.stride_w;
            std::int64_t j1 = (a.w - dx + a.stride_w - 1) / a.stride_w;
            if (j1 > a.wo) j1 = a.wo;
            if (j0 >= j1) continue;
            if (a.stride_w == 1) {
              const V vw = V::set1(wv);
              const T* src = irow + dx;
              std::int64_t j = j0;
              for (; j + W <= j1; j += W)
                fma(vw, V::load(src + j), V::load(orow + j)).store(orow + j);
              if (j < j1) {
                fma(vw, V::load_partial(src + j, j1 - j, T(0)),
                    V::load_partial(orow + j, j1 - j, T(0)))
                    .store_partial(orow + j, j1 - j);
              }
            } else {
              for (std::int64_t j = j0; j < j1; ++j) orow[j] += wv * irow[j * a.stride_w + dx];
            }
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

// Weight gradient, stride 1 (Note [shifted rows]):  per group,
//   grad_w (Kg x Cg*R*S) = sum_n G_n (Kg x Ho*Wp) . B_n,   B_n[p][(c, r, s)] = xp_n[shift + p]
// with G_n = grad_out on the padded width (zero in the dropped columns j >= Wo, so they add
// nothing) and xp_n the zero-padded image.  One GEMM per image and group (one task each),
// summed in image order; B panels are transposed copies of contiguous runs of xp.
template <class T>
void conv_grad_weight(const Conv2dWeightGradArgs<T>& a) {
  const std::int64_t cg = a.c / a.groups, kg = a.k / a.groups, taps = a.r * a.s;
  const std::int64_t kdim = cg * taps, per_group = kg * kdim;
  const std::int64_t hp = a.ho + a.dil_h * (a.r - 1), wp = a.wo + a.dil_w * (a.s - 1);
  const std::int64_t plane = hp * wp, slack = (a.s - 1) * a.dil_w, wide = a.ho * wp;
  // one partial gradient per (image, group), summed afterwards in image order, so the result
  // does not depend on how the images were split over the threads
  Scratch<T> partial(a.n * a.groups * per_group);
  parallel_for(a.n * a.groups, kg * kdim * wide, [&](std::int64_t t0, std::int64_t t1) {
    Scratch<T> xp(cg * plane + slack), gw(kg * wide);
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t n = t / a.groups, gi = t % a.groups;
      copy_padded(a.x + (n * a.c + gi * cg) * a.h * a.w, cg, a.h, a.w, a.pad_top, a.pad_left, hp,
                  wp, slack, xp.data);
      for (std::int64_t k = 0; k < kg; ++k) {  // grad_out on the padded width
        const T* src = a.grad_out + ((n * a.k + gi * kg + k) * a.ho) * a.wo;
        T* dst = gw.data + k * wide;
        for (std::int64_t i = 0; i < a.ho; ++i) {
          for (std::int64_t j = 0; j < a.wo; ++j) dst[i * wp + j] = src[i * a.wo + j];
          for (std::int64_t j = a.wo; j < wp; ++j) dst[i * wp + j] = T(0);
        }
      }
      gemm_blocked<T>(
          kg, kdim, wide,
          [&](std::int64_t i0, std::int64_t mc, std::int64_t k0, std::int64_t kc, T* dst) {
            pack_a_strided(gw.data, wide, std::int64_t{1}, kg, i0, mc, k0, kc, dst);
          },
          [&](std::int64_t k0, std::int64_t kc, std::int64_t j0, std::int64_t nc, T* dst) {
            constexpr int NR = GemmShape<T>::NR;
            for (std::int64_t q = 0; q < nc; q += NR) {
              const std::int64_t cols = nc - q < NR ? nc - q : NR;
              const T* src[NR];  // column (c, r, s) of B: a run of xp
              for (std::int64_t col = 0; col < cols; ++col) {
                const std::int64_t row = j0 + q + col;
                src[col] =
                    xp.data + shifted_row_start(row, a.r, a.s, plane, wp, a.dil_h, a.dil_w) + k0;
              }
              T* out = dst + q * kc;
              for (std::int64_t k = 0; k < kc; ++k) {  // row k of the panel, written in order
                T* o = out + k * NR;
                for (std::int64_t col = 0; col < cols; ++col) o[col] = src[col][k];
                for (std::int64_t col = cols; col < NR; ++col) o[col] = T(0);
              }
            }
          },
          partial.data + t * per_group, kdim, false);
    }
  });
  for (std::int64_t gi = 0; gi < a.groups; ++gi) {
    T* out = a.grad_weight + gi * per_group;
    for (std::int64_t i = 0; i < per_group; ++i) out[i] = T(0);
    for (std::int64_t n = 0; n < a.n; ++n) {
      const T* p = partial.data + (n * a.groups + gi) * per_group;
      for (std::int64_t i = 0; i < per_group; ++i) out[i] += p[i];
    }
  }
}

}  // namespace

void conv2d_f32(const Conv2dArgs<float>& args) { conv2d(args); }
void conv2d_f64(const Conv2dArgs<double>& args) { conv2d(args); }
void conv2d_grad_weight_f32(const Conv2dWeightGradArgs<float>& args) { conv_grad_weight(args); }
void conv2d_grad_weight_f64(const Conv2dWeightGradArgs<double>& args) { conv_grad_weight(args); }

MLMATH_ISA_END
