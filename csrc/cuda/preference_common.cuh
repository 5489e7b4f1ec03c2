// Shared by the CUDA preference ops (preference.cu) and the general DPO ops (dpo_multi.cu): the
// per-pair math of the original four loss types, the block reductions over a row, and host helpers.
// See csrc/cpu/preference.cpp for the formulas.
#pragma once
#include <ATen/ATen.h>

#include "../checks.h"
#include "common.cuh"

#include <cmath>

namespace fastalign::cuda::dpo {

constexpr int kThreads = 256;

struct PairParams {
  float beta, eps, half_inv_beta, robust_scale;
  int type;
};

inline PairParams make_params(double beta, int64_t type, double eps) {
  return {static_cast<float>(beta), static_cast<float>(eps), static_cast<float>(1.0 / (2.0 * beta)),
          static_cast<float>(1.0 / (1.0 - 2.0 * eps)), static_cast<int>(type)};
}

__device__ __forceinline__ float log_sigmoid(float x) { return fminf(x, 0.f) - log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

__device__ __forceinline__ float pair_loss(float delta, const PairParams& p) {
  const float x = p.beta * delta;
  switch (p.type) {
    case 0:
      return -(1.f - p.eps) * log_sigmoid(x) - p.eps * log_sigmoid(-x);
    case 1: {
      const float d = delta - p.half_inv_beta;
      return d * d;
    }
    case 2: {
      const float h = 1.f - x;
      return (h > 0.f || isnan(h)) ? h : 0.f;
    }
    default:
      return (-(1.f - p.eps) * log_sigmoid(x) + p.eps * log_sigmoid(-x)) * p.robust_scale;
  }
}

__device__ __forceinline__ float pair_grad(float delta, const PairParams& p) {
  const float x = p.beta * delta;
  switch (p.type) {
    case 0:
      return p.beta * (-(1.f - p.eps) * sigmoid(-x) + p.eps * sigmoid(x));
    case 1:
      return 2.f * (delta - p.half_inv_beta);
    case 2:
      return (1.f - x > 0.f || isnan(x)) ? -p.beta : 0.f;
    default:
      return p.beta * (-(1.f - p.eps) * sigmoid(-x) - p.eps * sigmoid(x)) * p.robust_scale;
  }
}

// Sum of v over the block (kThreads threads); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch free from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) s += scratch[w];
  return s;
}

// Masked sum (or mean, count >= 1) of one row, by the whole block.
template <typename T>
__device__ float row_sum(const T* __restrict__ x, const bool* __restrict__ m, int64_t steps, bool mean,
                         float* scratch) {
  float acc = 0.f, cnt = 0.f;
  for (int64_t t = threadIdx.x; t < steps; t += kThreads) {
    if (m[t]) {
      acc += to_f32(x[t]);
      cnt += 1.f;
    }
  }
  const float s = block_sum(acc, scratch);
  if (!mean) return s;
  const float n = block_sum(cnt, scratch);  // exact in fp32 up to 2^24 valid tokens per row
  return s / fmaxf(n, 1.f);
}

template <typename T>
__device__ void write_row_grad(T* __restrict__ g, const bool* __restrict__ m, int64_t steps, float gr, bool mean,
                               float* scratch) {
  if (mean) {
    float cnt = 0.f;
    for (int64_t t = threadIdx.x; t < steps; t += kThreads) cnt += m[t] ? 1.f : 0.f;
    gr = gr / fmaxf(block_sum(cnt, scratch), 1.f);
  }
  const T v = from_f32<T>(gr), zero = from_f32<T>(0.f);
  for (int64_t t = threadIdx.x; t < steps; t += kThreads) g[t] = m[t] ? v : zero;
}


// The shared checks plus the CUDA grid limit on rows.
inline void check_rows(const char* op, const at::Tensor& x, const at::Tensor& mask) {
  checks::token_rows(op, x, mask);
  TORCH_CHECK(x.size(0) <= 2147483647LL, op, ": at most 2^31 - 1 rows on CUDA, got ", x.size(0));
}

template <typename T>
inline const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
inline T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

inline unsigned int pair_blocks(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

}  // namespace fastalign::cuda::dpo
