// CUDA kernels of the reference-free paired losses (ORPO, CPO, SimPO); the math and its
// derivatives are in csrc/cpu/ref_free.cpp.
//   ref_free_tokens_fwd  a block per pair: the masked sums and valid counts of its two rows (one
//                        strided pass each, block reductions), then the pair's loss and metrics
//   ref_free_tokens_bwd  a block per row: the row's scalar gradient (from the saved row stats)
//                        broadcast to its valid tokens
// fp32 math and outputs, token gradients in the input dtype; 64-bit offsets. expm1f/log1pf are
// CUDA's (1-2 ulp), so log1mexp keeps its accuracy at both ends as on the CPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ref_free_checks.h"

#include <cmath>

#include "common.cuh"

namespace fastalign::cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kOddsFloor = 5.9604644775390625e-08f;  // 2^-24
constexpr float kLn2f = 0.6931471805599453f;

struct Params {
  float beta, gamma, alpha, eps, half_inv_beta;
  int kind;  // 0 orpo, 1 sigmoid, 2 hinge, 3 ipo
};

Params make_params(double beta, int64_t kind, double gamma, double alpha, double eps) {
  return {static_cast<float>(beta), static_cast<float>(gamma), static_cast<float>(alpha), static_cast<float>(eps),
          static_cast<float>(1.0 / (2.0 * beta)), static_cast<int>(kind)};
}

__device__ __forceinline__ float log_sigmoid(float x) { return fminf(x, 0.f) - log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}
__device__ __forceinline__ float log1mexp(float y) { return y < -kLn2f ? log1pf(-expf(y)) : logf(-expm1f(y)); }
__device__ __forceinline__ float odds_floor(float y) { return y > -kOddsFloor ? -kOddsFloor : y; }

__device__ __forceinline__ float pair_logits(float c, float r, const Params& p) {
  switch (p.kind) {
    case 0: {
      const float cf = odds_floor(c), rf = odds_floor(r);
      return (cf - rf) - (log1mexp(cf) - log1mexp(rf));
    }
    case 1:
      return p.beta * (c - r) - p.gamma;
    case 2:
      return p.beta * (c - r);
    default:
      return c - r;
  }
}

__device__ __forceinline__ float pair_loss(float z, const Params& p) {
  switch (p.kind) {
    case 0:
      return -p.beta * log_sigmoid(z);
    case 1:
      return -(1.f - p.eps) * log_sigmoid(z) - p.eps * log_sigmoid(-z);
    case 2: {
      const float h = 1.f - z;
      return (h > 0.f || isnan(h)) ? h : 0.f;
    }
    default: {
      const float d = z - p.half_inv_beta;
      return d * d;
    }
  }
}

