// Cross-entropy from logits, PyTorch's F.cross_entropy per element, loss and gradient fused.
//
// Along the class axis (C = shape.n classes) of one element, with lse = m + log s,
// m = max_c x_c, s = sum_c exp(x_c - m), p_c = exp(x_c - m) / s, weights w_c, W = sum_c w_c,
// smoothing eps:
//
//   index target t:   L = (1 - eps) w_t (lse - x_t) + (eps / C) (W lse - sum_c w_c x_c)
//                     dL/dx_c = p_c ((1 - eps) w_t + (eps / C) W) - (eps / C) w_c
//                               - (1 - eps) w_t [c == t]
//                     an element whose target is ignore_index has L = 0 and gradient 0.
//   probabilities y:  y'_c = (1 - eps) y_c + eps / C
//                     L = lse sum_c w_c y'_c - sum_c w_c y'_c x_c   (terms with y'_c = 0 dropped)
//                     dL/dx_c = p_c sum_c' w_c' y'_c' - w_c y'_c
//
// Note [shifted logits]: every lse - x is evaluated as log s - (x - m) (m replaced by 0 when it
// is infinite, as logsumexp does): with a large common offset (x = [1e8, 1e8]) m + log s rounds
// to m and the loss would be 0 instead of log 2.  So the weighted sums over x are sums over
// x - m, taken once m is known.
//
// Note [weights of other classes]: without smoothing, a row's loss and gradient involve only
// w_t of its own target, never W or other classes' weights, so a NaN/Inf weight stays in the
// rows of that class (as in PyTorch); terms with eps / C are added only when eps > 0.
//
// The gradient is multiplied by the element's scale (grad_output, or 1/denominator for a mean).
// No softmax or log-probability array is formed: per element, pass 1 finds m (and the sums
// over w x or w y'), pass 2 sums exp(x - m), storing it into the gradient row when there is one,
// pass 3 turns that row into the gradient.  Rows (inner == 1) are re-read from cache; the
// columns layout (classes on a strided axis) walks blocks of adjacent elements down the axis as
// softmax.cpp does.  Reductions stay inside one element, so results do not depend on threads.
//
// 16-bit logits (Note [16-bit storage] in common/half.h): the loss is float32 and the gradient
// is rounded once into the logits' dtype.  A row's exp values and gradient are built in a float
// scratch row (one per thread) and narrowed in a last pass; in the columns layout pass 3
// recomputes exp instead of re-reading a rounded gradient, and the target's correction is
// computed in float before its one rounding.
#include <cmath>
#include <cstdint>

#include "common/axis_ops.h"
#include "mlmath/mlmath.h"

MLMATH_ISA_BEGIN

namespace {

// -- contiguous rows ---------------------------------------------------------------------------

// sum_c keep(y'_c, w_c y'_c (x_c - shift)) and sum_c w_c y'_c with y' = a y + b.
template <class S, class T = compute_t<S>>
void row_prob_sums(const S* x, const S* y, const T* w, std::int64_t n, T a, T b, T shift, T* wyx,
                   T* wy) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V va = V::set1(a), vb = V::set1(b), vshift = V::set1(shift);
  V s_wyx0 = V::set1(0), s_wyx1 = s_wyx0, s_wy0 = s_wyx0, s_wy1 = s_wyx0;
  auto step = [&](V xv, V yv, V wv, V& acc_wyx, V& acc_wy) {
    const V yp = fma(va, yv, vb);
    const V wyp = mul(wv, yp);
    acc_wyx = add(acc_wyx, keep_where_nonzero(yp, mul(wyp, sub(xv, vshift))));
    acc_wy = add(acc_wy, wyp);
  };
  std::int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    step(V::load(x + i), V::load(y + i), V::load(w + i), s_wyx0, s_wy0);
    step(V::load(x + i + W), V::load(y + i + W), V::load(w + i + W), s_wyx1, s_wy1);
  }
  for (; i + W <= n; i += W) step(V::load(x + i), V::load(y + i), V::load(w + i), s_wyx0, s_wy0);
  if (i < n) {
    // Padding lanes: w = 0 makes both terms 0 (y' = b may be non-zero; shift is finite).
    step(V::load_partial(x + i, n - i, 0), V::load_partial(y + i, n - i, 0),
         V::load_partial(w + i, n - i, 0), s_wyx1, s_wy1);
  }
  *wyx = reduce_add(add(s_wyx0, s_wyx1));
  *wy = reduce_add(add(s_wy0, s_wy1));
}

