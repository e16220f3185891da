// mlmath: the C++ API of mlmath_native, usable without Python.
//
// Kernels are compiled once per instruction set (scalar, avx2, avx512 on x86-64; scalar, neon on
// arm64) and the best one the CPU and OS support is chosen on first use, or forced with
// MLMATH_NATIVE_ISA or select_isa().  Call kernels through kernels(), e.g.
//
//     mlmath::kernels().softmax_f32(x, y, mlmath::AxisLayout{rows, cols, 1});
//
// Kernels do not validate their arguments (the Python layer does); they never throw.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace mlmath {

// 16-bit storage types (Note [16-bit storage]).  A kernel named *_bf16 or *_f16 reads and writes
// these and computes in float32: every value is widened on load, every sum, maximum, exp and
// GEMM accumulator is a float, and each result is rounded once to the storage type, to nearest
// even.  bf16 is the top half of a float32 (8 exponent bits, 7 mantissa bits; the layout of
// torch.bfloat16 and ml_dtypes.bfloat16); f16 is IEEE binary16 (numpy.float16).
struct bf16 {
  std::uint16_t bits;
};
struct f16 {
  std::uint16_t bits;
};
// One code of a blockwise-quantised 8-bit optimizer state (OptimTensor<S, q8>); a signed or an
// unsigned byte depending on the state (Note [8-bit optimizer state] in kernels/optim.cpp).
struct q8 {
  std::uint8_t bits;
};
// Elements per block of an 8-bit state: each block has its own float32 scale (its largest
// magnitude), 4 / 256 = 1.6 % on top of the byte per element, and a block is small enough that
// one outlier coarsens the codes of 255 neighbours only (bitsandbytes' and torchao's size).
constexpr std::int64_t kQuantBlock = 256;
// Conversions for callers (the kernels use their own vector forms): exact widening, and
// narrowing rounded to nearest even (NaN stays a quiet NaN of the same sign; values past the
// largest finite 16-bit value round to +-inf).
float to_float(bf16 x);
float to_float(f16 x);
bf16 to_bf16(float x);
f16 to_f16(float x);

// The type a storage type computes in: double for double, float for float, bf16 and f16.
template <class S>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

// A C-contiguous array seen as [outer][n][inner]; an operation "along an axis" runs along n.
struct AxisLayout {
  std::int64_t outer;
  std::int64_t n;
  std::int64_t inner;
};

// Cross-entropy along the class axis n of logits [outer][n][inner], PyTorch's F.cross_entropy
// per element (formulas in kernels/cross_entropy.cpp).  Exactly one of target_index and
// target_prob is set; arguments are trusted (the caller has checked every label).  Logits,
// probabilities and the gradient have the storage type S; weights, losses and scales its
// compute type T (float for the 16-bit types: the loss of 16-bit logits is float32).
template <class S>
struct CrossEntropyArgs {
  using T = typename ComputeType<S>::type;
  AxisLayout shape;
  const S* logits;                   // [outer][n][inner]
  const std::int64_t* target_index;  // [outer][inner]: a class in [0, n) or ignore_index
  const S* target_prob;              // [outer][n][inner]: class probabilities
  const T* weight;                   // [n] class weights (all ones when the user gave none)
  T weight_sum;                      // sum of weight
  std::int64_t ignore_index;
  T label_smoothing;    // in [0, 1]
  T* loss;              // out [outer][inner]: the loss of every element
  S* grad;              // out [outer][n][inner]: d(sum_e scale_e loss_e)/dlogits, or null
  const T* grad_scale;  // [outer][inner]: scale_e, or null for grad_scale_all everywhere
  T grad_scale_all;
};

