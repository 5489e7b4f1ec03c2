// CUDA implementations of fastalign::ppo_policy_loss_{fwd,bwd}, fastalign::ppo_value_loss_{fwd,bwd}
// and fastalign::pg_policy_loss_{fwd,bwd} (fastalign.policy_loss's reinforce / gpg, cispo, sapo,
// gspo, geo_mean; fastalign/ops/policy_loss_fused.py).
//
// Forward, two kernels, no atomics (deterministic for a given shape):
//   1. a block per row: each thread accumulates a strided part of the row, then a fixed-order
//      block reduction (warp shuffles, then across warps) writes the row's partials
//      (loss sum, valid count, six statistic sums, one statistic max) to a [B, 9] buffer; the
//      sequence-level gspo / geo_mean first reduce the row's ratio the same way (a row pass);
//   2. one block reduces the [B, 9] buffer in a fixed order into out = (loss, stat1..6 / N, max of
//      stat7) and the per-row weights w_b = d loss / d l_bt (0 for rows without valid tokens).
// Backward: a 2-D grid (row, tile of 256 tokens) of independent tokens, g = grad_out[0] read on
// the device; gspo / geo_mean a block per row (the row pass, then its tokens).
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
constexpr int kParts = 9;  // loss, count, six statistic sums, one max (csrc/cpu/kernel_args.h)
constexpr int kMaxPart = 8;
// slots of the per-row partials (fastalign/ops/ppo.py POLICY_STATS after loss and count)
enum Part { kLoss = 0, kCount = 1, kClipped = 2, kLower = 3, kKl = 4, kClipLow = 5, kClipHigh = 6, kRatio = 7 };
enum Agg : int64_t { kTokenMean = 0, kSeqMeanTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSumNorm = 3 };

#include "ppo_math.cuh"  // tmax/tmin/tclamp, PolicyParams, ValueParams, policy_/value_{acc,grad} (in this namespace)

template <int N, int MAXK = -1>
__device__ void block_sum(float* v) {
  __shared__ float s[kThreads / 32][N];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    for (int off = 16; off > 0; off >>= 1) {
      const float other = __shfl_down_sync(0xffffffffu, v[k], off);
      v[k] = k == MAXK ? nanmax(v[k], other) : v[k] + other;
    }
    if (lane == 0) s[warp][k] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float t = s[0][k];
      for (int w = 1; w < kThreads / 32; ++w) t = k == MAXK ? nanmax(t, s[w][k]) : t + s[w][k];
      v[k] = t;
    }
  }
  __syncthreads();
}

// Reduces the block's partials and writes them as row blockIdx.x of parts.
__device__ __forceinline__ void store_parts(float* acc, float* __restrict__ parts) {
  block_sum<kParts, kMaxPart>(acc);
  if (threadIdx.x == 0) {
    const int64_t row = blockIdx.x;  // 64-bit: blockIdx.x * kParts in unsigned int wraps past 2^32 / 9 rows
#pragma unroll
    for (int k = 0; k < kParts; ++k) parts[row * kParts + k] = acc[k];
  }
}

