// CUDA implementations of fastalign::gather_logprobs_{fwd,bwd} (schemas in csrc/fastalign.cpp,
// semantics of csrc/cpu/logprobs.cpp): one thread block per row (token), 16-byte vector loads,
// an online log-sum-exp per thread merged across the block, and a fused backward pass.
//
// Math, for one row with logits x_j, tempered z_j = x_j / T and label y:
//   lse = log sum_j exp(z_j),   logp_y = z_y - lse,   p_j = exp(z_j - lse)
//   H   = -sum_j p_j log p_j
//
// Forward, in base 2 (one MUFU.EX2 per element). With c = log2(e) / T each logit maps to
// u_j = x_j c, and exp(z_j - z_k) = 2^(u_j - u_k). Each thread keeps, over the elements it has
// seen, the raw max M (of x, not z: the same argmax for T > 0), the shift C = fl(M c) and
//   s = sum 2^(a_j),   t = sum 2^(a_j) a_j,   a_j = fma(x_j, c, -C)
// fma gives a_j = x_j c - C rounded once, relative to the (small) result: |x| ~ 1e4 costs no
// accuracy, unlike fl(x_j c) - C. C is only a common shift, exact or not: it is corrected for
// at the end. A thread processes its elements in chunks (4 vectors = 16 to 32 elements): the
// chunk max first, then, if it raises C to C', the sums are rescaled once per chunk by
// r = 2^(C - C'):  s' = r s,  t' = r (t + (C - C') s)   (t's terms 2^a a become 2^(a + d)(a + d)).
// Threads are merged the same way (warp shuffles, then shared memory across warps).
// At the end, with m = fl(M / T) the max of z (as the CPU kernel computes it):
//   sum_j exp(x_j/T - m) = s 2^(C - M c) e^(M/T - m)
//   log_s := log(s) + ln2 (C - M c) + (M/T - m)      (both corrections exact via fma)
//   logp_y = fma(x_y, 1/T, -m) - log_s
//   H      = ln2 (log2 s - t / s) = log(s) - ln2 t / s     (H does not depend on the shift C)
// and row_stats = (m, log_s), so the backward gets log p_j = fma(x_j, 1/T, -m) - log_s.
// Zero probabilities: a_j = -inf gives 2^a = 0 and adds 0 * max(a, -FLT_MAX) = 0 to t, never
// 0 * inf. A NaN logit makes M (NaN-propagating max), s and t NaN: the row's outputs are NaN;
// +inf makes a_j = inf - inf = NaN, as log_softmax does.
//
// Accuracy of exp2 (ex2.approx, ~2 ulp): each term 2^a_j has relative error ~2^-22 plus a_j's
// own rounding, |a_j| 2^-24 (relative to a_j, thanks to the fma); terms with |a_j| > ~30 add
// less than 2^-30 of the sum. So log_s and logp are accurate to ~1e-6 absolute, well inside
// the fp32 tolerance (1e-5); the same holds for p_j in the backward, where the argument is
// (log p_j) log2(e) with log p_j <= 0.
//
// Backward (d/dz, then times 1/T):
//   d logp_y / dz_j = [j == y] - p_j,     dH / dz_j = -p_j (log p_j + H)
//   grad_x_j = (1/T) (g [j == y] - p_j (g + g_H (log p_j + H)))
//            = p_j (A + B log p_j) + [j == y] g / T,   A = -(g + g_H H) / T,  B = -g_H / T
// written in the logits' dtype, the one-hot term added in fp32 before rounding. log p_j is
// clamped at -200 in the B term: p_j = 0 there (e^-200 underflows fp32), and the clamp keeps
// A + B log p_j finite so that 0 * (...) is 0, not NaN, for any finite g_H.
// Rows with label == ignore_index, or with g = g_H = 0, get zeros without reading the logits.
//
// Labels: the Python wrapper checks the range (one reduction + sync) before calling the op;
// here, without a device sync, a label outside [0, V) reads nothing and gives NaN (logprob and
// that row's gradient).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10::cuda::getCurrentCUDAStream is at::cuda::getCurrentCUDAStream; ATen/cuda/CUDAContext.h
// would also pull in cuBLAS/cuSPARSE headers, which minimal CUDA toolkits lack.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>