// Fused linear + cross-entropy (kernels/linear_ce.cpp): per token r of hidden (n x d, element
// (r, k) at hidden[r * hidden_rs + k * hidden_cs]) the cross-entropy of the logits
// softcap(hidden_r W^T + bias) * inv_temperature over v classes (weight: v x d, element (j, k) at
// weight[j * weight_rs + k * weight_cs]), never holding more than `chunk` rows of logits (0: the
// kernel's choice).  softcap 0 means none.  Per-token outputs are T (float32 for 16-bit inputs);
// loss holds each token's cross-entropy without the z-loss, lse its logsumexp (the z-loss is
// z_scale lse^2, added by the caller).  With d_hidden set, d_hidden (n x d, contiguous),
// d_weight (v x d, contiguous) and d_bias (v, or null) receive the gradients of
// sum_r ce_scale_r loss_r + z_scale_r lse_r^2 (null scale arrays: the *_all value everywhere).
template <class S>
struct LinearCrossEntropyArgs {
  using T = typename ComputeType<S>::type;
  std::int64_t n, d, v;
  const S* hidden;
  std::int64_t hidden_rs, hidden_cs;
  const S* weight;
  std::int64_t weight_rs, weight_cs;
  const S* bias;               // [v] or null
  const std::int64_t* target;  // [n]: a class in [0, v) or ignore_index
  const T* class_weight;       // [v] (all ones when the user gave none)
  T class_weight_sum;
  std::int64_t ignore_index;
  T label_smoothing, softcap, inv_temperature;
  std::int64_t chunk;
  T* loss;      // out [n]
  T* lse;       // out [n]
  T* logprob;   // out [n] or null: log p(target), 0 for ignored tokens
  T* entropy;   // out [n] or null
  S* d_hidden;  // out, or null for no gradients
  S* d_weight;
  S* d_bias;
  const T* ce_scale;
  T ce_scale_all;
  const T* z_scale;
  T z_scale_all;
};

// One tensor of an optimizer step: n elements in each array; state pointers a step does not use
// are null.  Arrays are contiguous and do not overlap.  S is the storage type of param and grad
// (float, double, bf16, f16) and St that of the state buffers: S itself for float32 / float64
// params, float or bf16 for 16-bit params (and bf16 for float32 params).  16-bit params compute
// in float32 (Note [16-bit optimizer steps] in kernels/optim.cpp); `master`, when not null, is
// a float32 copy of a 16-bit param: the step reads and writes it and stores its value rounded to
// nearest even into param.
//
// St = q8: the state is blockwise quantised to 8 bits (Note [8-bit optimizer state] in
// kernels/optim.cpp): state1 holds signed codes (int8), state2 and state3 unsigned codes
// (uint8), one byte per element, and absmax1..3 one float32 scale per block of kQuantBlock
// elements (ceil(n / kQuantBlock) of them), for params of any storage type but double.
template <class S, class St = S>
struct OptimTensor {
  S* param;
  const S* grad;
  St* state1;  // SGD: momentum buffer; Adam: exp_avg
  St* state2;  // Adam: exp_avg_sq
  St* state3;  // Adam with amsgrad: max_exp_avg_sq
  std::int64_t n;
  float* master = nullptr;   // 16-bit params only: the float32 master weights
  float* absmax1 = nullptr;  // q8 state only: the block scales of state1..3
  float* absmax2 = nullptr;
  float* absmax3 = nullptr;
};

// The type an optimizer step of storage type S computes in: double for double, else float.
template <class S>
using optim_math_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Stochastic rounding of the 16-bit values a step stores (bf16 params without a master copy, and
// bf16 state): when `stochastic_rounding`, the bits come from a counter-based hash of
// (seed, step, tensor index, element index) (Note [stochastic rounding] in kernels/optim.cpp).
struct RoundingArgs {
  bool stochastic_rounding = false;
  std::uint64_t seed = 0;
  std::int64_t step = 0;
};

// torch.optim.SGD over every tensor in one parallel region (kernels/optim.cpp).
template <class S, class St = S>
struct SgdArgs {
  using T = optim_math_t<S>;
  const OptimTensor<S, St>* tensors;
  std::int64_t count;
  // The hyper-parameters as given (double): the kernel forms 1 - dampening in double and rounds
  // each constant once to T, as PyTorch's Python-float scalars are.
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
  bool first_step;  // momentum buffer := d_p (torch creates it on the first step)
  T grad_scale;     // applied to every gradient first: -1 for maximize, times a clip coefficient
  RoundingArgs rounding = {};
};

// torch.optim.Adam (decoupled = false) / AdamW (decoupled = true).
template <class S, class St = S>
struct AdamArgs {
  using T = optim_math_t<S>;
  const OptimTensor<S, St>* tensors;
  std::int64_t count;
  // The hyper-parameters as given (double): 1 - beta1, 1 - beta2 and 1 - lr * weight_decay are
  // formed in double and rounded once to T, as PyTorch's Python-float scalars are (forming
  // 1 - beta2 from a float 0.999f gave 0.00099998713, 1.3e-5 off).
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, amsgrad;
  T step_size;                  // lr / (1 - beta1^step)
  T inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step)
  T grad_scale;
  RoundingArgs rounding = {};
};

