// CUDA implementation of fastalign::gather_logprobs_fwd; shared launch shape, math summary and
// row splitting in logprobs.cuh.
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
#include "logprobs.cuh"

namespace fastalign::cuda {
namespace {
using namespace logprobs;

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

// ---- host side ----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels_in,
                                                                   double temperature, int64_t ignore_index,
                                                                   bool with_entropy) {
  constexpr const char* op = "gather_logprobs";
  checks::logits_labels(op, logits, labels_in, temperature);
  device_logits(op, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({n}, opts);
  at::Tensor entropy = at::empty({with_entropy ? n : 0}, opts);
  at::Tensor row_stats = at::empty({n, 2}, opts);
  checks::vocab_nonempty(op, logits);
  if (n == 0) return {logprobs, entropy, row_stats};

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

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) { m.impl("gather_logprobs_fwd", &gather_logprobs_fwd); }

}  // namespace fastalign::cuda
