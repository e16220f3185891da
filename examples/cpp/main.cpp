// softmax, cross-entropy with its gradient, fused linear + cross-entropy and causal attention
// through mlmath's C++ API, each checked against values worked out by hand (or by a plain loop);
// exit status 1 on any mismatch.  Build: see CMakeLists.txt beside this file.
#include <cmath>
#include <cstdio>
#include <vector>

#include "mlmath/mlmath.h"

namespace {

int failures = 0;

void expect_near(const char* what, double got, double want, double tol) {
  const bool ok = std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
  if (!ok) ++failures;
  std::printf("  %-34s %12.8f  (expected %12.8f)%s\n", what, got, want, ok ? "" : "  MISMATCH");
}

}  // namespace

int main() {
  const mlmath::KernelTable& k = mlmath::kernels();  // picks the best ISA of this CPU
  std::printf("mlmath %s, ISA %s, %d thread(s)\n", mlmath::version(),
              mlmath::selected_isa().c_str(), mlmath::get_num_threads());

  // softmax of one row [1, 2, 3]: e^i / (e + e^2 + e^3)
  std::printf("softmax([1, 2, 3]):\n");
  const std::vector<float> x{1.f, 2.f, 3.f};
  std::vector<float> y(3);
  k.softmax_f32(x.data(), y.data(), mlmath::AxisLayout{1, 3, 1});
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  for (int i = 0; i < 3; ++i) expect_near("p_i", y[i], std::exp(i + 1.0) / z, 1e-6);

  // cross-entropy of logits [[1, 2, 3], [0, 0, 0]] with targets [2, 0], and d(loss)/dlogits
  // (per-element losses; gradient p - onehot(t) per row)
  std::printf("cross_entropy(logits, [2, 0]) with gradient:\n");
  const std::vector<double> logits{1, 2, 3, 0, 0, 0};
  const std::vector<std::int64_t> target{2, 0};
  const std::vector<double> weight(3, 1.0);
  std::vector<double> loss(2), grad(6);
  mlmath::CrossEntropyArgs<double> ce{};
  ce.shape = mlmath::AxisLayout{2, 3, 1};
  ce.logits = logits.data();
  ce.target_index = target.data();
  ce.weight = weight.data();
  ce.weight_sum = 3.0;
  ce.ignore_index = -100;
  ce.loss = loss.data();
  ce.grad = grad.data();
  ce.grad_scale_all = 1.0;
  k.cross_entropy_f64(ce);
  expect_near("loss[0] = log(z) - 3", loss[0], std::log(z) - 3.0, 1e-12);
  expect_near("loss[1] = log 3", loss[1], std::log(3.0), 1e-12);
  expect_near("dlogits[0][2] = p_2 - 1", grad[2], std::exp(3.0) / z - 1.0, 1e-12);
  expect_near("dlogits[1][0] = 1/3 - 1", grad[3], 1.0 / 3.0 - 1.0, 1e-12);
  expect_near("dlogits[1][1] = 1/3", grad[4], 1.0 / 3.0, 1e-12);

  // fused linear + cross-entropy: hidden [[1, 0], [0, 1]] times weight [[2, 0], [0, 0], [0, 0]]
  // gives the logits [[2, 0, 0], [0, 0, 0]] without forming them; targets [0, 2]
  std::printf("linear_cross_entropy(hidden, weight, [0, 2]) with gradients:\n");
  const std::vector<double> hidden{1, 0, 0, 1}, lin_w{2, 0, 0, 0, 0, 0};
  const std::vector<std::int64_t> lin_t{0, 2};
  std::vector<double> lin_loss(2), lse(2), d_hidden(4), d_weight(6);
  mlmath::LinearCrossEntropyArgs<double> lce{};
  lce.n = 2;
  lce.d = 2;
  lce.v = 3;
  lce.hidden = hidden.data();
  lce.hidden_rs = 2;
  lce.hidden_cs = 1;
  lce.weight = lin_w.data();
  lce.weight_rs = 2;
  lce.weight_cs = 1;
  lce.target = lin_t.data();
  lce.class_weight = weight.data();
  lce.class_weight_sum = 3.0;
  lce.ignore_index = -100;
  lce.inv_temperature = 1.0;
  lce.loss = lin_loss.data();
  lce.lse = lse.data();
  lce.d_hidden = d_hidden.data();
  lce.d_weight = d_weight.data();
  lce.ce_scale_all = 1.0;
  k.linear_cross_entropy_f64(lce);
  const double z2 = std::exp(2.0) + 2.0;
  expect_near("loss[0] = log(e^2 + 2) - 2", lin_loss[0], std::log(z2) - 2.0, 1e-12);
  expect_near("loss[1] = log 3", lin_loss[1], std::log(3.0), 1e-12);
  expect_near("d_hidden[0][0] = 2 (p_0 - 1)", d_hidden[0], 2.0 * (std::exp(2.0) / z2 - 1.0), 1e-12);
  expect_near("d_weight[0][1] = p_0 of token 1", d_weight[1], 1.0 / 3.0, 1e-12);

  // causal attention, one head, L = 3, D = 2: row i averages v over keys j <= i with
  // weights softmax_j(q_i . k_j / sqrt(2)); checked against the plain loop
  std::printf("attention(q, k, v, causal=True):\n");
  const int L = 3, D = 2;
  const std::vector<float> q{1, 0, 0, 1, 1, 1}, kk{1, 1, 0, 1, 1, 0}, v{1, 2, 3, 4, 5, 6};
  std::vector<float> out(L * D);
  mlmath::AttentionArgs<float> at{};
  at.q = q.data();
  at.k = kk.data();
  at.v = v.data();
  at.batch = at.hq = at.hkv = 1;
  at.lq = at.lk = L;
  at.d = at.dv = D;
  at.k_batch_stride = L * D;
  at.v_batch_stride = L * D;
  at.causal = 1;
  at.scale = 1.0f / std::sqrt(2.0f);
  at.out = out.data();
  k.attention_f32(at);
  for (int i = 0; i < L; ++i) {
    double denom = 0, num[2] = {0, 0};
    for (int j = 0; j <= i; ++j) {
      const double s = (q[i * D] * kk[j * D] + q[i * D + 1] * kk[j * D + 1]) / std::sqrt(2.0);
      denom += std::exp(s);
      for (int c = 0; c < D; ++c) num[c] += std::exp(s) * v[j * D + c];
    }
    for (int c = 0; c < D; ++c) expect_near("out[i][c]", out[i * D + c], num[c] / denom, 1e-6);
  }

  std::printf(failures ? "FAILED: %d mismatch(es)\n" : "all values as expected\n", failures);
  return failures ? 1 : 0;
}