__device__ __forceinline__ void pair_grads(float c, float r, const Params& p, float& gc, float& gr) {
  const float z = pair_logits(c, r, p);
  if (p.kind == 0) {
    const float s = p.beta * sigmoid(-z);
    gc = s / expm1f(odds_floor(c));
    gr = -s / expm1f(odds_floor(r));
    return;
  }
  if (p.kind == 1) {
    gc = p.beta * (-(1.f - p.eps) * sigmoid(-z) + p.eps * sigmoid(z));
  } else if (p.kind == 2) {
    gc = (1.f - z > 0.f || isnan(z)) ? -p.beta : 0.f;
  } else {
    gc = 2.f * (z - p.half_inv_beta);
  }
  gr = -gc;
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

// (masked sum, valid count) of one row, by the whole block. Counts are exact in fp32 up to 2^24
// valid tokens per row.
template <typename T>
__device__ void row_sum_count(const T* __restrict__ x, const bool* __restrict__ m, int64_t steps, float* scratch,
                              float& sum, float& count) {
  float acc = 0.f, cnt = 0.f;
  for (int64_t t = threadIdx.x; t < steps; t += kThreads) {
    if (m[t]) {
      acc += to_f32(x[t]);
      cnt += 1.f;
    }
  }
  sum = block_sum(acc, scratch);
  count = block_sum(cnt, scratch);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const T* x, const bool* m, float* loss, float* cw, float* rw, float* nll, float* logits, float* stats,
               int64_t pairs, int64_t steps, bool mean, Params p) {
  __shared__ float scratch[kThreads / 32];
  const int64_t i = blockIdx.x;
  const int64_t bc = i * steps, br = (i + pairs) * steps;
  float sc, kc, sr, kr;
  row_sum_count(x + bc, m + bc, steps, scratch, sc, kc);
  row_sum_count(x + br, m + br, steps, scratch, sr, kr);
  if (threadIdx.x != 0) return;
  const float nc = fmaxf(kc, 1.f), nr = fmaxf(kr, 1.f);
  const float c = mean ? sc / nc : sc, r = mean ? sr / nr : sr;
  const float z = pair_logits(c, r, p);
  const float n_ll = -(sc / nc);
  loss[i] = pair_loss(z, p) + p.alpha * n_ll;
  cw[i] = p.beta * c;
  rw[i] = p.beta * r;
  nll[i] = n_ll;
  logits[i] = z;
  stats[i] = c;
  stats[i + pairs] = r;
  stats[2 * pairs + i] = kc;
  stats[3 * pairs + i] = kr;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const float* go, const float* stats, const bool* m, T* gx,
                                                       int64_t pairs, int64_t steps, bool mean, Params p) {
  const int64_t j = blockIdx.x;
  const bool chosen = j < pairs;
  const int64_t i = chosen ? j : j - pairs;
  float gc, gr;
  pair_grads(stats[i], stats[i + pairs], p, gc, gr);
  const float nc = fmaxf(stats[2 * pairs + i], 1.f), nr = fmaxf(stats[3 * pairs + i], 1.f);
  const float ac = mean ? gc / nc : gc, ar = mean ? gr / nr : gr;
  const float v = chosen ? go[i] * (ac - p.alpha / nc) : go[i] * ar;
  const T tv = from_f32<T>(v), zero = from_f32<T>(0.f);
  T* g = gx + j * steps;
  const bool* mr = m + j * steps;
  for (int64_t t = threadIdx.x; t < steps; t += kThreads) g[t] = mr[t] ? tv : zero;
}

// ---- host side ----------------------------------------------------------------------------------

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

void check_grid(const at::Tensor& pol) {
  TORCH_CHECK(pol.size(0) <= 2147483647LL, "ref_free_tokens: at most 2^31 - 1 rows on CUDA, got ", pol.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ref_free_tokens_fwd(
    const at::Tensor& pol_in, const at::Tensor& mask_in, int64_t kind, double beta, double gamma, double alpha,
    double eps, bool mean) {
  checks::ref_free_fwd_args(pol_in, mask_in, beta, kind, gamma, alpha, eps);
  check_grid(pol_in);
  const c10::cuda::CUDAGuard guard(pol_in.device());
  const at::Tensor pol = pol_in.contiguous(), mask = mask_in.contiguous();
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  auto opts = pol.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({pairs}, opts), cw = at::empty({pairs}, opts), rw = at::empty({pairs}, opts);
  at::Tensor nll = at::empty({pairs}, opts), logits = at::empty({pairs}, opts), stats = at::empty({2, rows}, opts);
  if (pairs == 0) return {loss, cw, rw, nll, logits, stats};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Params p = make_params(beta, kind, gamma, alpha, eps);
  FASTALIGN_DISPATCH_FLOAT_TYPES(pol.scalar_type(), "ref_free_tokens", [&] {
    fwd_kernel<scalar_t><<<static_cast<unsigned int>(pairs), kThreads, 0, stream>>>(
        cptr<scalar_t>(pol), mask.const_data_ptr<bool>(), loss.mutable_data_ptr<float>(), cw.mutable_data_ptr<float>(),
        rw.mutable_data_ptr<float>(), nll.mutable_data_ptr<float>(), logits.mutable_data_ptr<float>(),
        stats.mutable_data_ptr<float>(), pairs, steps, mean, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, cw, rw, nll, logits, stats};
}

at::Tensor ref_free_tokens_bwd(const at::Tensor& grad_in, const at::Tensor& stats_in, const at::Tensor& pol,
                               const at::Tensor& mask_in, int64_t kind, double beta, double gamma, double alpha,
                               double eps, bool mean) {
  checks::ref_free_bwd_args(grad_in, stats_in, pol, mask_in, beta, kind, gamma, alpha, eps);
  check_grid(pol);
  const c10::cuda::CUDAGuard guard(pol.device());
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), stats = stats_in.to(at::kFloat).contiguous();
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor gx = at::empty({rows, steps}, pol.options());
  if (rows == 0 || steps == 0) return gx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Params p = make_params(beta, kind, gamma, alpha, eps);
  FASTALIGN_DISPATCH_FLOAT_TYPES(pol.scalar_type(), "ref_free_tokens", [&] {
    bwd_kernel<scalar_t><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        grad.const_data_ptr<float>(), stats.const_data_ptr<float>(), mask.const_data_ptr<bool>(), mptr<scalar_t>(gx),
        pairs, steps, mean, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("ref_free_tokens_fwd", &ref_free_tokens_fwd);
  m.impl("ref_free_tokens_bwd", &ref_free_tokens_bwd);
}

}  // namespace fastalign::cuda