__global__ void __launch_bounds__(kThreads) finalize_kernel(const float* __restrict__ parts, float* __restrict__ out,
                                                            float* __restrict__ row_w, int64_t batch, int64_t steps,
                                                            int64_t agg, float global_count, float horizon,
                                                            float scale) {
  // acc: n_tok, n_seq, total, st1..st6 (sums), st7 (max)
  constexpr int kAcc = 3 + kParts - 2;
  float acc[kAcc] = {};
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    const float* p = parts + b * kParts;
    const float n = p[1];
    acc[0] += n;
    acc[1] += n > 0.f ? 1.f : 0.f;
    acc[2] += agg == kSeqMeanTokenMean ? (n > 0.f ? p[0] / n : 0.f) : p[0];
#pragma unroll
    for (int k = 2; k < kParts; ++k) acc[1 + k] = k == kMaxPart ? nanmax(acc[1 + k], p[k]) : acc[1 + k] + p[k];
  }
  block_sum<kAcc, 1 + kMaxPart>(acc);
  __shared__ float s_norm;
  if (threadIdx.x == 0) {
    const float count = global_count >= 0.f ? global_count : (agg == kTokenMean ? acc[0] : acc[1]);
    const float h = agg == kSeqMeanTokenSumNorm ? (horizon > 0.f ? horizon : fmaxf(static_cast<float>(steps), 1.f)) : 1.f;
    const float norm = count > 0.f ? scale / count / h : 0.f;
    const float inv_n = acc[0] > 0.f ? 1.f / acc[0] : 0.f;
    out[0] = acc[2] * norm;
#pragma unroll
    for (int k = 2; k < kParts; ++k) out[k - 1] = k == kMaxPart ? acc[1 + k] : acc[1 + k] * inv_n;
    s_norm = norm;
  }
  __syncthreads();
  const float norm = s_norm;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    const float n = parts[b * kParts + 1];
    row_w[b] = n > 0.f ? (agg == kSeqMeanTokenMean ? norm / n : norm) : 0.f;
  }
}

// ---- fastalign.policy_loss's other fused types: PgKind, PgParams, pg_row, pg_token_* -------------
#include "pg_policy_math.cuh"  // (uses the helpers above: inside this anonymous namespace on purpose)

// ---- the row kernels of every loss ----------------------------------------------------------------

enum LossKind : int { kValue = 0, kPolicy = 1, kPg = 2 };
struct LossParams {
  PolicyParams pp;
  ValueParams vp;
  PgParams gp;
};

// A block per row: the row's partials (its row pass first for gspo / geo_mean).
template <typename scalar_t, int LOSS>
__global__ void __launch_bounds__(kThreads) fwd_rows_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                                            const scalar_t* __restrict__ z, const bool* __restrict__ mask,
                                                            float* __restrict__ parts, int64_t steps, LossParams lp) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * steps;
  [[maybe_unused]] PgRow r{1.f, 1.f, 0.f, 0.f, false};
  if constexpr (LOSS == kPg) r = pg_row(x, y, z, mask, base, steps, lp.gp);
  float acc[kParts] = {};
  for (int64_t t = threadIdx.x; t < steps; t += kThreads) {
    const int64_t i = base + t;
    if (!mask[i]) continue;
    const float xi = static_cast<float>(x[i]), yi = static_cast<float>(y[i]), zi = static_cast<float>(z[i]);
    if constexpr (LOSS == kPolicy) {
      policy_acc(xi, yi, zi, lp.pp, acc);
    } else if constexpr (LOSS == kValue) {
      value_acc(xi, yi, zi, lp.vp, acc);
    } else {
      pg_acc(xi, yi, zi, lp.gp, r, acc);
    }
  }
  store_parts(acc, parts);
}

