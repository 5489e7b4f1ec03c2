// CUDA implementations of fastalign::ppo_policy_loss_{fwd,bwd} and fastalign::ppo_value_loss_{fwd,bwd}.
//
// Forward, two kernels, no atomics (deterministic for a given shape):
//   1. a block per row: each thread accumulates a strided part of the row, then a fixed-order
//      block reduction (warp shuffles, then across warps) writes the row's partials
//      (loss sum, valid count, three statistic sums) to a [B, 5] buffer;
//   2. one block reduces the [B, 5] buffer in a fixed order into out = (loss, stat1/N, stat2/N,
//      stat3/N) and the per-row weights w_b = d loss / d l_bt (0 for rows without valid tokens).
// Backward: a 2-D grid (row, tile of 256 tokens) of independent tokens, g = grad_out[0] read on the device.
// The per-token math is csrc/cpu/ppo.cpp's, op for op: torch's NaN-propagating max/min/clamp,
// autograd's half shares at ties and inclusive clamp bounds, so the gradient is the reference's.
// All math in fp32; 64-bit offsets.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

namespace fastalign::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kParts = 5;
enum Agg : int64_t { kTokenMean = 0, kSeqMeanTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSumNorm = 3 };

__device__ __forceinline__ float tmax(float a, float b) { return (a >= b || a != a) ? a : b; }
__device__ __forceinline__ float tmin(float a, float b) { return (a <= b || a != a) ? a : b; }
__device__ __forceinline__ float tclamp(float x, float lo, float hi) { return tmin(tmax(x, lo), hi); }
__device__ __forceinline__ bool inside(float x, float lo, float hi) { return x >= lo && x <= hi; }
__device__ __forceinline__ float max_share(float s, float o) { return s < o ? 0.f : (s == o ? 0.5f : 1.f); }
__device__ __forceinline__ float min_share(float s, float o) { return s > o ? 0.f : (s == o ? 0.5f : 1.f); }

struct PolicyParams {
  float lo, hi, dual;
  bool use_dual;
};
struct ValueParams {
  float clip;  // <= 0: off
};

// Accumulates one valid token into the five partial sums (loss, count, stat1..3).
__device__ __forceinline__ void policy_acc(float x, float o, float a, const PolicyParams& p, float* acc) {
  const float ratio = expf(tclamp(x - o, -20.f, 20.f));
  const float na = -a;
  const float l1 = na * ratio, l2 = na * tclamp(ratio, p.lo, p.hi);
  float m = tmax(l1, l2);
  if (p.use_dual && a < 0.f) {
    const float l3 = na * p.dual;
    acc[3] += m > l3 ? 1.f : 0.f;
    m = tmin(m, l3);
  }
  acc[0] += m;
  acc[1] += 1.f;
  acc[2] += l2 > l1 ? 1.f : 0.f;
  acc[4] += o - x;
}

__device__ __forceinline__ float policy_grad(float x, float o, float a, const PolicyParams& p, float g) {
  const float d = x - o;
  const float ratio = expf(tclamp(d, -20.f, 20.f));
  const float na = -a;
  const float l1 = na * ratio, l2 = na * tclamp(ratio, p.lo, p.hi);
  float gm = g;
  if (p.use_dual && a < 0.f) gm *= min_share(tmax(l1, l2), na * p.dual);
  float gr = na * (gm * max_share(l1, l2));
  if (inside(ratio, p.lo, p.hi)) gr += na * (gm * max_share(l2, l1));
  return inside(d, -20.f, 20.f) ? gr * ratio : 0.f;
}

__device__ __forceinline__ void value_acc(float v, float vo, float r, const ValueParams& p, float* acc) {
  const float e1 = v - r;
  const float s1 = e1 * e1;
  float m = s1;
  if (p.clip > 0.f) {
    const float e2 = tclamp(v, vo - p.clip, vo + p.clip) - r;
    const float s2 = e2 * e2;
    acc[2] += s2 > s1 ? 1.f : 0.f;
    m = tmax(s1, s2);
  }
  acc[0] += m;
  acc[1] += 1.f;
  acc[3] += v;
  acc[4] += s1;
}

__device__ __forceinline__ float value_grad(float v, float vo, float r, const ValueParams& p, float g) {
  const float e1 = v - r;
  if (p.clip <= 0.f) return g * 2.f * e1;
  const float lo = vo - p.clip, hi = vo + p.clip;
  const float e2 = tclamp(v, lo, hi) - r;
  const float s1 = e1 * e1, s2 = e2 * e2;
  float gv = g * max_share(s1, s2) * 2.f * e1;
  if (inside(v, lo, hi)) gv += g * max_share(s2, s1) * 2.f * e2;
  return gv;
}

// Fixed-order sum of N values over the block (kThreads threads); the result is in thread 0.
template <int N>
__device__ void block_sum(float* v) {
  __shared__ float s[kThreads / 32][N];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
    if (lane == 0) s[warp][k] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float t = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) t += s[w][k];
      v[k] = t;
    }
  }
  __syncthreads();
}

