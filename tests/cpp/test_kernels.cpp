// C++ unit tests of mlmath's kernel table against plain double-precision loops.  Usage:
// test_kernels FAMILY (softmax, cross_entropy, linear_ce, optim, gemm, conv2d, attention, errors,
// interrupt, sixteen, float64, conversions, dispatch); each family runs once per ISA this CPU
// supports (only the one MLMATH_NATIVE_ISA forces, when set), with 1 and 2 threads.  Exit status 1
// on failure.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "mlmath/mlmath.h"

namespace {

int failures = 0;
std::string context;        // "<isa>, <threads> thread(s)"
std::string g_default_isa;  // the ISA selected before main() runs any family

void check_close(const char* what, double got, double want, double tol) {
  if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    if (++failures <= 20) {
      std::printf("FAIL [%s] %s: got %.10g, expected %.10g\n", context.c_str(), what, got, want);
    }
  }
}

// Arguments of one C[M][N] = A[M][K] B[K][N] with every matrix row-major and contiguous.
template <class T>
mlmath::GemmArgs<T> row_major_gemm(std::int64_t M, std::int64_t N, std::int64_t K, const T* a,
                                   const T* b, T* c) {
  mlmath::GemmArgs<T> g{};
  g.m = M;
  g.n = N;
  g.k = K;
  g.a = a;
  g.a_rs = K;
  g.a_cs = 1;
  g.b = b;
  g.b_rs = N;
  g.b_cs = 1;
  g.c = c;
  g.c_rs = N;
  g.batch = 1;
  return g;
}