// gx = g w_b d(row loss)/dx over a (row, tile) grid, each block striding over its row's tiles:
// grid (B, tiles) for the per-token losses, (B, 1) for gspo / geo_mean (the block sweeps its
// row: the row pass, gspo's sum of d l / d s, then the tokens).
template <typename scalar_t, int LOSS>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const float* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                                       const scalar_t* __restrict__ y, const scalar_t* __restrict__ z,
                                                       const bool* __restrict__ mask, const float* __restrict__ row_w,
                                                       scalar_t* __restrict__ gx, int64_t steps, LossParams lp) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * steps;
  const float gb = grad_out[0] * row_w[blockIdx.x];
  [[maybe_unused]] PgRow r{1.f, 1.f, 0.f, 0.f, false};
  if constexpr (LOSS == kPg) {
    r = pg_row(x, y, z, mask, base, steps, lp.gp);
    if (lp.gp.kind == kPgGspo) {  // S = sum_t d l_t / d s over the row's valid tokens
      float sum[1] = {0.f};
      for (int64_t t = threadIdx.x; t < steps; t += kThreads) {
        const int64_t i = base + t;
        if (mask[i]) sum[0] += clip_grad(r.s, static_cast<float>(z[i]), lp.gp.a, lp.gp.b, 1.f);
      }
      block_sum<1>(sum);
      __shared__ float s_sum;
      if (threadIdx.x == 0) s_sum = sum[0];
      __syncthreads();
      r.coef = r.open ? ((gb * s_sum) * r.s) / r.n : 0.f;
    } else if (lp.gp.kind == kPgGeoMean) {
      r.coef = gb * r.lrow;
    }
  }
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kThreads;
  for (int64_t t = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; t < steps; t += stride) {
    const int64_t i = base + t;
    float g = 0.f;
    if (mask[i]) {
      const float xi = static_cast<float>(x[i]), yi = static_cast<float>(y[i]), zi = static_cast<float>(z[i]);
      if constexpr (LOSS == kPolicy) {
        g = policy_grad(xi, yi, zi, lp.pp, gb);
      } else if constexpr (LOSS == kValue) {
        g = value_grad(xi, yi, zi, lp.vp, gb);
      } else {
        g = pg_grad(xi, yi, zi, lp.gp, r, gb);
      }
    }
    gx[i] = static_cast<scalar_t>(g);
  }
}

// The shared checks plus what the CUDA kernels add: inputs on a CUDA device, grid-sized row counts.
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mask,
                  int64_t agg = 0) {
  checks::ppo_inputs(op, x, y, z, mask, agg);
  TORCH_CHECK(x.is_cuda(), op, ": inputs must be on a CUDA device");
  TORCH_CHECK(x.size(0) <= 2147483647, op, ": too many rows");
}

template <int LOSS>
std::tuple<at::Tensor, at::Tensor> fwd_impl(const char* op, const at::Tensor& x_in, const at::Tensor& y_in,
                                            const at::Tensor& z_in, const at::Tensor& mask_in, LossParams lp,
                                            int64_t agg, double global_count, double horizon, float scale) {
  check_inputs(op, x_in, y_in, z_in, mask_in, agg);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), z = z_in.contiguous(), mask = mask_in.contiguous();
  const int64_t batch = x.size(0), steps = x.size(1);
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty({kParts - 1}, opts);
  at::Tensor row_w = at::empty({batch}, opts);
  at::Tensor parts = at::zeros({batch, kParts}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (batch > 0 && steps > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ppo_loss_fwd_cuda", [&] {
      fwd_rows_kernel<scalar_t, LOSS><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), mask.data_ptr<bool>(),
          parts.data_ptr<float>(), steps, lp);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finalize_kernel<<<1, kThreads, 0, stream>>>(parts.data_ptr<float>(), out.data_ptr<float>(), row_w.data_ptr<float>(),
                                              batch, steps, agg, static_cast<float>(global_count),
                                              static_cast<float>(horizon), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, row_w};
}