#include "common.cuh"

namespace fastalign::cuda {
namespace {

// Launch shape, aimed at streaming the logits at memory bandwidth (H100: ~3.3 TB/s, i.e.
// ~25 GB/s per SM; at ~1 us load latency that needs >~25 KiB in flight per SM). A block of up
// to 256 threads per row, at most 64 registers a thread so that 4 blocks (1024 threads) share an
// SM; each thread issues kUnroll 16-byte loads before any math: 4 x 256 x 64 B = 64 KiB in
// flight per SM. Several smaller blocks rather than one large one per SM, so that one block's
// end of row (block-wide merge, exit) leaves the others streaming.
constexpr int kMaxThreads = 256;
constexpr int kMinBlocksPerSM = 4;
constexpr int kUnroll = 4;  // 16-byte vectors per thread per step
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLogpFloor = -200.f;  // see "Backward" above

// ---- the per-thread online log-sum-exp state and its merge --------------------------------------

struct Lse {
  float m;  // max of the raw logits seen (-inf: none yet, or all -inf)
  float s;  // sum 2^(a_j), a_j = x_j c - fl(m c)
  float t;  // sum 2^(a_j) a_j
};

// Rescales (s, t) from shift C to C' = C - d (d = C - C' <= 0, or NaN): s' = 2^d s,
// t' = 2^d (t + d s). An empty state (s = 0, possibly with d = -inf) stays (0, 0).
__device__ __forceinline__ void rescale(float& s, float& t, float d) {
  const float r = fast_exp2(d);
  t = (s == 0.f) ? 0.f : r * fmaf(d, s, t);
  s *= r;
}

// Adds N fp32 logits to the state: the chunk's max, one rescale if that raises the shift, then
// one exp2 per element.
// The max and the sums run as 4 interleaved chains rather than one serial chain, for
// instruction-level parallelism.
template <int N, bool kEntropy>
__device__ __forceinline__ void accumulate(Lse& st, const float* x, float c) {
  constexpr int kChains = N < 4 ? N : 4;
  float mx[kChains];
#pragma unroll
  for (int k = 0; k < kChains; ++k) mx[k] = x[k];
#pragma unroll
  for (int i = kChains; i < N; ++i) mx[i % kChains] = max_nan(mx[i % kChains], x[i]);
#pragma unroll
  for (int k = 1; k < kChains; ++k) mx[0] = max_nan(mx[0], mx[k]);
  const float m = max_nan(st.m, mx[0]);
  if (m == -kInf) return;  // only -inf so far: probability 0, nothing to add
  const float shift = m * c;
  const float old_shift = st.m * c;
  if (shift != old_shift) rescale(st.s, st.t, old_shift - shift);  // also when NaN
  st.m = m;
  float s[kChains], t[kChains];
#pragma unroll
  for (int k = 0; k < kChains; ++k) s[k] = t[k] = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float a = fmaf(x[i], c, -shift);
    const float e = fast_exp2(a);
    s[i % kChains] += e;
    if (kEntropy) t[i % kChains] = fmaf(e, fmaxf(a, -FLT_MAX), t[i % kChains]);  // a = -inf: adds 0, not NaN
  }
#pragma unroll
  for (int k = 1; k < kChains; ++k) {
    s[0] += s[k];
    t[0] += t[k];
  }
  st.s += s[0];
  if (kEntropy) st.t += t[0];
}

__device__ __forceinline__ Lse merge(Lse a, const Lse& b, float c) {
  const float m = max_nan(a.m, b.m);
  if (m == -kInf) return a;  // both empty
  const float shift = m * c;
  float bs = b.s, bt = b.t;
  if (a.m * c != shift) rescale(a.s, a.t, a.m * c - shift);
  if (b.m * c != shift) rescale(bs, bt, b.m * c - shift);
  return {m, a.s + bs, a.t + bt};
}

// Merges the states of the whole block; the result is valid in thread 0. blockDim.x is a
// multiple of 32. Ends with a barrier, so `smem` can be reused for the next row.
__device__ Lse block_merge(Lse st, float c, Lse* smem) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Lse other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
                    __shfl_xor_sync(0xffffffffu, st.t, offset)};
    st = merge(st, other, c);
  }
  const int warps = blockDim.x / 32;
  if (warps == 1) return st;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < warps ? smem[lane] : Lse{-kInf, 0.f, 0.f};
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const Lse other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
                      __shfl_xor_sync(0xffffffffu, st.t, offset)};
      st = merge(st, other, c);
    }
  }
  __syncthreads();
  return st;
}

