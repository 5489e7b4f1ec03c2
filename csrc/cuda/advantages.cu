// CUDA implementation of fastalign::outcome_advantage_fwd and fastalign::return_advantage_fwd
// (contracts and formulas: fastalign/ops/advantage_ops.py; the CPU version: csrc/cpu/advantages.cpp).
// Forward only: advantages take no gradient. Deterministic: no atomics; every sum has a fixed order.
//
// outcome_advantage_fwd:
//   row_kernel    a block per row: score s_i = sum_k r_ik and response length |y_i| (block sums);
//   group_kernel  a thread per group bucket: its members, in batch order (a stable at::sort of the
//                 group ids on the device), reduced serially -- the same order as the CPU kernel's
//                 serial pass, so the group statistics match it term for term;
//   fill_kernel   adv[i, t] = A_i * m_it, grid-stride over B x T.
//   reinforce_plus_plus_baseline's batch whitening of the tiled entries is the |y_i|-weighted
//   mean / variance of the B advantages: O(B) ATen reductions on the device (deterministic).
// return_advantage_fwd:
//   scan_kernel   a warp per row, the row in chunks of 32 * kItems steps from its end: each lane
//                 composes the affine maps R_t = a_t R_{t+1} + b_t of its kItems steps
//                 (reinforce_plus_plus: a_t = gamma m_{t+1}, b_t = r_t; remax: a_t = 1,
//                 b_t = r_t m_t), a warp suffix scan (shuffles) gives each lane the map of all later
//                 steps of the chunk, applied to the carry from the later chunk; the lane replays its
//                 steps with the plain recurrence. Writes the returns and, for remax, the
//                 advantages; for reinforce_plus_plus each row's sum of valid returns (warp sum);
//   sqdev_kernel  a warp per row: sum over the valid steps of (R - mean)^2;
//   whiten_kernel adv = ((R - mean) * scale) * m, grid-stride; mean and scale from O(B) ATen sums.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../checks.h"

namespace fastalign::cuda {
namespace {

constexpr int kRowThreads = 128;
constexpr int kItems = 8;
constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// sum over the block (kRowThreads threads), the result in every thread; a fixed tree
__device__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kRowThreads / 32; ++w) total += shared[w];
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) row_kernel(const T* __restrict__ rewards, const bool* __restrict__ mask,
                                                          float* __restrict__ score, float* __restrict__ length,
                                                          int64_t width, int64_t steps, bool need_len) {
  __shared__ float shared[kRowThreads / 32];
  const int64_t row = blockIdx.x;
  float s = 0.f;
  for (int64_t k = threadIdx.x; k < width; k += kRowThreads) s += static_cast<float>(rewards[row * width + k]);
  s = block_sum(s, shared);
  if (threadIdx.x == 0) score[row] = s;
  if (need_len) {
    float c = 0.f;  // exact: counts below 2^24
    for (int64_t t = threadIdx.x; t < steps; t += kRowThreads) c += mask[row * steps + t] ? 1.f : 0.f;
    c = block_sum(c, shared);
    if (threadIdx.x == 0) length[row] = c;
  }
}