// Batched matrix product C_b = A_b B_b (or C_b += A_b B_b): A_b is M x K with element (i, k)
// at a[a_offset[b] + i * a_rs + k * a_cs] (any strides), B_b likewise, C_b has rows of stride
// c_rs and contiguous columns.  Null offsets mean batch == 1 at offset 0.
template <class T>
struct GemmArgs {
  std::int64_t m, n, k;
  const T* a;
  std::int64_t a_rs, a_cs;
  const T* b;
  std::int64_t b_rs, b_cs;
  T* c;
  std::int64_t c_rs;
  bool accumulate;
  std::int64_t batch;
  const std::int64_t* a_offset;
  const std::int64_t* b_offset;
  const std::int64_t* c_offset;
};

// 2-D convolution (cross-correlation, PyTorch's conv2d) with zero padding:
//   y[n][k][i][j] = bias[k] + sum_{c, r, s} w[k][c][r][s] x[n][g*C/G + c][i*sh - pt + r*dh][j*sw -
//   pl + s*dw]
// over the C/G input channels of k's group g (positions outside x read as 0).  x, w, y are
// C-contiguous; other padding modes are applied to x beforehand.
template <class T>
struct Conv2dArgs {
  const T* x;
  std::int64_t n, c, h, w;
  const T* weight;  // [k][c / groups][r][s]
  std::int64_t k, r, s;
  const T* bias;  // [k] or null
  T* y;           // [n][k][ho][wo]
  std::int64_t ho, wo;
  std::int64_t stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, groups;
};

// The weight gradient of a stride-1 conv2d (zero padding):
//   grad_w[k][c][r][s] = sum_{n,i,j} g[n][k][i][j] x[n][g*C/G + c][i - pt + r*dh][j - pl + s*dw]
// (positions outside x read as 0); x, grad_out (g) and grad_w are C-contiguous.
template <class T>
struct Conv2dWeightGradArgs {
  const T* x;
  std::int64_t n, c, h, w;
  const T* grad_out;  // [n][k][ho][wo]
  std::int64_t k, ho, wo;
  T* grad_weight;  // [k][c / groups][r][s]
  std::int64_t r, s;
  std::int64_t stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, groups;  // zero padding
};

// The input gradient of conv2d on the padded input: grad_xp[n][c][y][x] = sum over the windows
// that read (y, x) of grad_out * w (every element written).
template <class T>
struct Conv2dInputGradArgs {
  const T* grad_out;  // [n][k][ho][wo]
  std::int64_t n, k, ho, wo;
  const T* weight;  // [k][c / groups][r][s]
  std::int64_t c, r, s;
  T* grad_input;  // [n][c][hp][wp]: the padded input's gradient
  std::int64_t hp, wp;
  std::int64_t stride_h, stride_w, dil_h, dil_w, groups;
};

// Scaled dot-product attention (kernels/attention.cpp).  Arrays are C-contiguous
// [batch][heads][rows][features]; k and v may have one batch shared by all (batch stride 0).
// Masks are read through strides (0 for broadcast axes), [batch][query head][i][j].  For bf16
// and f16 storage, q, k, v and out are 16-bit and the float mask, scale and lse float32.
template <class T>
struct AttentionArgs {
  using C = typename ComputeType<T>::type;  // the scale, a float mask and the lse
  const T* q;                               // [b][hq][lq][d]
  const T* k;                               // [b or 1][hkv][lk][d]
  const T* v;                               // [b or 1][hkv][lk][dv]
  std::int64_t batch, hq, hkv, lq, lk, d, dv;
  std::int64_t k_batch_stride, v_batch_stride;  // elements; 0: shared by every batch
  const void* mask;  // nullptr, bool (uint8: nonzero = may attend) or C (added to the scores)
  bool mask_is_bool;
  std::int64_t mask_stride[4];  // elements, for (b, h, i, j)
  int causal;                   // 0 none, 1 upper left (j <= i), 2 lower right (j <= i + lk - lq)
  C scale;
  double dropout_p;
  std::uint64_t seed;
  T* out;  // [b][hq][lq][dv]
  C* lse;  // [b][hq][lq], or nullptr
  // Options that default to off (a value-initialised AttentionArgs{} has none of them).
  // Sliding window: query i sees keys i + off - window_left <= j <= i + off + window_right, off
  // the causal alignment's (lk - lq for causal 2, else 0); -1 = unlimited on that side.
  std::int64_t window_left = -1, window_right = -1;
  C softcap = 0;             // > 0: scores become softcap * tanh(scores / softcap) before masks
  const C* sinks = nullptr;  // [hq]: one logit per query head in every row's denominator
  const C* alibi = nullptr;  // [hq]: slopes; scores -= slope * |i + off - j|
  // [batch], 0 <= kv_len[b] <= lk: batch b has only keys j < kv_len[b] (a preallocated cache;
  // the lower-right alignment is then kv_len[b] - lq); nullptr: all lk
  const std::int64_t* kv_len = nullptr;
  // added to b * hq + h in the dropout hash: a sequence of a packed variable-length batch
  // drawn as batch s of the padded batch (s * hq)
  std::int64_t dropout_bh_offset = 0;
  // Few queries (Lq <= 16, at most 64 query rows per kv head) against a long cache are split
  // into this many chunks of keys (flash-decoding, Note [decode] in kernels/attention.cpp);
  // 0: chunks of 768 keys.  Ignored by the other shapes and by the backward.
  std::int64_t num_splits = 0;
};