// ---- splitting a row into 16-byte vectors -------------------------------------------------------

// A row of `vocab` elements at x: `head` elements up to the first kVec-aligned address, then
// `nvec` whole vectors, then `tail` (< kVec) elements. head + tail < 2 kVec <= 32 <= blockDim.x,
// so one scalar element per thread covers them. kVec = 1 is the plain scalar layout.
struct RowSplit {
  int64_t head, nvec, tail;
};

template <typename T, int kVec>
__device__ __forceinline__ RowSplit split_row(const T* x, int64_t vocab) {
  if (kVec == 1) return {0, vocab, 0};
  constexpr uintptr_t kBytes = sizeof(T) * kVec;
  const uintptr_t mis = reinterpret_cast<uintptr_t>(x) % kBytes;  // a multiple of sizeof(T)
  const int64_t head = std::min<int64_t>(vocab, mis ? (kBytes - mis) / sizeof(T) : 0);
  const int64_t nvec = (vocab - head) / kVec;
  return {head, nvec, vocab - head - nvec * kVec};
}

// The column of the scalar (head or tail) element handled by thread k, or -1.
__device__ __forceinline__ int64_t scalar_column(const RowSplit& sp, int64_t k, int kVec) {
  if (k < sp.head) return k;
  if (k < sp.head + sp.tail) return sp.head + sp.nvec * kVec + (k - sp.head);
  return -1;
}

// ---- forward ------------------------------------------------------------------------------------

struct FwdParams {
  const void* logits;
  int64_t row_stride;  // elements
  int64_t vocab;
  int64_t rows;
  const int64_t* labels;
  int64_t ignore_index;
  float inv_t;  // 1 / T
  float c;      // log2(e) / T
  float* logprobs;
  float* entropy;  // nullptr unless kEntropy
  float* row_stats;
};