// One thread per group bucket g: members order[start[g] .. start[g] + count[g]) in batch order.
__global__ void group_kernel(const float* __restrict__ s, const float* __restrict__ len,
                             const int64_t* __restrict__ order, const int64_t* __restrict__ start,
                             const int64_t* __restrict__ count, float* __restrict__ a, int64_t groups, int kind,
                             float eps, bool norm) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const int64_t n = count[g];
  if (n == 0) return;
  const int64_t* mem = order + start[g];
  const float neg_inf = -__int_as_float(0x7f800000);
  float sum = 0.f, total = 0.f, weighted = 0.f, best = neg_inf, second = neg_inf;
  int64_t winner = -1;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = mem[j];
    const float x = s[i];
    sum += x;
    if (kind == 2) {
      total += len[i];
      weighted += __fmul_rn(len[i], x);
    }
    if (x > best) {  // passk: the first maximum in batch order; a tie lands in second
      second = best;
      best = x;
      winner = i;
    } else if (x > second) {
      second = x;
    }
  }
  const float nf = static_cast<float>(n);
  const float mean = sum / nf;
  float sq = 0.f;
  if (kind == 0 || kind == 3)
    for (int64_t j = 0; j < n; ++j) {
      const float d = s[mem[j]] - mean;
      sq = __fadd_rn(sq, __fmul_rn(d, d));
    }
  const float sd = sqrtf(sq / (nf - 1.f));  // NaN (0 / 0) for a group of one, as on the CPU
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = mem[j];
    const float x = s[i];
    float v;
    switch (kind) {
      case 0:  // grpo; a group of one: mean 0, std 1 (verl)
        v = n < 2 ? (norm ? x / (1.f + eps) : x) : (norm ? (x - mean) / (sd + eps) : x - mean);
        break;
      case 1:  // rloo
        v = n > 1 ? (x - mean) * (nf / (nf - 1.f)) : x;
        break;
      case 2:  // opo
        v = n > 1 && total > 0.f ? x - weighted / total : x;
        break;
      case 3: {  // grpo_passk
        const float gap = best - second;
        v = i == winner ? (norm ? gap / (sd + eps) : gap) : 0.f;
        break;
      }
      default:  // reinforce_plus_plus_baseline, before the batch whitening
        v = n > 1 ? x - mean : x;
    }
    a[i] = v;
  }
}

__global__ void fill_kernel(const float* __restrict__ a, const bool* __restrict__ mask, float* __restrict__ out,
                            int64_t total, int64_t steps) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = a[i / steps] * (mask[i] ? 1.f : 0.f);
}

unsigned int grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535LL * 32));
}