// g_c = e_c * a - scale * w_c * (a2 y_c + b2)   (e_c = exp(x_c - m) already in g).
template <class S, class T = compute_t<S>>
void row_prob_grad(T* g, const S* y, const T* w, std::int64_t n, T a, T scale, T a2, T b2) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V va = V::set1(a), vscale = V::set1(-scale), va2 = V::set1(a2), vb2 = V::set1(b2);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V wy = mul(V::load(w + i), fma(va2, V::load(y + i), vb2));
    fma(V::load(g + i), va, mul(vscale, wy)).store(g + i);
  }
  if (i < n) {
    const V wy =
        mul(V::load_partial(w + i, n - i, 0), fma(va2, V::load_partial(y + i, n - i, 0), vb2));
    fma(V::load_partial(g + i, n - i, 0), va, mul(vscale, wy)).store_partial(g + i, n - i);
  }
}

// sum_c w_c (x_c - shift)  (shift finite: padding lanes give 0).
template <class S, class T = compute_t<S>>
T row_shifted_dot(const S* x, const T* w, std::int64_t n, T shift) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V vshift = V::set1(shift);
  V s0 = V::set1(0), s1 = s0;
  std::int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    s0 = fma(V::load(w + i), sub(V::load(x + i), vshift), s0);
    s1 = fma(V::load(w + i + W), sub(V::load(x + i + W), vshift), s1);
  }
  for (; i + W <= n; i += W) s0 = fma(V::load(w + i), sub(V::load(x + i), vshift), s0);
  if (i < n) {
    const V xv = V::load_partial(x + i, n - i, 0), wv = V::load_partial(w + i, n - i, 0);
    s1 = fma(wv, sub(xv, vshift), s1);
  }
  return reduce_add(add(s0, s1));
}

// g_c = e_c * a - b * w_c.
template <class T>
void row_weighted_affine(T* g, const T* w, std::int64_t n, T a, T b) {
  using V = Vec<T>;
  constexpr std::int64_t W = V::width;
  const V va = V::set1(a), vb = V::set1(-b);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) fma(V::load(g + i), va, mul(vb, V::load(w + i))).store(g + i);
  if (i < n) {
    const V wv = V::load_partial(w + i, n - i, 0);
    fma(V::load_partial(g + i, n - i, 0), va, mul(vb, wv)).store_partial(g + i, n - i);
  }
}

// One element of the rows layout; `scratch` holds C floats when S is 16-bit and there is a
// gradient (the row is built there in T and narrowed into the gradient at the end).
template <class S>
void row_element(const CrossEntropyArgs<S>& a, std::int64_t r, compute_t<S>* scratch) {
  using T = compute_t<S>;
  const std::int64_t C = a.shape.n;
  const S* x = a.logits + r * C;
  S* out = a.grad ? a.grad + r * C : nullptr;
  T* g = nullptr;  // the gradient row while it is computed
  if constexpr (is_16bit<S>) {
    g = out ? scratch : nullptr;
  } else {
    g = out;
  }
  const T scale = a.grad_scale ? a.grad_scale[r] : a.grad_scale_all;
  const T eps = a.label_smoothing, keep = T(1) - eps, eps_c = eps / T(C);

  if (a.target_index) {
    const std::int64_t t = a.target_index[r];
    if (t == a.ignore_index) {
      a.loss[r] = 0;
      if (out) row_fill(out, C, T(0));
      return;
    }
    const auto [m, normal_range] = row_max_range(x, C);
    const T s = g ? row_exp_sum<true>(x, g, C, m, normal_range)
                  : row_exp_sum<false>(x, g, C, m, normal_range);
    // lse - shift, every lse - x as lse_shifted - (x - shift): Note [shifted logits]
    const T shift = finite_or_zero(m), lse_shifted = (m - shift) + std::log(s);
    const T wt = a.weight[t];
    T loss = keep * wt * (lse_shifted - (widen(x[t]) - shift));
    if (eps > 0) {
      loss += eps_c * (a.weight_sum * lse_shifted - row_shifted_dot(x, a.weight, C, shift));
    }
    a.loss[r] = loss;
    if (g) {
      const T coef =  // Note [weights of other classes]
          scale * (eps > 0 ? keep * wt + eps_c * a.weight_sum : wt) / s;
      if (eps > 0) {
        row_weighted_affine(g, a.weight, C, coef, scale * eps_c);
      } else {
        row_affine(g, g, C, coef, T(0));
      }
      g[t] -= scale * keep * wt;
      if constexpr (is_16bit<S>) row_affine(g, out, C, T(1), T(0));  // the one rounding
    }
  } else {
    const S* y = a.target_prob + r * C;
    const auto [m, normal_range] = row_max_range(x, C);
    const T shift = finite_or_zero(m);  // Note [shifted logits]
    T wyx, wy;
    row_prob_sums(x, y, a.weight, C, keep, eps_c, shift, &wyx, &wy);
    const T s = g ? row_exp_sum<true>(x, g, C, m, normal_range)
                  : row_exp_sum<false>(x, g, C, m, normal_range);
    a.loss[r] = ((m - shift) + std::log(s)) * wy - wyx;
    if (g) {
      row_prob_grad(g, y, a.weight, C, scale * wy / s, scale, keep, eps_c);
      if constexpr (is_16bit<S>) row_affine(g, out, C, T(1), T(0));
    }
  }
}

