// Runs one mlmath kernel once, between two getppid() system calls that mark the counted region
// for .ci/arm64_count.sh (qemu-aarch64 logs the executed guest code and, with -strace, the
// system calls in one stream; the counter sums the instructions executed between the markers).
//
//   count_driver KERNEL SIZE ISA
//
// KERNEL and the meaning of SIZE (the printed `units` is what instructions are divided by):
//   softmax, softmax_bf16   SIZE rows x 4096 float32 / bf16 values        units: elements
//   cross_entropy           SIZE rows x 8192 classes, loss and gradient    units: logits
//   adam                    one AdamW step of SIZE float32 params          units: params
//   matmul                  SIZE x SIZE x SIZE float32 GEMM                units: multiply-adds
//   conv2d                  N1 C32 SIZE x SIZE K32 3x3, pad 1, stride 1    units: multiply-adds
//   attention               B1 H2 L=SIZE D64, no mask (QK^T and PV)        units: multiply-adds
//   none                    nothing (the cost of the markers themselves)   units: 1
// ISA is given to select_isa ("scalar", "neon"); one thread.  Inputs are filled before the
// first marker, and one uncounted call at the same size runs first, so the counted call sees
// warm dispatch, thread and scratch state (the steady state of a training loop).
#include <unistd.h>

#include <sys/syscall.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "mlmath/mlmath.h"

