// CUDA implementation of fastalign::gather_logprobs_bwd; shared launch shape, math summary and
// row splitting in logprobs.cuh.
//
// Backward (d/dz, then times 1/T):
//   d logp_y / dz_j = [j == y] - p_j,     dH / dz_j = -p_j (log p_j + H)
//   grad_x_j = (1/T) (g [j == y] - p_j (g + g_H (log p_j + H)))
//            = p_j (A + B log p_j) + [j == y] g / T,   A = -(g + g_H H) / T,  B = -g_H / T
// written in the logits' dtype, the one-hot term added in fp32 before rounding. log p_j is
// clamped at -200 in the B term: p_j = 0 there (e^-200 underflows fp32), and the clamp keeps
// A + B log p_j finite so that 0 * (...) is 0, not NaN, for any finite g_H.
// Rows with label == ignore_index, or with g = g_H = 0, get zeros without reading the logits.
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

at::Tensor gather_logprobs_bwd(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                               const at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& row_stats_in,
                               const std::optional<at::Tensor>& entropy_in, double temperature,
                               int64_t ignore_index) {
  constexpr const char* op = "gather_logprobs_bwd";
  checks::logits_labels(op, logits, labels_in, temperature);
  device_logits(op, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), vocab = logits.size(1);
  at::Tensor grad_logits = at::empty({n, vocab}, logits.options());
  if (n == 0 || vocab == 0) return grad_logits;

  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor g = checks::row_vector(op, "grad_logprobs", grad_logprobs, logits);
  checks::row_stats(op, row_stats_in, logits);
  const at::Tensor row_stats = row_stats_in.contiguous();
  const bool use_h = checks::entropy_grad(op, grad_entropy, entropy_in);
  at::Tensor gh, h;
  if (use_h) {
    gh = checks::row_vector(op, "grad_entropy", *grad_entropy, logits);
    h = checks::row_vector(op, "entropy", *entropy_in, logits);
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

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) { m.impl("gather_logprobs_bwd", &gather_logprobs_bwd); }

}  // namespace fastalign::cuda