// The gradient of 16-bit logits at class t of element l of a columns block, in float: pass 3's
// value exp(x_t - m) coef - b_t, minus the target's term (rounded once by the caller).
template <class T>
T target_grad(T x_t, T m, T coef, T b_t, T target_term) {
  return std::exp(x_t - m) * coef - b_t - target_term;
}

// -- strided columns ---------------------------------------------------------------------------

// One block of `count` adjacent elements (columns j.. of slice o), classes down the axis.
template <int NV, class S, class T = compute_t<S>>
void cols_block(const CrossEntropyArgs<S>& a, std::int64_t o, std::int64_t j, std::int64_t count) {
  using C_ = Cols<T, NV>;
  using V = Vec<T>;
  constexpr std::int64_t L = NV * V::width;
  const std::int64_t C = a.shape.n, inner = a.shape.inner;
  const S* x = a.logits + o * C * inner + j;
  S* g = a.grad ? a.grad + o * C * inner + j : nullptr;
  const S* y = a.target_prob ? a.target_prob + o * C * inner + j : nullptr;
  const std::int64_t e0 = o * inner + j;  // first element of the block
  const T eps = a.label_smoothing, keep = T(1) - eps, eps_c = eps / T(C);
  const T neg_inf = -std::numeric_limits<T>::infinity();

  // pass 1: the max
  C_ m = C_::set1(neg_inf);
  for (std::int64_t c = 0; c < C; ++c) m = zip(m, C_::load(x + c * inner, count, neg_inf), vmax);
  // pass 2: s = sum exp(x - m), exp stored into the gradient, and the weighted sums the loss
  // needs, over x - shift (Note [shifted logits])
  const C_ shift = m.per_lane(finite_or_zero<T>);
  C_ s = C_::set1(0), wx = C_::set1(0), wyx = C_::set1(0), wy = C_::set1(0);
  for (std::int64_t c = 0; c < C; ++c) {
    const C_ xz = C_::load(x + c * inner, count, T(0));
    const C_ e = zip(xz, m, [](V xv, V mv) { return exp<true>(sub(xv, mv)); });
    if (g && !is_16bit<S>) e.store(g + c * inner, count);
    s = zip(s, e, vadd);
    const V wc = V::set1(a.weight[c]);
    const C_ xs = zip(xz, shift, vsub);
    if (y) {
      const C_ yp = C_::load(y + c * inner, count, T(0)).map([&](V yv) {
        return fma(V::set1(keep), yv, V::set1(eps_c));  // y' = (1 - eps) y + eps / C
      });
      wyx = zip(wyx,
                zip(yp, xs,
                    [&](V ypv, V xv2) { return keep_where_nonzero(ypv, mul(mul(wc, ypv), xv2)); }),
                vadd);
      wy = zip(wy, yp, [&](V acc, V ypv) { return fma(wc, ypv, acc); });
    } else if (eps > 0) {
      wx = zip(wx, xs, [&](V acc, V xv2) { return fma(wc, xv2, acc); });
    }
  }
  // per element: loss and the gradient coefficients
  T m_l[L], shift_l[L], s_l[L], wx_l[L], wyx_l[L], wy_l[L], coef[L], wscale[L];
  m.to_array(m_l);
  shift.to_array(shift_l);
  s.to_array(s_l);
  wx.to_array(wx_l);
  wyx.to_array(wyx_l);
  wy.to_array(wy_l);
  for (std::int64_t l = 0; l < L; ++l) coef[l] = wscale[l] = 0;
  for (std::int64_t l = 0; l < count; ++l) {
    const std::int64_t e = e0 + l;
    const T scale = a.grad_scale ? a.grad_scale[e] : a.grad_scale_all;
    const T lse_shifted = (m_l[l] - shift_l[l]) + std::log(s_l[l]);
    if (y) {
      a.loss[e] = lse_shifted * wy_l[l] - wyx_l[l];
      coef[l] = scale * wy_l[l] / s_l[l];
      wscale[l] = scale;
      continue;
    }
    const std::int64_t t = a.target_index[e];
    if (t == a.ignore_index) {
      a.loss[e] = 0;
      continue;
    }
    const T wt = a.weight[t];
    T loss = keep * wt * (lse_shifted - (widen(x[t * inner + l]) - shift_l[l]));
    if (eps > 0) loss += eps_c * (a.weight_sum * lse_shifted - wx_l[l]);
    a.loss[e] = loss;
    // Note [weights of other classes]
    coef[l] = scale * (eps > 0 ? keep * wt + eps_c * a.weight_sum : wt) / s_l[l];
    wscale[l] = scale * eps_c;
  }
  if (!g) return;
  // pass 3: the gradient (exp(x - m) re-read from g, or recomputed for 16-bit storage)
  const C_ vcoef = C_::from_array(coef), vscale = C_::from_array(wscale);
  auto exps = [&](std::int64_t c) {
    if constexpr (is_16bit<S>) {
      return zip(C_::load(x + c * inner, count, T(0)), m,
                 [](V xv, V mv) { return exp<true>(sub(xv, mv)); });
    } else {
      return C_::load(g + c * inner, count, T(0));
    }
  };
  for (std::int64_t c = 0; c < C; ++c) {
    if (!y && eps == 0) {  // g = p * coef: no other class's weight (Note [weights of other ...])
      zip(exps(c), vcoef, vmul).store(g + c * inner, count);
      continue;
    }
    const V wc = V::set1(a.weight[c]);
    C_ b = vscale.map([&](V sv) { return mul(sv, wc); });  // scale * w_c (* eps / C)
    if (y) {
      b = zip(b, C_::load(y + c * inner, count, T(0)),
              [&](V bv, V yv) { return mul(bv, fma(V::set1(keep), yv, V::set1(eps_c))); });
    }
    zip(zip(exps(c), vcoef, vmul), b, vsub).store(g + c * inner, count);
  }
  if (y) return;
  for (std::int64_t l = 0; l < count; ++l) {
    const std::int64_t t = a.target_index[e0 + l];
    if (t == a.ignore_index) {
      for (std::int64_t c = 0; c < C; ++c) g[c * inner + l] = narrow<S>(T(0));
    } else {
      const T scale = a.grad_scale ? a.grad_scale[e0 + l] : a.grad_scale_all;
      const T target_term = scale * keep * a.weight[t];
      S& gt = g[t * inner + l];
      if constexpr (is_16bit<S>) {
        const T b_t = eps > 0 ? wscale[l] * a.weight[t] : T(0);
        gt = narrow<S>(target_grad(widen(x[t * inner + l]), m_l[l], coef[l], b_t, target_term));
      } else {
        gt -= target_term;
      }
    }
  }
}