std::vector<float> random_floats(std::size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// softmax, log_softmax, logsumexp and softmax_backward along the middle axis of [outer][n][inner]
void test_softmax() {
  const mlmath::KernelTable& k = mlmath::kernels();
  for (std::int64_t n : {1, 3, 7, 8, 9, 16, 17, 31, 33, 64, 67, 1000}) {
    for (std::int64_t inner : {1, 3}) {
      const std::int64_t outer = 5, size = outer * n * inner;
      const std::vector<float> x = random_floats(size, static_cast<unsigned>(n), 3.0f);
      std::vector<float> y(size), ly(size), lse(outer * inner), dx(size);
      const std::vector<float> dy = random_floats(size, 99);
      const mlmath::AxisLayout shape{outer, n, inner};
      k.softmax_f32(x.data(), y.data(), shape);
      k.log_softmax_f32(x.data(), ly.data(), shape);
      k.logsumexp_f32(x.data(), lse.data(), shape);
      k.softmax_backward_f32(y.data(), dy.data(), dx.data(), shape);
      for (std::int64_t o = 0; o < outer; ++o)
        for (std::int64_t i = 0; i < inner; ++i) {
          auto at = [&](std::int64_t j) { return (o * n + j) * inner + i; };
          double m = -INFINITY, z = 0, dot = 0;
          for (std::int64_t j = 0; j < n; ++j) m = std::fmax(m, x[at(j)]);
          for (std::int64_t j = 0; j < n; ++j) z += std::exp(x[at(j)] - m);
          for (std::int64_t j = 0; j < n; ++j) dot += std::exp(x[at(j)] - m) / z * dy[at(j)];
          check_close("logsumexp", lse[o * inner + i], m + std::log(z), 1e-5);
          for (std::int64_t j = 0; j < n; ++j) {
            const double p = std::exp(x[at(j)] - m) / z;
            check_close("softmax", y[at(j)], p, 1e-5);
            check_close("log_softmax", ly[at(j)], x[at(j)] - m - std::log(z), 1e-5);
            check_close("softmax_backward", dx[at(j)], p * (dy[at(j)] - dot), 1e-4);
          }
        }
    }
  }
}

// per-element loss and gradient with class weights and an ignored label
void test_cross_entropy() {
  const mlmath::KernelTable& k = mlmath::kernels();
  for (std::int64_t c : {1, 2, 5, 8, 17, 100}) {
    const std::int64_t rows = 6;
    std::vector<double> logits(rows * c), weight(c), loss(rows), grad(rows * c);
    std::mt19937 gen(static_cast<unsigned>(c));
    std::normal_distribution<double> dist(0.0, 2.0);
    for (double& v : logits) v = dist(gen);
    double wsum = 0;
    for (std::int64_t j = 0; j < c; ++j) wsum += weight[j] = 0.5 + 0.1 * j;
    std::vector<std::int64_t> target(rows);
    for (std::int64_t r = 0; r < rows; ++r) target[r] = r % c;
    target[3] = -100;  // ignored
    mlmath::CrossEntropyArgs<double> a{};
    a.shape = mlmath::AxisLayout{rows, c, 1};
    a.logits = logits.data();
    a.target_index = target.data();
    a.weight = weight.data();
    a.weight_sum = wsum;
    a.ignore_index = -100;
    a.loss = loss.data();
    a.grad = grad.data();
    a.grad_scale_all = 1.0;
    k.cross_entropy_f64(a);
    for (std::int64_t r = 0; r < rows; ++r) {
      const double* l = &logits[r * c];
      double m = -INFINITY, z = 0;
      for (std::int64_t j = 0; j < c; ++j) m = std::fmax(m, l[j]);
      for (std::int64_t j = 0; j < c; ++j) z += std::exp(l[j] - m);
      const std::int64_t t = target[r];
      const double want = t < 0 ? 0.0 : weight[t] * (m + std::log(z) - l[t]);
      check_close("cross_entropy loss", loss[r], want, 1e-12);
      for (std::int64_t j = 0; j < c; ++j) {
        const double g = t < 0 ? 0.0 : weight[t] * (std::exp(l[j] - m) / z - (j == t ? 1 : 0));
        check_close("cross_entropy grad", grad[r * c + j], g, 1e-12);
      }
    }
  }
}

// fused linear + cross-entropy (float64, softcap, temperature, smoothing, an ignored token,
// chunks of 3 tokens) against the logits formed in plain loops
void test_linear_ce() {
  const mlmath::KernelTable& k = mlmath::kernels();
  const std::int64_t n = 7, d = 5, v = 11;
  const double cap = 4.0, inv_t = 1.0 / 0.8, eps = 0.1, z_scale = 1e-3;
  std::mt19937 gen(21);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> h(n * d), w(v * d), b(v), cw(v, 1.0), loss(n), lse(n), logprob(n);
  std::vector<double> dh(n * d), dw(v * d), db(v);
  for (double& x : h) x = dist(gen);
  for (double& x : w) x = dist(gen);
  for (double& x : b) x = dist(gen);
  std::vector<std::int64_t> target(n);
  for (std::int64_t r = 0; r < n; ++r) target[r] = (3 * r + 1) % v;
  target[2] = -100;
  mlmath::LinearCrossEntropyArgs<double> a{};
  a.n = n;
  a.d = d;
  a.v = v;
  a.hidden = h.data();
  a.hidden_rs = d;
  a.hidden_cs = 1;
  a.weight = w.data();
  a.weight_rs = d;
  a.weight_cs = 1;
  a.bias = b.data();
  a.target = target.data();
  a.class_weight = cw.data();
  a.class_weight_sum = static_cast<double>(v);
  a.ignore_index = -100;
  a.label_smoothing = eps;
  a.softcap = cap;
  a.inv_temperature = inv_t;
  a.chunk = 3;
  a.loss = loss.data();
  a.lse = lse.data();
  a.logprob = logprob.data();
  a.d_hidden = dh.data();
  a.d_weight = dw.data();
  a.d_bias = db.data();
  a.ce_scale_all = 1.0;
  a.z_scale_all = z_scale;
  k.linear_cross_entropy_f64(a);
  std::vector<double> want_dh(n * d, 0.0), want_dw(v * d, 0.0), want_db(v, 0.0);
  for (std::int64_t r = 0; r < n; ++r) {
    std::vector<double> x(v), tanh_z(v), p(v);
    double m = -INFINITY;
    for (std::int64_t j = 0; j < v; ++j) {
      double z = b[j];
      for (std::int64_t q = 0; q < d; ++q) z += h[r * d + q] * w[j * d + q];
      tanh_z[j] = std::tanh(z / cap);
      x[j] = cap * tanh_z[j] * inv_t;
      m = std::fmax(m, x[j]);
    }
    double s = 0;
    for (std::int64_t j = 0; j < v; ++j) s += std::exp(x[j] - m);
    const double l = m + std::log(s);
    check_close("linear_ce lse", lse[r], l, 1e-12);
    const std::int64_t t = target[r];
    if (t < 0) {
      check_close("linear_ce ignored loss", loss[r], 0.0, 0.0);
      continue;
    }
    double smooth = 0;
    for (std::int64_t j = 0; j < v; ++j) smooth += l - x[j];
    check_close("linear_ce loss", loss[r], (1 - eps) * (l - x[t]) + eps / v * smooth, 1e-12);
    check_close("linear_ce logprob", logprob[r], x[t] - l, 1e-12);
    for (std::int64_t j = 0; j < v; ++j) {
      p[j] = std::exp(x[j] - l);
      const double dx = p[j] - eps / v - (j == t ? 1 - eps : 0.0) + 2 * z_scale * l * p[j];
      const double dz = dx * inv_t * (1 - tanh_z[j] * tanh_z[j]);
      want_db[j] += dz;
      for (std::int64_t q = 0; q < d; ++q) {
        want_dh[r * d + q] += dz * w[j * d + q];
        want_dw[j * d + q] += dz * h[r * d + q];
      }
    }
  }
  for (std::int64_t i = 0; i < n * d; ++i)
    check_close("linear_ce d_hidden", dh[i], want_dh[i], 1e-12);
  for (std::int64_t i = 0; i < v * d; ++i)
    check_close("linear_ce d_weight", dw[i], want_dw[i], 1e-12);
  for (std::int64_t j = 0; j < v; ++j) check_close("linear_ce d_bias", db[j], want_db[j], 1e-12);
}

// one SGD-with-momentum step and two Adam steps over tensors of several sizes
void test_optim() {
  const mlmath::KernelTable& k = mlmath::kernels();
  for (std::int64_t n : {1, 7, 16, 33, 1000}) {
    std::vector<double> p(n), g(n), buf(n), p0(n);
    for (std::int64_t i = 0; i < n; ++i) {
      p[i] = p0[i] = std::sin(0.1 * i);
      g[i] = std::cos(0.3 * i);
      buf[i] = 0.5;
    }
    mlmath::OptimTensor<double> t{p.data(), g.data(), buf.data(), nullptr, nullptr, n};
    mlmath::SgdArgs<double> s{};
    s.tensors = &t;
    s.count = 1;
    s.lr = 0.1;
    s.momentum = 0.9;
    s.weight_decay = 0.01;
    s.grad_scale = 1.0;
    k.sgd_step_f64(s);
    for (std::int64_t i = 0; i < n; ++i) {
      const double d = g[i] + 0.01 * p0[i], b = 0.9 * 0.5 + d;
      check_close("sgd buffer", buf[i], b, 1e-14);
      check_close("sgd param", p[i], p0[i] - 0.1 * b, 1e-14);
    }
    // Adam, two steps from zero state: m, v and the bias-corrected update
    std::vector<float> q(n), m(n, 0.f), v(n, 0.f), gf(n);
    for (std::int64_t i = 0; i < n; ++i) {
      q[i] = static_cast<float>(p0[i]);
      gf[i] = static_cast<float>(g[i]);
    }
    double qd[1024], md[1024] = {0}, vd[1024] = {0};
    for (std::int64_t i = 0; i < n; ++i) qd[i] = q[i];
    for (int step = 1; step <= 2; ++step) {
      mlmath::OptimTensor<float> at{q.data(), gf.data(), m.data(), v.data(), nullptr, n};
      mlmath::AdamArgs<float> a{};
      a.tensors = &at;
      a.count = 1;
      a.lr = 1e-2f;
      a.beta1 = 0.9f;
      a.beta2 = 0.999f;
      a.eps = 1e-8f;
      a.step_size = static_cast<float>(1e-2 / (1 - std::pow(0.9, step)));
      a.inv_bias_correction2_sqrt = static_cast<float>(1 / std::sqrt(1 - std::pow(0.999, step)));
      a.grad_scale = 1.0f;
      k.adam_step_f32(a);
      for (std::int64_t i = 0; i < n; ++i) {
        md[i] = 0.9 * md[i] + 0.1 * gf[i];
        vd[i] = 0.999 * vd[i] + 0.001 * gf[i] * gf[i];
        const double mh = md[i] / (1 - std::pow(0.9, step));
        const double vh = vd[i] / (1 - std::pow(0.999, step));
        qd[i] -= 1e-2 * mh / (std::sqrt(vh) + 1e-8);
      }
    }
    for (std::int64_t i = 0; i < n; ++i) check_close("adam param", q[i], qd[i], 1e-5);
  }
}

// C = A B for sizes around the register tile and cache block edges
void test_gemm() {
  const mlmath::KernelTable& k = mlmath::kernels();
  const std::int64_t sizes[][3] = {{1, 1, 1},   {3, 5, 7},      {8, 16, 4}, {17, 33, 9},
                                   {64, 1, 65}, {100, 70, 300}, {7, 257, 3}};
  for (const auto& s : sizes) {
    const std::int64_t M = s[0], N = s[1], K = s[2];
    const std::vector<float> a = random_floats(M * K, 1), b = random_floats(K * N, 2);
    std::vector<float> c(M * N, -1.f);
    const mlmath::GemmArgs<float> g = row_major_gemm(M, N, K, a.data(), b.data(), c.data());
    k.gemm_f32(g);
    for (std::int64_t i = 0; i < M; ++i)
      for (std::int64_t j = 0; j < N; ++j) {
        double want = 0;
        for (std::int64_t p = 0; p < K; ++p) want += double(a[i * K + p]) * b[p * N + j];
        check_close("gemm", c[i * N + j], want, 1e-5 * std::sqrt(double(K)));
      }
  }
}

// conv2d with padding, stride, dilation and groups against the definition
void test_conv2d() {
  const mlmath::KernelTable& k = mlmath::kernels();
  struct Case {
    std::int64_t n, c, h, w, kout, r, s, stride, pad, dil, groups;
  };
  const Case cases[] = {{2, 3, 9, 8, 4, 3, 3, 1, 1, 1, 1},   {1, 4, 11, 7, 6, 3, 2, 2, 1, 1, 2},
                        {2, 5, 6, 6, 5, 3, 3, 1, 2, 2, 5},   {1, 8, 10, 10, 16, 1, 1, 1, 0, 1, 1},
                        {1, 2, 13, 13, 3, 5, 5, 3, 2, 1, 1}, {3, 16, 8, 8, 32, 3, 3, 1, 1, 1, 1}};
  for (const Case& t : cases) {
    const std::int64_t ho = (t.h + 2 * t.pad - t.dil * (t.r - 1) - 1) / t.stride + 1;
    const std::int64_t wo = (t.w + 2 * t.pad - t.dil * (t.s - 1) - 1) / t.stride + 1;
    const std::int64_t cg = t.c / t.groups, kg = t.kout / t.groups;
    const std::vector<float> x = random_floats(t.n * t.c * t.h * t.w, 3);
    const std::vector<float> w = random_floats(t.kout * cg * t.r * t.s, 4);
    const std::vector<float> bias = random_floats(t.kout, 5);
    std::vector<float> y(t.n * t.kout * ho * wo);
    mlmath::Conv2dArgs<float> a{x.data(), t.n,   t.c,         t.h,      t.w,   w.data(), t.kout,
                                t.r,      t.s,   bias.data(), y.data(), ho,    wo,       t.stride,
                                t.stride, t.pad, t.pad,       t.dil,    t.dil, t.groups};
    k.conv2d_f32(a);
    for (std::int64_t n = 0; n < t.n; ++n)
      for (std::int64_t ko = 0; ko < t.kout; ++ko)
        for (std::int64_t i = 0; i < ho; ++i)
          for (std::int64_t j = 0; j < wo; ++j) {
            double want = bias[ko];
            const std::int64_t g = ko / kg;
            for (std::int64_t c = 0; c < cg; ++c)
              for (std::int64_t r = 0; r < t.r; ++r)
                for (std::int64_t s = 0; s < t.s; ++s) {
                  const std::int64_t yy = i * t.stride - t.pad + r * t.dil;
                  const std::int64_t xx = j * t.stride - t.pad + s * t.dil;
                  if (yy < 0 || yy >= t.h || xx < 0 || xx >= t.w) continue;
                  want += double(w[((ko * cg + c) * t.r + r) * t.s + s]) *
                          x[((n * t.c + g * cg + c) * t.h + yy) * t.w + xx];
                }
            check_close("conv2d", y[((n * t.kout + ko) * ho + i) * wo + j], want, 1e-4);
          }
  }
}

// attention with grouped-query heads, both causal alignments and an additive mask; few queries
// against a long cache take the decode path (Note [decode]), split into chunks of keys
void test_attention() {
  const mlmath::KernelTable& k = mlmath::kernels();
  struct Case {
    std::int64_t b, hq, hkv, lq, lk, d, dv;
    int causal;
    bool mask;
    std::int64_t num_splits = 0;
  };
  const Case cases[] = {{1, 1, 1, 5, 5, 4, 4, 0, false},      {2, 4, 2, 7, 13, 8, 5, 1, false},
                        {1, 2, 1, 9, 200, 16, 16, 2, true},   {1, 3, 3, 1, 1, 3, 2, 1, false},
                        {2, 2, 2, 130, 97, 32, 8, 0, true},   {1, 4, 1, 2, 2000, 16, 8, 2, false},
                        {2, 4, 2, 1, 1000, 12, 8, 0, true, 7}};
  for (const Case& t : cases) {
    const std::vector<double> q = [&] {
      const auto f = random_floats(t.b * t.hq * t.lq * t.d, 6);
      return std::vector<double>(f.begin(), f.end());
    }();
    const auto kf = random_floats(t.b * t.hkv * t.lk * t.d, 7);
    const auto vf = random_floats(t.b * t.hkv * t.lk * t.dv, 8);
    const auto mf = random_floats(t.lq * t.lk, 9);
    const std::vector<double> kk(kf.begin(), kf.end()), v(vf.begin(), vf.end());
    const std::vector<double> mask(mf.begin(), mf.end());
    std::vector<double> out(t.b * t.hq * t.lq * t.dv), lse(t.b * t.hq * t.lq);
    mlmath::AttentionArgs<double> a{};
    a.q = q.data();
    a.k = kk.data();
    a.v = v.data();
    a.batch = t.b;
    a.hq = t.hq;
    a.hkv = t.hkv;
    a.lq = t.lq;
    a.lk = t.lk;
    a.d = t.d;
    a.dv = t.dv;
    a.k_batch_stride = t.hkv * t.lk * t.d;
    a.v_batch_stride = t.hkv * t.lk * t.dv;
    if (t.mask) {
      a.mask = mask.data();
      a.mask_stride[2] = t.lk;  // one (lq, lk) mask broadcast over batch and heads
      a.mask_stride[3] = 1;
    }
    a.causal = t.causal;
    a.scale = 1.0 / std::sqrt(double(t.d));
    a.num_splits = t.num_splits;
    a.out = out.data();
    a.lse = lse.data();
    k.attention_f64(a);
    const std::int64_t group = t.hq / t.hkv;
    for (std::int64_t b = 0; b < t.b; ++b)
      for (std::int64_t h = 0; h < t.hq; ++h)
        for (std::int64_t i = 0; i < t.lq; ++i) {
          const double* qi = &q[((b * t.hq + h) * t.lq + i) * t.d];
          const std::int64_t hk = h / group;
          std::vector<double> s(t.lk, -INFINITY);
          double m = -INFINITY;
          for (std::int64_t j = 0; j < t.lk; ++j) {
            if (t.causal == 1 && j > i) continue;
            if (t.causal == 2 && j > i + t.lk - t.lq) continue;
            const double* kj = &kk[((b * t.hkv + hk) * t.lk + j) * t.d];
            double dot = 0;
            for (std::int64_t c = 0; c < t.d; ++c) dot += qi[c] * kj[c];
            s[j] = dot * a.scale + (t.mask ? mask[i * t.lk + j] : 0.0);
            m = std::fmax(m, s[j]);
          }
          double z = 0;
          for (std::int64_t j = 0; j < t.lk; ++j) z += std::isinf(s[j]) ? 0.0 : std::exp(s[j] - m);
          check_close("attention lse", lse[(b * t.hq + h) * t.lq + i], m + std::log(z), 1e-10);
          for (std::int64_t c = 0; c < t.dv; ++c) {
            double want = 0;
            for (std::int64_t j = 0; j < t.lk; ++j)
              if (!std::isinf(s[j]))
                want += std::exp(s[j] - m) / z * v[((b * t.hkv + hk) * t.lk + j) * t.dv + c];
            check_close("attention out", out[((b * t.hq + h) * t.lq + i) * t.dv + c], want, 1e-10);
          }
        }
  }
}

// the documented exceptions of the setup functions
// 16-bit storage through the C++ API: the scalar conversions on every bit pattern and known
// roundings, and the bf16 / f16 softmax and cross-entropy kernels against double loops on the
// widened inputs, within one rounding of the storage type (Note [16-bit storage]).
void test_sixteen() {
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const mlmath::bf16 b{static_cast<std::uint16_t>(bits)};
    const mlmath::f16 h{static_cast<std::uint16_t>(bits)};
    const float fb = mlmath::to_float(b), fh = mlmath::to_float(h);
    if (!std::isnan(fb) && mlmath::to_bf16(fb).bits != b.bits)
      check_close("bf16 round trip", 1, 0, 0);
    if (!std::isnan(fh) && mlmath::to_f16(fh).bits != h.bits)
      check_close("f16 round trip", 1, 0, 0);
  }
  check_close("bf16 tie to even", mlmath::to_float(mlmath::to_bf16(1.0f + 0x1p-8f)), 1.0, 0);
  check_close("bf16 tie up", mlmath::to_float(mlmath::to_bf16(1.0f + 3 * 0x1p-8f)), 1.0 + 0x1p-6,
              0);
  check_close("f16 overflow", std::isinf(mlmath::to_float(mlmath::to_f16(65520.0f))), 1, 0);
  check_close("f16 max", mlmath::to_float(mlmath::to_f16(65519.0f)), 65504.0, 0);
  check_close("f16 subnormal", mlmath::to_float(mlmath::to_f16(0x1p-24f)), 0x1p-24, 0);
  check_close("bf16 NaN", std::isnan(mlmath::to_float(mlmath::to_bf16(NAN))), 1, 0);

  const mlmath::KernelTable& k = mlmath::kernels();
  for (std::int64_t n : {1, 7, 8, 9, 17, 33, 1000}) {
    const std::int64_t rows = 3, size = rows * n;
    const std::vector<float> x32 = random_floats(size, static_cast<unsigned>(n), 3.0f);
    std::vector<mlmath::bf16> xb(size), yb(size), gb(size);
    std::vector<mlmath::f16> xh(size), yh(size);
    for (std::int64_t i = 0; i < size; ++i) {
      xb[i] = mlmath::to_bf16(x32[i]);
      xh[i] = mlmath::to_f16(x32[i]);
    }
    const mlmath::AxisLayout shape{rows, n, 1};
    k.softmax_bf16(xb.data(), yb.data(), shape);
    k.softmax_f16(xh.data(), yh.data(), shape);
    std::vector<std::int64_t> target(rows);
    std::vector<float> weight(n, 1.0f), loss(rows);
    for (std::int64_t r = 0; r < rows; ++r) target[r] = r % n;
    mlmath::CrossEntropyArgs<mlmath::bf16> ce{};
    ce.shape = shape;
    ce.logits = xb.data();
    ce.target_index = target.data();
    ce.weight = weight.data();
    ce.weight_sum = static_cast<float>(n);
    ce.ignore_index = -100;
    ce.loss = loss.data();
    ce.grad = gb.data();
    ce.grad_scale_all = 1.0f;
    k.cross_entropy_bf16(ce);
    for (std::int64_t r = 0; r < rows; ++r) {
      auto softmax_of = [&](auto* x, std::int64_t j) {
        double m = -INFINITY, z = 0;
        for (std::int64_t c = 0; c < n; ++c) m = std::fmax(m, mlmath::to_float(x[r * n + c]));
        for (std::int64_t c = 0; c < n; ++c) z += std::exp(mlmath::to_float(x[r * n + c]) - m);
        return std::exp(mlmath::to_float(x[r * n + j]) - m) / z;
      };
      double lse = 0;
      for (std::int64_t j = 0; j < n; ++j) {
        const double pb = softmax_of(xb.data(), j), ph = softmax_of(xh.data(), j);
        check_close("softmax_bf16", mlmath::to_float(yb[r * n + j]), pb, 0x1p-8 + 1e-5);
        check_close("softmax_f16", mlmath::to_float(yh[r * n + j]), ph, 0x1p-11 + 1e-5);
        const double want_grad = pb - (j == target[r] ? 1.0 : 0.0);
        check_close("cross_entropy_bf16 grad", mlmath::to_float(gb[r * n + j]), want_grad,
                    0x1p-8 + 1e-5);
        if (j == target[r]) lse = -std::log(pb);
      }
      check_close("cross_entropy_bf16 loss", loss[r], lse, 1e-5);
    }
  }
  // gemm_bf16 with K over several KC blocks: float32 accumulation, C rounded once
  for (std::int64_t m : {1, 5, 13}) {
    const std::int64_t n = 19, kk = 500;
    const std::vector<float> a32 = random_floats(m * kk, 7), b32 = random_floats(kk * n, 8);
    std::vector<mlmath::bf16> a(m * kk), b(kk * n), c(m * n);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = mlmath::to_bf16(a32[i]);
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = mlmath::to_bf16(b32[i]);
    const mlmath::GemmArgs<mlmath::bf16> g = row_major_gemm(m, n, kk, a.data(), b.data(), c.data());
    k.gemm_bf16(g);
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        double want = 0, mag = 0;
        for (std::int64_t q = 0; q < kk; ++q) {
          const double t =
              static_cast<double>(mlmath::to_float(a[i * kk + q])) * mlmath::to_float(b[q * n + j]);
          want += t;
          mag += std::fabs(t);
        }
        const double got = mlmath::to_float(c[i * n + j]);
        if (!(std::fabs(got - want) <= 0x1p-8 * std::fabs(want) + 1e-5 * mag)) {
          check_close("gemm_bf16", got, want, 0);
        }
      }
  }
}