template <typename scalar_t, bool POLICY>
__global__ void __launch_bounds__(kThreads) fwd_rows_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                                            const scalar_t* __restrict__ z, const bool* __restrict__ mask,
                                                            float* __restrict__ parts, int64_t steps, PolicyParams pp,
                                                            ValueParams vp) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * steps;
  float acc[kParts] = {0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t t = threadIdx.x; t < steps; t += kThreads) {
    const int64_t i = base + t;
    if (!mask[i]) continue;
    if constexpr (POLICY) {
      policy_acc(static_cast<float>(x[i]), static_cast<float>(y[i]), static_cast<float>(z[i]), pp, acc);
    } else {
      value_acc(static_cast<float>(x[i]), static_cast<float>(y[i]), static_cast<float>(z[i]), vp, acc);
    }
  }
  block_sum<kParts>(acc);
  if (threadIdx.x == 0) {
    const int64_t row = blockIdx.x;  // 64-bit: blockIdx.x * kParts in unsigned int wraps past 2^32 / 5 rows
#pragma unroll
    for (int k = 0; k < kParts; ++k) parts[row * kParts + k] = acc[k];
  }
}

__global__ void __launch_bounds__(kThreads) finalize_kernel(const float* __restrict__ parts, float* __restrict__ out,
                                                            float* __restrict__ row_w, int64_t batch, int64_t steps,
                                                            int64_t agg, float global_count, float horizon,
                                                            float scale) {
  // acc: n_tok, n_seq, total, st1, st2, st3
  float acc[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    const float* p = parts + b * kParts;
    const float n = p[1];
    acc[0] += n;
    acc[1] += n > 0.f ? 1.f : 0.f;
    acc[2] += agg == kSeqMeanTokenMean ? (n > 0.f ? p[0] / n : 0.f) : p[0];
    acc[3] += p[2];
    acc[4] += p[3];
    acc[5] += p[4];
  }
  block_sum<6>(acc);
  __shared__ float s_norm;
  if (threadIdx.x == 0) {
    const float count = global_count >= 0.f ? global_count : (agg == kTokenMean ? acc[0] : acc[1]);
    const float h = agg == kSeqMeanTokenSumNorm ? (horizon > 0.f ? horizon : fmaxf(static_cast<float>(steps), 1.f)) : 1.f;
    const float norm = count > 0.f ? scale / count / h : 0.f;
    const float inv_n = acc[0] > 0.f ? 1.f / acc[0] : 0.f;
    out[0] = acc[2] * norm;
    out[1] = acc[3] * inv_n;
    out[2] = acc[4] * inv_n;
    out[3] = acc[5] * inv_n;
    s_norm = norm;
  }
  __syncthreads();
  const float norm = s_norm;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    const float n = parts[b * kParts + 1];
    row_w[b] = n > 0.f ? (agg == kSeqMeanTokenMean ? norm / n : norm) : 0.f;
  }
}

template <typename scalar_t, bool POLICY>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const float* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                                       const scalar_t* __restrict__ y, const scalar_t* __restrict__ z,
                                                       const bool* __restrict__ mask, const float* __restrict__ row_w,
                                                       scalar_t* __restrict__ gx, int64_t steps, PolicyParams pp,
                                                       ValueParams vp) {
  const int64_t t = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (t >= steps) return;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * steps + t;
  float g = 0.f;
  if (mask[i]) {
    const float gb = grad_out[0] * row_w[blockIdx.x];
    const float xi = static_cast<float>(x[i]), yi = static_cast<float>(y[i]), zi = static_cast<float>(z[i]);
    if constexpr (POLICY) {
      g = policy_grad(xi, yi, zi, pp, gb);
    } else {
      g = value_grad(xi, yi, zi, vp, gb);
    }
  }
  gx[i] = static_cast<scalar_t>(g);
}

// The shared checks plus what the CUDA kernels add: inputs on a CUDA device, grid-sized row counts.
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mask,
                  int64_t agg = 0) {
  checks::ppo_inputs(op, x, y, z, mask, agg);
  TORCH_CHECK(x.is_cuda(), op, ": inputs must be on a CUDA device");
  TORCH_CHECK(x.size(0) <= 2147483647, op, ": too many rows");
}