// A float row on the heap, owned by one thread's share of the rows.
struct FloatRow {
  float* data;
  explicit FloatRow(std::int64_t n) : data(new float[static_cast<std::size_t>(n)]) {}
  ~FloatRow() { delete[] data; }
  FloatRow(const FloatRow&) = delete;
  FloatRow& operator=(const FloatRow&) = delete;
};

template <class S>
void cross_entropy(const CrossEntropyArgs<S>& a) {
  using T = compute_t<S>;
  const AxisLayout& s = a.shape;
  if constexpr (is_16bit<S>) {
    if (a.grad && s.inner == 1) {
      if (s.outer <= 0 || s.n <= 0) return;
      parallel_for(s.outer, s.n, [&](std::int64_t b, std::int64_t e) {
        FloatRow row(s.n);  // the gradient row in float before its one rounding
        for (std::int64_t r = b; r < e; ++r) row_element(a, r, row.data);
      });
      return;
    }
  }
  for_each_task<S>(s, [&](std::int64_t o, std::int64_t j, std::int64_t count) {
    if (s.inner == 1) {
      row_element(a, o, static_cast<T*>(nullptr));
    } else {
      with_block_vecs<S>(count, [&](auto nv) { cols_block<nv.value>(a, o, j, count); });
    }
  });
}

}  // namespace

void cross_entropy_f32(const CrossEntropyArgs<float>& args) { cross_entropy(args); }
void cross_entropy_f64(const CrossEntropyArgs<double>& args) { cross_entropy(args); }
void cross_entropy_bf16(const CrossEntropyArgs<bf16>& args) { cross_entropy(args); }
void cross_entropy_f16(const CrossEntropyArgs<f16>& args) { cross_entropy(args); }

MLMATH_ISA_END