template <int LOSS>
at::Tensor bwd_impl(const char* op, const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& y_in,
                    const at::Tensor& z_in, const at::Tensor& mask_in, const at::Tensor& row_w_in, LossParams lp) {
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
  // gspo / geo_mean: a block per row (bwd_kernel)
  const bool per_row = LOSS == kPg && (lp.gp.kind == kPgGspo || lp.gp.kind == kPgGeoMean);
  const dim3 grid(static_cast<unsigned>(batch), per_row ? 1u : static_cast<unsigned>(tiles));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ppo_loss_bwd_cuda", [&] {
    bwd_kernel<scalar_t, LOSS><<<grid, kThreads, 0, stream>>>(
        g.data_ptr<float>(), x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
        mask.data_ptr<bool>(), row_w.data_ptr<float>(), grad.data_ptr<scalar_t>(), steps, lp);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

LossParams policy_params(double clip_lo, double clip_hi, double dual_clip) {
  LossParams lp{};
  lp.pp = {static_cast<float>(clip_lo), static_cast<float>(clip_hi), static_cast<float>(dual_clip), dual_clip > 0};
  return lp;
}

LossParams value_params(double clip) {
  LossParams lp{};
  lp.vp = ValueParams{static_cast<float>(clip)};
  return lp;
}

LossParams pg_params(const char* op, int64_t kind, double a, double b) {
  checks::pg_params(op, kind, a, b);
  LossParams lp{};
  lp.gp = PgParams{static_cast<int>(kind), static_cast<float>(a), static_cast<float>(b)};
  return lp;
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd(const at::Tensor& lp, const at::Tensor& old, const at::Tensor& adv,
                                                       const at::Tensor& mask, double clip_lo, double clip_hi,
                                                       double dual_clip, int64_t agg, double global_count,
                                                       double horizon) {
  checks::policy_params("ppo_policy_loss", clip_lo, clip_hi, dual_clip);
  checks::agg_args("ppo_policy_loss", global_count, horizon);
  return fwd_impl<kPolicy>("ppo_policy_loss", lp, old, adv, mask, policy_params(clip_lo, clip_hi, dual_clip), agg,
                           global_count, horizon, 1.f);
}

at::Tensor ppo_policy_loss_bwd(const at::Tensor& grad_out, const at::Tensor& lp, const at::Tensor& old,
                               const at::Tensor& adv, const at::Tensor& mask, const at::Tensor& row_w, double clip_lo,
                               double clip_hi, double dual_clip) {
  checks::policy_params("ppo_policy_loss_bwd", clip_lo, clip_hi, dual_clip);
  return bwd_impl<kPolicy>("ppo_policy_loss_bwd", grad_out, lp, old, adv, mask, row_w,
                           policy_params(clip_lo, clip_hi, dual_clip));
}

std::tuple<at::Tensor, at::Tensor> pg_policy_loss_fwd(const at::Tensor& lp, const at::Tensor& old, const at::Tensor& adv,
                                                      const at::Tensor& mask, int64_t kind, double a, double b,
                                                      int64_t agg, double global_count, double horizon) {
  checks::agg_args("pg_policy_loss", global_count, horizon);
  return fwd_impl<kPg>("pg_policy_loss", lp, old, adv, mask, pg_params("pg_policy_loss", kind, a, b), agg,
                       global_count, horizon, 1.f);
}

at::Tensor pg_policy_loss_bwd(const at::Tensor& grad_out, const at::Tensor& lp, const at::Tensor& old,
                              const at::Tensor& adv, const at::Tensor& mask, const at::Tensor& row_w, int64_t kind,
                              double a, double b) {
  return bwd_impl<kPg>("pg_policy_loss_bwd", grad_out, lp, old, adv, mask, row_w,
                       pg_params("pg_policy_loss_bwd", kind, a, b));
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd(const at::Tensor& v, const at::Tensor& old, const at::Tensor& ret,
                                                      const at::Tensor& mask, double clip, int64_t agg,
                                                      double global_count, double horizon) {
  checks::value_clip("ppo_value_loss", clip);
  checks::agg_args("ppo_value_loss", global_count, horizon);
  // loss = 0.5 * agg(...): the 0.5 rides on the row weights
  return fwd_impl<kValue>("ppo_value_loss", v, old, ret, mask, value_params(clip), agg, global_count, horizon, 0.5f);
}

at::Tensor ppo_value_loss_bwd(const at::Tensor& grad_out, const at::Tensor& v, const at::Tensor& old,
                              const at::Tensor& ret, const at::Tensor& mask, const at::Tensor& row_w, double clip) {
  checks::value_clip("ppo_value_loss_bwd", clip);
  return bwd_impl<kValue>("ppo_value_loss_bwd", grad_out, v, old, ret, mask, row_w, value_params(clip));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd);
  m.impl("pg_policy_loss_fwd", &pg_policy_loss_fwd);
  m.impl("pg_policy_loss_bwd", &pg_policy_loss_bwd);
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &ppo_value_loss_bwd);
}

}  // namespace fastalign::cuda