template <bool POLICY>
std::tuple<at::Tensor, at::Tensor> fwd_impl(const char* op, const at::Tensor& x_in, const at::Tensor& y_in,
                                            const at::Tensor& z_in, const at::Tensor& mask_in, PolicyParams pp,
                                            ValueParams vp, int64_t agg, double global_count, double horizon,
                                            float scale) {
  check_inputs(op, x_in, y_in, z_in, mask_in, agg);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), z = z_in.contiguous(), mask = mask_in.contiguous();
  const int64_t batch = x.size(0), steps = x.size(1);
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty({4}, opts);
  at::Tensor row_w = at::empty({batch}, opts);
  at::Tensor parts = at::zeros({batch, kParts}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (batch > 0 && steps > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ppo_loss_fwd_cuda", [&] {
      fwd_rows_kernel<scalar_t, POLICY><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), mask.data_ptr<bool>(),
          parts.data_ptr<float>(), steps, pp, vp);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finalize_kernel<<<1, kThreads, 0, stream>>>(parts.data_ptr<float>(), out.data_ptr<float>(), row_w.data_ptr<float>(),
                                              batch, steps, agg, static_cast<float>(global_count),
                                              static_cast<float>(horizon), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, row_w};
}

template <bool POLICY>
at::Tensor bwd_impl(const char* op, const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& y_in,
                    const at::Tensor& z_in, const at::Tensor& mask_in, const at::Tensor& row_w_in, PolicyParams pp,
                    ValueParams vp) {
  check_inputs(op, x_in, y_in, z_in, mask_in);
  // (.to(kFloat) keeps the device: a CPU row_w would hand the kernel a host pointer)
  checks::ppo_bwd_args(op, grad_out, x_in, row_w_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), z = z_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor row_w = row_w_in.to(at::kFloat).contiguous();
  const at::Tensor g = grad_out.to(at::kFloat).contiguous();
  const int64_t batch = x.size(0), steps = x.size(1);
  at::Tensor grad = at::empty({batch, steps}, x.options());
  if (grad.numel() == 0) return grad;
  const int64_t tiles = (steps + kThreads - 1) / kThreads;
  TORCH_CHECK(tiles <= 65535, op, ": the CUDA backward supports rows of at most ", 65535 * kThreads, " tokens, got ", steps);
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(tiles));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ppo_loss_bwd_cuda", [&] {
    bwd_kernel<scalar_t, POLICY><<<grid, kThreads, 0, stream>>>(
        g.data_ptr<float>(), x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
        mask.data_ptr<bool>(), row_w.data_ptr<float>(), grad.data_ptr<scalar_t>(), steps, pp, vp);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

PolicyParams policy_params(double clip_lo, double clip_hi, double dual_clip) {
  return {static_cast<float>(clip_lo), static_cast<float>(clip_hi), static_cast<float>(dual_clip), dual_clip > 0};
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd(const at::Tensor& lp, const at::Tensor& old, const at::Tensor& adv,
                                                       const at::Tensor& mask, double clip_lo, double clip_hi,
                                                       double dual_clip, int64_t agg, double global_count,
                                                       double horizon) {
  checks::policy_params("ppo_policy_loss", clip_lo, clip_hi, dual_clip);
  checks::agg_args("ppo_policy_loss", global_count, horizon);
  return fwd_impl<true>("ppo_policy_loss", lp, old, adv, mask, policy_params(clip_lo, clip_hi, dual_clip),
                        ValueParams{-1.f}, agg, global_count, horizon, 1.f);
}

at::Tensor ppo_policy_loss_bwd(const at::Tensor& grad_out, const at::Tensor& lp, const at::Tensor& old,
                               const at::Tensor& adv, const at::Tensor& mask, const at::Tensor& row_w, double clip_lo,
                               double clip_hi, double dual_clip) {
  checks::policy_params("ppo_policy_loss_bwd", clip_lo, clip_hi, dual_clip);
  return bwd_impl<true>("ppo_policy_loss_bwd", grad_out, lp, old, adv, mask, row_w,
                        policy_params(clip_lo, clip_hi, dual_clip), ValueParams{-1.f});
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd(const at::Tensor& v, const at::Tensor& old, const at::Tensor& ret,
                                                      const at::Tensor& mask, double clip, int64_t agg,
                                                      double global_count, double horizon) {
  checks::value_clip("ppo_value_loss", clip);
  checks::agg_args("ppo_value_loss", global_count, horizon);
  // loss = 0.5 * agg(...): the 0.5 rides on the row weights
  return fwd_impl<false>("ppo_value_loss", v, old, ret, mask, PolicyParams{0.f, 0.f, 0.f, false},
                         ValueParams{static_cast<float>(clip)}, agg, global_count, horizon, 0.5f);
}

at::Tensor ppo_value_loss_bwd(const at::Tensor& grad_out, const at::Tensor& v, const at::Tensor& old,
                              const at::Tensor& ret, const at::Tensor& mask, const at::Tensor& row_w, double clip) {
  checks::value_clip("ppo_value_loss_bwd", clip);
  return bwd_impl<false>("ppo_value_loss_bwd", grad_out, v, old, ret, mask, row_w, PolicyParams{0.f, 0.f, 0.f, false},
                         ValueParams{static_cast<float>(clip)});
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd);
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &ppo_value_loss_bwd);
}

}  // namespace fastalign::cuda