// float64 through the vector layer (2 to 8 lanes): softmax along rows of every length up to
// two vectors past the widest, and gemm_f64 around the register tile's edges (8x6 on NEON,
// 6x8 on AVX2) and across a KC block (K > 192).
void test_float64() {
  const mlmath::KernelTable& k = mlmath::kernels();
  for (std::int64_t n = 1; n <= 19; ++n) {
    const std::int64_t rows = 3, size = rows * n;
    std::mt19937 gen(static_cast<unsigned>(n));
    std::normal_distribution<double> dist(0.0, 3.0);
    std::vector<double> x(size), y(size);
    for (double& v : x) v = dist(gen);
    k.softmax_f64(x.data(), y.data(), mlmath::AxisLayout{rows, n, 1});
    for (std::int64_t r = 0; r < rows; ++r) {
      double m = -INFINITY, z = 0;
      for (std::int64_t j = 0; j < n; ++j) m = std::fmax(m, x[r * n + j]);
      for (std::int64_t j = 0; j < n; ++j) z += std::exp(x[r * n + j] - m);
      for (std::int64_t j = 0; j < n; ++j)
        check_close("softmax_f64", y[r * n + j], std::exp(x[r * n + j] - m) / z, 1e-13);
    }
  }
  for (std::int64_t M : {1, 7, 8, 9, 17}) {
    for (std::int64_t N : {5, 6, 7, 13}) {
      for (std::int64_t K : {1, 3, 200}) {
        std::mt19937 gen(static_cast<unsigned>(M * 1000 + N * 10 + K));
        std::normal_distribution<double> dist(0.0, 1.0);
        std::vector<double> a(M * K), b(K * N), c(M * N, -1.0);
        for (double& v : a) v = dist(gen);
        for (double& v : b) v = dist(gen);
        const mlmath::GemmArgs<double> g = row_major_gemm(M, N, K, a.data(), b.data(), c.data());
        k.gemm_f64(g);
        for (std::int64_t i = 0; i < M; ++i)
          for (std::int64_t j = 0; j < N; ++j) {
            double want = 0;
            for (std::int64_t p = 0; p < K; ++p) want += a[i * K + p] * b[p * N + j];
            check_close("gemm_f64", c[i * N + j], want, 1e-13 * std::sqrt(double(K)));
          }
      }
    }
  }
}