template <typename T, int kVec, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM) logprobs_fwd_kernel(const FwdParams p) {
  __shared__ Lse smem[kMaxThreads / 32];
  constexpr int kStep = kUnroll * kVec;  // elements per thread per step
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t label = p.labels[row];
    if (label == p.ignore_index) {  // uniform across the block
      if (threadIdx.x == 0) {
        p.logprobs[row] = 0.f;
        if (kEntropy) p.entropy[row] = 0.f;
        p.row_stats[2 * row] = 0.f;
        p.row_stats[2 * row + 1] = 0.f;
      }
      continue;
    }
    const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
    // The label's logit, fetched early to hide its latency; never read out of bounds.
    float x_label = std::numeric_limits<float>::quiet_NaN();
    if (threadIdx.x == 0 && label >= 0 && label < p.vocab) load_f32<T, 1>(x + label, &x_label);

    Lse st{-kInf, 0.f, 0.f};
    const RowSplit sp = split_row<T, kVec>(x, p.vocab);
    const int64_t col = scalar_column(sp, threadIdx.x, kVec);
    if (col >= 0) {
      float v;
      load_f32<T, 1>(x + col, &v);
      accumulate<1, kEntropy>(st, &v, p.c);
    }
    // Whole steps: kUnroll vectors per thread, strided by blockDim.x vectors (coalesced); all
    // loads are issued before any math.
    const T* body = x + sp.head;
    const int64_t nthreads = blockDim.x;
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * nthreads < sp.nvec; i += kUnroll * nthreads) {
      float v[kStep];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_f32<T, kVec>(body + (i + u * nthreads) * kVec, v + u * kVec);
      accumulate<kStep, kEntropy>(st, v, p.c);
    }
    if (i < sp.nvec) {  // the last, partial step: missing vectors count as -inf (probability 0)
      float v[kStep];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u * nthreads < sp.nvec) {
          load_f32<T, kVec>(body + (i + u * nthreads) * kVec, v + u * kVec);
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) v[u * kVec + k] = -kInf;
        }
      }
      accumulate<kStep, kEntropy>(st, v, p.c);
    }

    st = block_merge(st, p.c, smem);
    if (threadIdx.x == 0) {
      const float m = st.m * p.inv_t;                 // max_j z_j
      const float shift_err = fmaf(-st.m, p.c, st.m * p.c);  // C - M c, exact
      const float max_err = fmaf(st.m, p.inv_t, -m);         // M / T - m, exact
      const float log_s_raw = logf(st.s);
      const float log_s = log_s_raw + fmaf(shift_err, kLn2, max_err);
      p.logprobs[row] = fmaf(x_label, p.inv_t, -m) - log_s;
      if (kEntropy) p.entropy[row] = log_s_raw - kLn2 * (st.t / st.s);
      p.row_stats[2 * row] = m;
      p.row_stats[2 * row + 1] = log_s;
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------

struct BwdParams {
  const void* logits;
  int64_t row_stride;  // elements; grad_logits is contiguous [rows, vocab]
  int64_t vocab;
  int64_t rows;
  const int64_t* labels;
  int64_t ignore_index;
  float inv_t;
  const float* grad_logprobs;
  const float* grad_entropy;  // nullptr: no entropy gradient
  const float* row_stats;
  const float* entropy;  // nullptr iff grad_entropy is
  void* grad_logits;
};

// The gradient of one row; kZero writes zeros without reading the logits. When kVec > 1 the
// host guarantees that x and gx have the same alignment, so they split the same way.
template <typename T, int kVec, bool kZero>
__device__ __forceinline__ void bwd_row(const T* x, T* gx, int64_t vocab, int64_t label, float m, float log_s,
                                        float a, float b, float gy, float inv_t) {
  constexpr int kStep = kUnroll * kVec;
  // grad for one logit v (without the one-hot term)
  auto grad = [&](float v) {
    const float logp = fmaf(v, inv_t, -m) - log_s;
    const float prob = fast_exp2(logp * kLog2e);
    return prob * fmaf(b, fmaxf(logp, kLogpFloor), a);
  };
  const RowSplit sp = split_row<T, kVec>(x, vocab);
  const int64_t col = scalar_column(sp, threadIdx.x, kVec);
  if (col >= 0) {
    float v = 0.f;
    if (!kZero) {
      load_f32<T, 1>(x + col, &v);
      v = grad(v) + (col == label ? gy : 0.f);
    }
    store_f32<T, 1>(gx + col, &v);
  }
  const T* body = x + sp.head;
  T* gbody = gx + sp.head;
  const int64_t nthreads = blockDim.x;
  // The vector holding the label, and the label's place in it (-1: not in the body).
  const int64_t label_vec = (label >= sp.head && label < sp.head + sp.nvec * kVec) ? (label - sp.head) / kVec : -1;
  const int label_lane = label_vec >= 0 ? static_cast<int>((label - sp.head) % kVec) : -1;
  for (int64_t i = threadIdx.x; i < sp.nvec; i += kUnroll * nthreads) {
    const bool full = i + (kUnroll - 1) * nthreads < sp.nvec;  // false only in the last step
    float v[kStep];
    if (!kZero) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (full || i + u * nthreads < sp.nvec) {
          load_f32<T, kVec>(body + (i + u * nthreads) * kVec, v + u * kVec);
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) v[u * kVec + k] = 0.f;  // not stored
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) v[u * kVec + k] = grad(v[u * kVec + k]);
        if (i + u * nthreads == label_vec) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) v[u * kVec + k] += (k == label_lane) ? gy : 0.f;
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < kStep; ++k) v[k] = 0.f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (full || i + u * nthreads < sp.nvec) store_f32<T, kVec>(gbody + (i + u * nthreads) * kVec, v + u * kVec);
    }
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM) logprobs_bwd_kernel(const BwdParams p) {
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
    T* gx = static_cast<T*>(p.grad_logits) + row * p.vocab;
    const int64_t label = p.labels[row];
    const float g = p.grad_logprobs[row];
    const float gh = p.grad_entropy ? p.grad_entropy[row] : 0.f;
    if (label == p.ignore_index || (g == 0.f && gh == 0.f)) {  // uniform across the block
      bwd_row<T, kVec, true>(x, gx, p.vocab, label, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f);
      continue;
    }
    const float m = p.row_stats[2 * row], log_s = p.row_stats[2 * row + 1];
    const float h = p.grad_entropy ? p.entropy[row] : 0.f;
    float a = -(fmaf(gh, h, g)) * p.inv_t;
    const float b = -gh * p.inv_t;
    if (label < 0 || label >= p.vocab) a = std::numeric_limits<float>::quiet_NaN();  // see top
    bwd_row<T, kVec, false>(x, gx, p.vocab, label, m, log_s, a, b, g * p.inv_t, p.inv_t);
  }
}

