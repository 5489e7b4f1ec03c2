// CUDA implementation of fastalign::gae_fwd: Generalized Advantage Estimation, a block per row,
// the row processed in chunks of NT * ITEMS steps from its end, each chunk by a parallel scan.
//
// Scan state after a step: (A, V) = (running advantage, value of the next valid step), (0, 0)
// after the last step. Step t is the affine map
//   f_t(A, V) = (alpha*A + beta*V + k1, eps*V + k2)
//   valid t:  alpha = gamma*lam, beta = gamma, k1 = r_t - v_t, eps = 0, k2 = v_t
//   masked t: identity (1, 0, 0, 1, 0)
// and maps of this form are closed under composition (an associative operation), so:
//   1. the chunk is staged through shared memory with coalesced loads;
//   2. each thread composes the maps of its ITEMS consecutive steps (serially, in registers);
//   3. a block-wide suffix scan (warp shuffles, then across warps) gives each thread the
//      composite of all later steps of the chunk, applied to the carry from the later chunk:
//      the exact state entering its items;
//   4. each thread replays its items with the plain recurrence, writing outputs to shared
//      memory, stored coalesced; thread 0's final state is the carry for the earlier chunk.
// fp32 state and outputs for every input dtype; masked steps output 0; 64-bit offsets.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

namespace fastalign::cuda {
namespace {

struct Map {
  float alpha, beta, k1, eps, k2;
};

__device__ __forceinline__ Map identity_map() { return {1.f, 0.f, 0.f, 1.f, 0.f}; }

// g ∘ f: f covers the later steps and is applied first.
__device__ __forceinline__ Map compose(const Map& g, const Map& f) {
  return {g.alpha * f.alpha, g.alpha * f.beta + g.beta * f.eps, g.alpha * f.k1 + g.beta * f.k2 + g.k1,
          g.eps * f.eps, g.eps * f.k2 + g.k2};
}

__device__ __forceinline__ Map shfl_down(const Map& m, int delta) {
  return {__shfl_down_sync(0xffffffffu, m.alpha, delta), __shfl_down_sync(0xffffffffu, m.beta, delta),
          __shfl_down_sync(0xffffffffu, m.k1, delta), __shfl_down_sync(0xffffffffu, m.eps, delta),
          __shfl_down_sync(0xffffffffu, m.k2, delta)};
}

// Shared-memory slot of chunk element j: one padding word per 32 keeps the per-thread strided
// accesses (thread i, item k -> j = i * ITEMS + k) free of bank conflicts.
__device__ __forceinline__ int slot(int j) { return j + (j >> 5); }

template <typename scalar_t, int NT, int ITEMS>
__global__ void __launch_bounds__(NT) gae_kernel(const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values,
                                                 const bool* __restrict__ mask, float* __restrict__ adv,
                                                 float* __restrict__ ret, int64_t steps, float gamma, float gamma_lam) {
  constexpr int CH = NT * ITEMS;
  constexpr int NW = NT / 32;
  constexpr int SLOTS = CH + CH / 32;
  __shared__ float s_a[SLOTS];  // rewards in, advantages out
  __shared__ float s_b[SLOTS];  // values in, returns out
  __shared__ bool s_m[SLOTS];
  __shared__ Map s_warp[NW];
  __shared__ float s_carry[2];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * steps;
  if (tid == 0) {
    s_carry[0] = 0.f;
    s_carry[1] = 0.f;
  }
  const int64_t n_chunks = (steps + CH - 1) / CH;
  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    const int64_t start = base + c * CH;
    const int64_t rest = steps - c * CH;
    const int len = rest < CH ? static_cast<int>(rest) : CH;
    // 1. coalesced load (elements past the row end are masked: identity maps)
    for (int j = tid; j < CH; j += NT) {
      const int p = slot(j);
      const bool valid = j < len && mask[start + j];
      s_m[p] = valid;
      s_a[p] = valid ? static_cast<float>(rewards[start + j]) : 0.f;
      s_b[p] = valid ? static_cast<float>(values[start + j]) : 0.f;
    }
    __syncthreads();

    // 2. composite of this thread's items, latest first
    Map seg = identity_map();
#pragma unroll
    for (int k = ITEMS - 1; k >= 0; --k) {
      const int p = slot(tid * ITEMS + k);
      if (s_m[p]) {
        const float v = s_b[p];
        seg = compose(Map{gamma_lam, gamma, s_a[p] - v, 0.f, v}, seg);
      }
    }
    // 3. suffix scan: incl = seg_lane ∘ seg_{lane+1} ∘ ... ∘ seg_31 within the warp
    Map incl = seg;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const Map other = shfl_down(incl, off);
      if (lane + off < 32) incl = compose(incl, other);
    }
    Map excl = shfl_down(incl, 1);  // the later lanes of this warp
    if (lane == 31) excl = identity_map();
    if (lane == 0) s_warp[warp] = incl;
    __syncthreads();
    Map later = identity_map();  // the later warps of the block
    for (int w = NW - 1; w > warp; --w) later = compose(s_warp[w], later);
    const Map in = compose(excl, later);
    const float carry_a = s_carry[0], carry_v = s_carry[1];
    float A = in.alpha * carry_a + in.beta * carry_v + in.k1;
    float V = in.eps * carry_v + in.k2;