// The vector layer's 16-bit conversions, bit for bit, on every bf16 / f16 bit pattern:
// C = A B with K = 2, A's rows (1, f) and B's rows (x, ulp(x)), so that C = x + f ulp(x) is
// exact in float32 and rounded once into C.  B's full panels are widened in vector registers and
// C is rounded by the micro-kernel's vector stores (the last, partial panel by its partial
// stores); f = +-1/2 are ties (to even), 3/4 and -3/8 round up and down, 0 is the round trip,
// and the largest finite value plus half an ulp overflows to inf.
template <class S>
void check_conversions(const char* what, void (*gemm)(const mlmath::GemmArgs<S>&)) {
  const float fractions[] = {0.0f, 0.5f, -0.5f, 0.75f, -0.375f};
  const std::int64_t M = 5, N = 65536 + 7, K = 2;  // N % 12, N % 16: a partial last panel
  auto to_float = [](S v) { return mlmath::to_float(v); };
  auto to_s = [](float f) {
    if constexpr (std::is_same_v<S, mlmath::bf16>) {
      return mlmath::to_bf16(f);
    } else {
      return mlmath::to_f16(f);
    }
  };
  std::vector<S> a(M * K), b(K * N), c(M * N);
  for (std::int64_t i = 0; i < M; ++i) {
    a[i * K] = to_s(1.0f);
    a[i * K + 1] = to_s(fractions[i]);
  }
  for (std::int64_t j = 0; j < N; ++j) {
    const std::uint16_t bits = static_cast<std::uint16_t>(j);
    const float x = to_float(S{bits});
    float ulp = 0;
    if (std::isfinite(x)) {
      const float next = to_float(S{static_cast<std::uint16_t>(bits + 1)});
      ulp = std::isfinite(next) ? std::fabs(next - x)
                                : std::fabs(x - to_float(S{static_cast<std::uint16_t>(bits - 1)}));
    }
    b[j] = S{bits};
    b[N + j] = to_s(ulp);
  }
  const mlmath::GemmArgs<S> g = row_major_gemm(M, N, K, a.data(), b.data(), c.data());
  gemm(g);
  int bad = 0;
  for (std::int64_t i = 0; i < M; ++i)
    for (std::int64_t j = 0; j < N; ++j) {
      const float sum = 0.0f + to_float(b[j]) + fractions[i] * to_float(b[N + j]);
      const S want = to_s(sum), got = c[i * N + j];
      const bool ok = std::isnan(sum) ? std::isnan(to_float(got)) : got.bits == want.bits;
      if (!ok && ++bad <= 5) {
        ++failures;
        std::printf("FAIL [%s] %s: x bits 0x%04x + %g ulp gives 0x%04x, expected 0x%04x\n",
                    context.c_str(), what, unsigned(b[j].bits), double(fractions[i]),
                    unsigned(got.bits), unsigned(want.bits));
      }
    }
  failures += bad > 5 ? bad - 5 : 0;
}