at::Tensor outcome_advantage_fwd(const at::Tensor& rewards_in, const at::Tensor& mask_in, const at::Tensor& group_in,
                                 int64_t kind, double epsilon, bool norm) {
  checks::outcome_advantage_args(rewards_in, mask_in, group_in, kind, epsilon);
  const c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor rewards = rewards_in.contiguous(), mask = mask_in.contiguous(), group = group_in.contiguous();
  const int64_t batch = mask.size(0), steps = mask.size(1), width = rewards.size(1);
  auto fopts = mask.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({batch, steps}, fopts);
  if (batch == 0) return adv;
  TORCH_CHECK(batch <= 2147483647LL, "outcome_advantage: at most 2^31 - 1 rows on CUDA, got ", batch);
  // ids outside [0, B) (the caller's contract: dense ids) reach no bucket; their rows stay NaN
  at::Tensor score = at::empty({batch}, fopts), length = at::zeros({batch}, fopts);
  at::Tensor a = at::full({batch}, std::numeric_limits<float>::quiet_NaN(), fopts);
  const at::Tensor order = std::get<1>(at::sort(group, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = at::bincount(group.clamp(0, batch - 1), {}, batch).narrow(0, 0, batch);
  const at::Tensor starts = at::cumsum(counts, 0) - counts;
  const at::Tensor valid_counts = at::where((group.min() >= 0) & (group.max() < batch), counts, at::zeros_like(counts));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool need_len = kind == 2 || kind == 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "outcome_advantage_cuda", [&] {
    row_kernel<scalar_t><<<static_cast<unsigned int>(batch), kRowThreads, 0, stream>>>(
        rewards.data_ptr<scalar_t>(), mask.data_ptr<bool>(), score.data_ptr<float>(), length.data_ptr<float>(), width,
        steps, need_len);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  group_kernel<<<grid_for(batch, 128), 128, 0, stream>>>(
      score.data_ptr<float>(), length.data_ptr<float>(), order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
      valid_counts.data_ptr<int64_t>(), a.data_ptr<float>(), batch, static_cast<int>(kind),
      static_cast<float>(epsilon), norm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (kind == 4) {  // masked_whiten of the tiled entries, from the B row values
    const at::Tensor valid = length > 0;
    const at::Tensor n = length.sum();
    const at::Tensor zero = at::zeros({}, fopts);
    const at::Tensor mu = at::where(valid, length * a, zero).sum() / n.clamp_min(1);
    const at::Tensor d = a - mu;
    const at::Tensor var = at::where(valid, length * (d * d), zero).sum() / (n - 1).clamp_min(1);
    const at::Tensor scale = at::where(n >= 2, at::rsqrt(var + 1e-8), at::ones_like(var));
    a = d * scale;
  }
  if (steps > 0) {
    fill_kernel<<<grid_for(batch * steps, 256), 256, 0, stream>>>(a.data_ptr<float>(), mask.data_ptr<bool>(),
                                                                  adv.data_ptr<float>(), batch * steps, steps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return adv;
}

// ---- return_advantage -------------------------------------------------------------------------------

struct Affine {
  float a, b;  // R = a * R_later + b
};

// g ∘ f: f covers the later steps and is applied first
__device__ __forceinline__ Affine compose(const Affine& g, const Affine& f) { return {g.a * f.a, g.a * f.b + g.b}; }

template <typename T, bool kRemax>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    scan_kernel(const T* __restrict__ rewards, const bool* __restrict__ mask, const float* __restrict__ base,
                float* __restrict__ ret, float* __restrict__ adv, float* __restrict__ row_sum, int64_t batch,
                int64_t steps, float gamma) {
  constexpr int CH = 32 * kItems;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= batch) return;  // a whole warp leaves together
  const int64_t off = row * steps;
  const float bl = kRemax ? base[row] : 0.f;
  float carry = 0.f, acc = 0.f;
  for (int64_t c0 = ((steps - 1) / CH) * CH; c0 >= 0; c0 -= CH) {
    Affine step[kItems];
    float mv[kItems];
    Affine seg{1.f, 0.f};
#pragma unroll
    for (int k = kItems - 1; k >= 0; --k) {
      const int64_t t = c0 + lane * kItems + k;
      if (t < steps) {
        const float r = static_cast<float>(rewards[off + t]);
        mv[k] = mask[off + t] ? 1.f : 0.f;
        if (kRemax) {
          step[k] = {1.f, r * mv[k]};
        } else {
          const float next = t + 1 < steps && mask[off + t + 1] ? 1.f : 0.f;
          step[k] = {gamma * next, r};
        }
      } else {
        step[k] = {1.f, 0.f};  // past the row end: the identity
        mv[k] = 0.f;
      }
      seg = compose(step[k], seg);
    }
    // suffix scan over lanes: incl = seg_lane ∘ seg_{lane+1} ∘ ... ∘ seg_31
    Affine incl = seg;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const Affine other{__shfl_down_sync(0xffffffffu, incl.a, d), __shfl_down_sync(0xffffffffu, incl.b, d)};
      if (lane + d < 32) incl = compose(incl, other);
    }
    Affine later{__shfl_down_sync(0xffffffffu, incl.a, 1), __shfl_down_sync(0xffffffffu, incl.b, 1)};
    if (lane == 31) later = {1.f, 0.f};
    float x = later.a * carry + later.b;  // R at the step after this lane's last
#pragma unroll
    for (int k = kItems - 1; k >= 0; --k) {
      const int64_t t = c0 + lane * kItems + k;
      if (t < steps) {
        x = step[k].a * x + step[k].b;
        ret[off + t] = x;
        if (kRemax)
          adv[off + t] = x - bl * mv[k];
        else
          acc += mv[k] != 0.f ? x : 0.f;
      }
    }
    carry = __shfl_sync(0xffffffffu, x, 0);  // R at the chunk's first step
  }
  if (!kRemax) {
    acc = warp_sum(acc);
    if (lane == 0) row_sum[row] = acc;
  }
}

__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    sqdev_kernel(const float* __restrict__ ret, const bool* __restrict__ mask, const float* __restrict__ mean,
                 float* __restrict__ out, int64_t batch, int64_t steps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= batch) return;
  const float mu = *mean;
  float acc = 0.f;
  for (int64_t t = lane; t < steps; t += 32) {
    const float d = ret[row * steps + t] - mu;
    acc += mask[row * steps + t] ? d * d : 0.f;
  }
  acc = warp_sum(acc);
  if (lane == 0) out[row] = acc;
}

__global__ void whiten_kernel(const float* __restrict__ ret, const bool* __restrict__ mask,
                              const float* __restrict__ stats, float* __restrict__ adv, int64_t total) {
  const float mu = stats[0], scale = stats[1];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    adv[i] = ((ret[i] - mu) * scale) * (mask[i] ? 1.f : 0.f);
}

std::tuple<at::Tensor, at::Tensor> return_advantage_fwd(const at::Tensor& rewards_in, const at::Tensor& mask_in,
                                                        const std::optional<at::Tensor>& baselines_in, double gamma,
                                                        int64_t kind) {
  checks::return_advantage_args(rewards_in, mask_in, baselines_in, gamma, kind);
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const at::Tensor rewards = rewards_in.contiguous(), mask = mask_in.contiguous();
  const int64_t batch = rewards.size(0), steps = rewards.size(1);
  auto fopts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({batch, steps}, fopts), ret = at::empty({batch, steps}, fopts);
  if (batch == 0 || steps == 0) return {adv, ret};
  const bool remax = kind == 1;
  const at::Tensor base = remax ? baselines_in->contiguous() : at::Tensor();
  at::Tensor row_sum = at::empty({batch}, fopts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int blocks = static_cast<unsigned int>((batch + kWarpsPerBlock - 1) / kWarpsPerBlock);
  TORCH_CHECK(batch <= 2147483647LL, "return_advantage: at most 2^31 - 1 rows on CUDA, got ", batch);
  const float g = static_cast<float>(gamma);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "return_advantage_cuda", [&] {
    if (remax)
      scan_kernel<scalar_t, true><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
          rewards.data_ptr<scalar_t>(), mask.data_ptr<bool>(), base.data_ptr<float>(), ret.data_ptr<float>(),
          adv.data_ptr<float>(), row_sum.data_ptr<float>(), batch, steps, g);
    else
      scan_kernel<scalar_t, false><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
          rewards.data_ptr<scalar_t>(), mask.data_ptr<bool>(), nullptr, ret.data_ptr<float>(), adv.data_ptr<float>(),
          row_sum.data_ptr<float>(), batch, steps, g);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (remax) return {adv, ret};
  // masked_whiten of the returns; fewer than 2 valid entries: scale 1 (mean 0 when none)
  const at::Tensor count = mask.sum().to(at::kFloat);
  const at::Tensor mean = (row_sum.sum() / count.clamp_min(1)).reshape({1});
  at::Tensor row_sq = at::empty({batch}, fopts);
  sqdev_kernel<<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(ret.data_ptr<float>(), mask.data_ptr<bool>(),
                                                           mean.data_ptr<float>(), row_sq.data_ptr<float>(), batch,
                                                           steps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor var = row_sq.sum() / (count - 1).clamp_min(1);
  const at::Tensor scale = at::where(count >= 2, at::rsqrt(var + 1e-8), at::ones_like(var));
  const at::Tensor stats = at::cat({mean, scale.reshape({1})}).contiguous();
  whiten_kernel<<<grid_for(batch * steps, 256), 256, 0, stream>>>(ret.data_ptr<float>(), mask.data_ptr<bool>(),
                                                                  stats.data_ptr<float>(), adv.data_ptr<float>(),
                                                                  batch * steps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("outcome_advantage_fwd", &outcome_advantage_fwd);
  m.impl("return_advantage_fwd", &return_advantage_fwd);
}

}  // namespace fastalign::cuda