// Gradients of attention (kernels/attention.cpp): dq [b][hq][lq][d], and dk, dv with k's and
// v's batch (both shared by every batch, or neither), summed over the query heads of a group.
template <class T>
struct AttentionBackwardArgs {
  AttentionArgs<T> fwd;  // q, k, v, shapes, masks, causal, scale, dropout (out, lse: inputs)
  const T* grad_out;     // [b][hq][lq][dv]
  T* dq;
  T* dk;
  T* dv;
  typename AttentionArgs<T>::C* dsinks = nullptr;  // [hq], written when fwd.sinks is set
};

struct KernelTable {
#define MLMATH_KERNEL(name, params) void(*name) params;
#include "mlmath/kernels.inc"
#undef MLMATH_KERNEL
};

// The table of the selected ISA.  Selects the best supported ISA (or MLMATH_NATIVE_ISA) on the
// first call; throws std::runtime_error if MLMATH_NATIVE_ISA names an unknown or unsupported ISA.
const KernelTable& kernels();

// Force an ISA by name ("scalar", "avx2", "avx512", "neon"); throws std::invalid_argument naming
// the supported ones if the CPU/OS lacks it or it was not compiled.  Not thread-safe with running
// kernels: call it before starting work.
void select_isa(const std::string& name);
std::string selected_isa();
std::vector<std::string> supported_isas();  // compiled and runnable here, worst to best
std::vector<std::string> compiled_isas();   // compiled into this build, worst to best

// Threads used by a kernel call: set_num_threads(n) if it was called, else OpenMP's
// omp_get_max_threads() of the calling thread (OMP_NUM_THREADS, threadpoolctl), else 1;
// threadpoolctl's limit in the thread that set it (Note [threads and threadpoolctl]); 1 in a
// forked child whose parent's OpenMP threads could not be released before the fork (Note
// [fork], dispatch/threads.cpp; normally they are, and a forked child keeps its threads).
int get_num_threads();
void set_num_threads(int n);  // n >= 1; throws std::invalid_argument otherwise
bool have_openmp();
int openmp_version();  // the _OPENMP date macro (e.g. 201511), 0 without OpenMP

// Stopping long kernel calls early (Note [interrupts], dispatch/threads.cpp).  While an
// InterruptCheck lives, the kernel calls made by the thread that created it run poll(context)
// on that thread between blocks of work, at most every 50 ms (a call shorter than that never
// polls).  Once poll returns true the call skips its remaining blocks and returns early, its
// outputs partly written, and interrupted() stays true (later calls under it return at once).
// poll must not throw; it runs inside the kernel's thread team (as thread 0).
//
//     mlmath::InterruptCheck check([](void*) { return stop_requested.load(); }, nullptr);
//     mlmath::kernels().attention_f32(args);
//     if (check.interrupted()) { /* discard the outputs */ }
class InterruptCheck {
 public:
  using Poll = bool (*)(void* context);
  InterruptCheck(Poll poll, void* context);
  ~InterruptCheck();  // the thread's previous check (if any) applies again
  InterruptCheck(const InterruptCheck&) = delete;
  InterruptCheck& operator=(const InterruptCheck&) = delete;
  bool interrupted() const { return stop_.load(std::memory_order_relaxed); }

 private:
  friend bool interrupted();  // the kernels' check point (dispatch/threads.cpp)
  Poll poll_;
  void* context_;
  const void* owner_;          // names the creating thread, the only one that polls
  std::int64_t next_poll_ns_;  // steady clock; read and written by the owner only
  InterruptCheck* previous_;
  std::atomic<bool> stop_{false};
};

const char* version();
const char* compiler();

}  // namespace mlmath