    // 4. replay the items with the plain recurrence, outputs in place in shared memory
#pragma unroll
    for (int k = ITEMS - 1; k >= 0; --k) {
      const int p = slot(tid * ITEMS + k);
      if (s_m[p]) {
        const float v = s_b[p];
        A = (s_a[p] + gamma * V - v) + gamma_lam * A;
        V = v;
        s_a[p] = A;
        s_b[p] = A + v;
      } else {
        s_a[p] = 0.f;
        s_b[p] = 0.f;
      }
    }
    __syncthreads();  // every thread has read the carry and written its outputs
    for (int j = tid; j < len; j += NT) {
      const int p = slot(j);
      adv[start + j] = s_a[p];
      ret[start + j] = s_b[p];
    }
    if (tid == 0) {  // thread 0 holds the state at the chunk's first step
      s_carry[0] = A;
      s_carry[1] = V;
    }
    __syncthreads();  // shared memory free for the next chunk
  }
}

template <int NT, int ITEMS>
void launch(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, at::Tensor& adv,
            at::Tensor& ret, float gamma, float gamma_lam) {
  const int64_t batch = rewards.size(0), steps = rewards.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "gae_fwd_cuda", [&] {
    gae_kernel<scalar_t, NT, ITEMS><<<static_cast<unsigned int>(batch), NT, 0, stream>>>(
        rewards.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), mask.data_ptr<bool>(), adv.data_ptr<float>(),
        ret.data_ptr<float>(), steps, gamma, gamma_lam);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> gae_fwd(const at::Tensor& rewards_in, const at::Tensor& values_in,
                                           const at::Tensor& mask_in, double gamma, double lam) {
  checks::gae_args(rewards_in, values_in, mask_in, gamma, lam);
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const at::Tensor rewards = rewards_in.contiguous(), values = values_in.contiguous(), mask = mask_in.contiguous();
  const int64_t batch = rewards.size(0), steps = rewards.size(1);
  auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({batch, steps}, opts);
  at::Tensor ret = at::empty({batch, steps}, opts);
  if (batch == 0 || steps == 0) return {adv, ret};
  TORCH_CHECK(batch <= 2147483647LL, "gae: at most 2^31 - 1 rows on CUDA, got ", batch);
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  // Short rows: one warp per row (chunk 256); longer rows: wider blocks (chunks 1024 / 2048).
  if (steps <= 256) {
    launch<32, 8>(rewards, values, mask, adv, ret, g, gl);
  } else if (steps <= 1024) {
    launch<128, 8>(rewards, values, mask, adv, ret, g, gl);
  } else {
    launch<256, 8>(rewards, values, mask, adv, ret, g, gl);
  }
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) { m.impl("gae_fwd", &gae_fwd); }

}  // namespace fastalign::cuda