void test_conversions() {
  check_conversions<mlmath::bf16>("bf16 rounding", mlmath::kernels().gemm_bf16);
  check_conversions<mlmath::f16>("f16 rounding", mlmath::kernels().gemm_f16);
}

// The ISA chosen by default is the best supported one, unless MLMATH_NATIVE_ISA forces one; an
// aarch64 build compiles and runs "neon" (Advanced SIMD is part of the base architecture).
void test_dispatch() {
  const std::vector<std::string> supported = mlmath::supported_isas();
  const char* forced = std::getenv("MLMATH_NATIVE_ISA");
  const std::string want = forced && *forced ? forced : supported.back();
  if (g_default_isa != want) {
    ++failures,
        std::printf("FAIL default ISA %s, expected %s\n", g_default_isa.c_str(), want.c_str());
  }
#if defined(__aarch64__) || defined(_M_ARM64)
  if (supported.back() != "neon") {
    ++failures, std::printf("FAIL aarch64: best supported ISA %s, expected neon\n",
                            supported.back().c_str());
  }
#endif
}

void test_errors() {
  bool threw = false;
  try {
    mlmath::select_isa("sse9");
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  if (!threw) ++failures, std::printf("FAIL select_isa(\"sse9\") did not throw\n");
  threw = false;
  try {
    mlmath::set_num_threads(0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  if (!threw) ++failures, std::printf("FAIL set_num_threads(0) did not throw\n");
  if (mlmath::compiled_isas().empty() || mlmath::compiled_isas().front() != "scalar") {
    ++failures, std::printf("FAIL compiled_isas() does not start with scalar\n");
  }
}

// InterruptCheck (Note [interrupts]): a poll that says "stop" ends a long batched GEMM early,
// polls run on the creating thread only, and a poll that never says stop changes nothing.
struct PollLog {
  std::atomic<int> calls{0};
  std::atomic<bool> other_thread{false};
  std::thread::id owner = std::this_thread::get_id();
  bool answer = true;
};

bool poll_log(void* context) {
  auto* log = static_cast<PollLog*>(context);
  if (std::this_thread::get_id() != log->owner) log->other_thread = true;
  ++log->calls;
  return log->answer;
}

void test_interrupt() {
  const mlmath::KernelTable& k = mlmath::kernels();
  const std::int64_t M = 256, N = 256, K = 1024, batch = 400;  // about 50 GFLOP: seconds
  const std::vector<float> a = random_floats(M * K, 1), b = random_floats(K * N, 2);
  std::vector<float> c(batch * M * N, -1.f);
  std::vector<std::int64_t> zero(batch, 0), c_off(batch);
  for (std::int64_t i = 0; i < batch; ++i) c_off[i] = i * M * N;
  mlmath::GemmArgs<float> g{M,        N,           K,           a.data(),    K, 1,
                            b.data(), N,           1,           c.data(),    N, false,
                            batch,    zero.data(), zero.data(), c_off.data()};
  PollLog stop;
  {
    mlmath::InterruptCheck check(&poll_log, &stop);
    k.gemm_f32(g);
    if (!check.interrupted())
      ++failures, std::printf("FAIL [%s] not interrupted\n", context.c_str());
  }
  if (stop.calls != 1) {
    ++failures, std::printf("FAIL [%s] %d polls after stop\n", context.c_str(), stop.calls.load());
  }
  if (c.back() != -1.f) ++failures, std::printf("FAIL [%s] ran to the end\n", context.c_str());
  PollLog go;
  go.answer = false;
  g.batch = 3;  // small: the result is checked
  {
    mlmath::InterruptCheck check(&poll_log, &go);
    k.gemm_f32(g);
    if (check.interrupted()) ++failures, std::printf("FAIL [%s] interrupted\n", context.c_str());
  }
  if (stop.other_thread || go.other_thread) {
    ++failures, std::printf("FAIL [%s] polled on a worker thread\n", context.c_str());
  }
  for (std::int64_t j = 0; j < N; j += 37) {
    double want = 0;
    for (std::int64_t p = 0; p < K; ++p) want += double(a[5 * K + p]) * b[p * N + j];
    check_close("gemm under a check", c[2 * M * N + 5 * N + j], want, 1e-5 * std::sqrt(double(K)));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void()>> families{
      {"softmax", test_softmax},     {"cross_entropy", test_cross_entropy},
      {"linear_ce", test_linear_ce}, {"optim", test_optim},
      {"gemm", test_gemm},           {"conv2d", test_conv2d},
      {"attention", test_attention}, {"errors", test_errors},
      {"interrupt", test_interrupt}, {"sixteen", test_sixteen},
      {"float64", test_float64},     {"conversions", test_conversions},
      {"dispatch", test_dispatch}};
  if (argc != 2 || !families.count(argv[1])) {
    std::printf("usage: test_kernels FAMILY, one of:");
    for (const auto& f : families) std::printf(" %s", f.first.c_str());
    std::printf("\n");
    return 2;
  }
  const std::string isa_before = mlmath::selected_isa();
  g_default_isa = isa_before;
  // MLMATH_NATIVE_ISA set: that ISA only (a run forced to the reference path runs nothing else)
  const char* forced = std::getenv("MLMATH_NATIVE_ISA");
  const std::vector<std::string> isas =
      forced && *forced ? std::vector<std::string>{isa_before} : mlmath::supported_isas();
  for (const std::string& isa : isas) {
    mlmath::select_isa(isa);
    for (int threads : {1, 2}) {
      mlmath::set_num_threads(threads);
      context = isa + ", " + std::to_string(threads) + " thread(s)";
      families.at(argv[1])();
    }
  }
  mlmath::select_isa(isa_before);
  std::printf("%s: %s over ISAs", argv[1], failures ? "FAILED" : "passed");
  for (const std::string& isa : isas) std::printf(" %s", isa.c_str());
  std::printf(" (%d failure(s))\n", failures);
  return failures ? 1 : 0;
}