namespace {

// Marks the counted region: a system call the kernels never make.
void marker() { syscall(SYS_getppid); }

// Values in [-scale, scale) from a 32-bit LCG: cheap and the same on every run.
std::vector<float> fill(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::vector<float> v(n);
  std::uint32_t s = seed * 2654435761u + 1u;
  for (float& x : v) {
    s = s * 1664525u + 1013904223u;
    x = scale * (static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: count_driver KERNEL SIZE ISA\n");
    return 2;
  }
  const std::string kernel = argv[1];
  const std::int64_t size = std::atoll(argv[2]);
  mlmath::select_isa(argv[3]);
  mlmath::set_num_threads(1);
  const mlmath::KernelTable& k = mlmath::kernels();

  std::function<void()> run;
  double units = 1;
  // Buffers live until the end of main.
  std::vector<float> a, b, c, d, e;
  std::vector<mlmath::bf16> h1, h2;
  std::vector<std::int64_t> target;
  mlmath::CrossEntropyArgs<float> ce{};
  mlmath::OptimTensor<float> ot{};
  mlmath::AdamArgs<float> adam{};
  mlmath::GemmArgs<float> gemm{};
  mlmath::Conv2dArgs<float> conv{};
  mlmath::AttentionArgs<float> att{};

  if (kernel == "none") {
    run = [] {};
  } else if (kernel == "softmax") {
    const std::int64_t n = 4096;
    a = fill(size * n, 1, 4.0f);
    b.resize(a.size());
    units = double(size) * n;
    run = [&, n] { k.softmax_f32(a.data(), b.data(), mlmath::AxisLayout{size, n, 1}); };
  } else if (kernel == "softmax_bf16") {
    const std::int64_t n = 4096;
    a = fill(size * n, 1, 4.0f);
    h1.resize(a.size());
    h2.resize(a.size());
    for (std::size_t i = 0; i < a.size(); ++i) h1[i] = mlmath::to_bf16(a[i]);
    units = double(size) * n;
    run = [&, n] { k.softmax_bf16(h1.data(), h2.data(), mlmath::AxisLayout{size, n, 1}); };
  } else if (kernel == "cross_entropy") {
    const std::int64_t n = 8192;
    a = fill(size * n, 2, 4.0f);
    b.resize(a.size());  // gradient
    c.assign(n, 1.0f);   // class weights (none given: all ones)
    d.resize(size);      // losses
    target.resize(size);
    for (std::int64_t i = 0; i < size; ++i) target[i] = (i * 977) % n;
    ce.shape = mlmath::AxisLayout{size, n, 1};
    ce.logits = a.data();
    ce.target_index = target.data();
    ce.weight = c.data();
    ce.weight_sum = float(n);
    ce.ignore_index = -100;
    ce.loss = d.data();
    ce.grad = b.data();
    ce.grad_scale_all = 1.0f / float(size);  // reduction='mean'
    units = double(size) * n;
    run = [&] { k.cross_entropy_f32(ce); };
  } else if (kernel == "adam") {
    a = fill(size, 3);         // param
    b = fill(size, 4, 1e-2f);  // grad
    c = fill(size, 5, 1e-3f);  // exp_avg
    d = fill(size, 6, 1e-4f);  // exp_avg_sq (made non-negative below)
    for (float& x : d) x = std::fabs(x);
    ot = mlmath::OptimTensor<float>{a.data(), b.data(), c.data(), d.data(), nullptr, size};
    adam.tensors = &ot;
    adam.count = 1;
    adam.lr = 1e-3f;
    adam.beta1 = 0.9f;
    adam.beta2 = 0.999f;
    adam.eps = 1e-8f;
    adam.weight_decay = 1e-2f;
    adam.decoupled = true;  // AdamW
    adam.step_size = 1e-3f / (1.0f - 0.9f * 0.9f);
    adam.inv_bias_correction2_sqrt = 1.0f / std::sqrt(1.0f - 0.999f * 0.999f);
    adam.grad_scale = 1.0f;
    units = double(size);
    run = [&] { k.adam_step_f32(adam); };
  } else if (kernel == "matmul") {
    const std::int64_t n = size;
    a = fill(n * n, 7);
    b = fill(n * n, 8);
    c.resize(n * n);
    gemm.m = gemm.n = gemm.k = n;
    gemm.a = a.data();
    gemm.a_rs = n;
    gemm.a_cs = 1;
    gemm.b = b.data();
    gemm.b_rs = n;
    gemm.b_cs = 1;
    gemm.c = c.data();
    gemm.c_rs = n;
    gemm.batch = 1;
    units = double(n) * n * n;
    run = [&] { k.gemm_f32(gemm); };
  } else if (kernel == "conv2d") {
    const std::int64_t ch = 32, kout = 32, r = 3;
    a = fill(ch * size * size, 9);
    b = fill(kout * ch * r * r, 10, 0.2f);
    c = fill(kout, 11);
    d.resize(kout * size * size);
    conv =
        mlmath::Conv2dArgs<float>{a.data(), 1,    ch,   size, size, b.data(), kout, r, r, c.data(),
                                  d.data(), size, size, 1,    1,    1,        1,    1, 1, 1};
    units = double(kout) * size * size * ch * r * r;
    run = [&] { k.conv2d_f32(conv); };
  } else if (kernel == "attention") {
    const std::int64_t heads = 2, dim = 64, len = size;
    a = fill(heads * len * dim, 12);
    b = fill(heads * len * dim, 13);
    c = fill(heads * len * dim, 14);
    d.resize(heads * len * dim);
    att.q = a.data();
    att.k = b.data();
    att.v = c.data();
    att.batch = 1;
    att.hq = att.hkv = heads;
    att.lq = att.lk = len;
    att.d = att.dv = dim;
    att.k_batch_stride = att.v_batch_stride = heads * len * dim;
    att.scale = 1.0f / std::sqrt(float(dim));
    att.out = d.data();
    units = 2.0 * heads * len * len * dim;
    run = [&] { k.attention_f32(att); };
  } else {
    std::fprintf(stderr, "count_driver: unknown kernel %s\n", kernel.c_str());
    return 2;
  }
  run();  // uncounted warm-up call
  marker();
  run();
  marker();
  std::printf("kernel %s isa %s units %.0f\n", kernel.c_str(), mlmath::selected_isa().c_str(),
              units);
  return 0;
}