// ---- host side ----------------------------------------------------------------------------------

// Threads per block: enough for kUnroll vectors each over the row, a multiple of 32, <= kMaxThreads.
int block_threads(int64_t vocab, int vec) {
  const int64_t per_thread = static_cast<int64_t>(kUnroll) * vec;
  const int64_t want = (vocab + per_thread - 1) / per_thread;
  return static_cast<int>(std::clamp<int64_t>((want + 31) / 32 * 32, 32, kMaxThreads));
}

unsigned grid_blocks(int64_t rows) {
  // one block per row; the kernels loop over rows beyond the grid limit
  return static_cast<unsigned>(std::min<int64_t>(rows, std::numeric_limits<int>::max()));
}

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) <= 1, op,
              ": logits must have unit stride in the vocabulary dim, got strides ", logits.strides());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(logits.numel() == 0 || reinterpret_cast<uintptr_t>(logits.data_ptr()) % logits.element_size() == 0,
              op, ": logits data pointer is not aligned to its element size");
}

void check_labels(const at::Tensor& labels, const at::Tensor& logits, const char* op) {
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels are on ", labels.device(), " but logits on ",
              logits.device());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels must be [N] = [",
              logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64 here, got ", labels.scalar_type());
}

// A per-row float input ([N], any float dtype, same device), as contiguous fp32.
at::Tensor row_vector(const at::Tensor& t, const at::Tensor& logits, const char* op, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " is on ", t.device(), " but logits on ",
              logits.device());
  TORCH_CHECK(t.numel() == logits.size(0), op, ": ", name, " must have N = ", logits.size(0), " elements, got ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
  return t.reshape({-1}).to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels_in,
                                                                   double temperature, int64_t ignore_index,
                                                                   bool with_entropy) {
  constexpr const char* op = "gather_logprobs (cuda)";
  check_logits(logits, op);
  check_labels(labels_in, logits, op);
  checks::temperature(op, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({n}, opts);
  at::Tensor entropy = at::empty({with_entropy ? n : 0}, opts);
  at::Tensor row_stats = at::empty({n, 2}, opts);
  if (n == 0) return {logprobs, entropy, row_stats};
  TORCH_CHECK(vocab > 0, op, ": the vocabulary dim of logits is empty");

  const FwdParams params{logits.data_ptr(),
                         logits.stride(0),
                         vocab,
                         n,
                         labels.data_ptr<int64_t>(),
                         ignore_index,
                         static_cast<float>(1.0 / temperature),
                         static_cast<float>(1.4426950408889634 / temperature),
                         logprobs.data_ptr<float>(),
                         with_entropy ? entropy.data_ptr<float>() : nullptr,
                         row_stats.data_ptr<float>()};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTALIGN_DISPATCH_FLOAT_TYPES(logits.scalar_type(), op, [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int threads = block_threads(vocab, kVec);
    if (with_entropy) {
      logprobs_fwd_kernel<scalar_t, kVec, true><<<grid_blocks(n), threads, 0, stream>>>(params);
    } else {
      logprobs_fwd_kernel<scalar_t, kVec, false><<<grid_blocks(n), threads, 0, stream>>>(params);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logprobs, entropy, row_stats};
}

at::Tensor gather_logprobs_bwd(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                               const at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& row_stats_in,
                               const std::optional<at::Tensor>& entropy_in, double temperature,
                               int64_t ignore_index) {
  constexpr const char* op = "gather_logprobs_bwd (cuda)";
  check_logits(logits, op);
  check_labels(labels_in, logits, op);
  checks::temperature(op, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), vocab = logits.size(1);
  at::Tensor grad_logits = at::empty({n, vocab}, logits.options());
  if (n == 0 || vocab == 0) return grad_logits;

  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor g = row_vector(grad_logprobs, logits, op, "grad_logprobs");
  TORCH_CHECK(row_stats_in.device() == logits.device() && row_stats_in.dim() == 2 && row_stats_in.size(0) == n &&
                  row_stats_in.size(1) == 2 && row_stats_in.scalar_type() == at::kFloat,
              op, ": row_stats must be fp32 [N, 2] on the logits' device, got ", row_stats_in.scalar_type(), " ",
              row_stats_in.sizes(), " on ", row_stats_in.device());
  const at::Tensor row_stats = row_stats_in.contiguous();
  const bool use_h = grad_entropy.has_value() && grad_entropy->defined();
  at::Tensor gh, h;
  if (use_h) {
    TORCH_CHECK(entropy_in.has_value() && entropy_in->defined(), op, ": grad_entropy given without entropy");
    gh = row_vector(*grad_entropy, logits, op, "grad_entropy");
    h = row_vector(*entropy_in, logits, op, "entropy");
  }

  const BwdParams params{logits.data_ptr(),
                         logits.stride(0),
                         vocab,
                         n,
                         labels.data_ptr<int64_t>(),
                         ignore_index,
                         static_cast<float>(1.0 / temperature),
                         g.data_ptr<float>(),
                         use_h ? gh.data_ptr<float>() : nullptr,
                         row_stats.data_ptr<float>(),
                         use_h ? h.data_ptr<float>() : nullptr,
                         grad_logits.data_ptr()};
  // Vector loads and stores share one split of each row, so every row of logits and of
  // grad_logits must sit at the same offset from a 16-byte boundary; otherwise scalar code.
  const int64_t esize = logits.element_size();
  const bool same_alignment =
      (reinterpret_cast<uintptr_t>(logits.data_ptr()) - reinterpret_cast<uintptr_t>(grad_logits.data_ptr())) % 16 ==
          0 &&
      (n == 1 || ((logits.stride(0) - vocab) * esize) % 16 == 0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTALIGN_DISPATCH_FLOAT_TYPES(logits.scalar_type(), op, [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (same_alignment) {
      logprobs_bwd_kernel<scalar_t, kVec><<<grid_blocks(n), block_threads(vocab, kVec), 0, stream>>>(params);
    } else {
      logprobs_bwd_kernel<scalar_t, 1><<<grid_blocks(n), block_threads(vocab, 1), 0, stream>>>(params);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("gather_logprobs_fwd", &gather_logprobs_fwd);
  m.impl("gather_logprobs_bwd", &gather_logprobs_bwd);
}

}  // namespace fastalign::cuda
