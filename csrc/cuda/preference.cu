// CUDA implementation of the preference ops (see csrc/cpu/preference.cpp for the math):
//   sequence_logps_fwd/bwd  a block per row: strided masked sum, block reduction
//   dpo_loss_fwd/bwd        a thread per pair
//   dpo_tokens_fwd          a block per pair: the four masked row sums, then the pair loss
//   dpo_tokens_bwd          a block per row: the row's scalar gradient broadcast to its valid tokens
// (the general ops dpo_multi* are in dpo_multi.cu; shared helpers in preference_common.cuh)
// logsig(x) = min(x, 0) - log1p(exp(-|x|)) (finite for any finite x); fp32 math and outputs,
// token gradients in the input dtype; 64-bit offsets.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

#include <cmath>

#include "common.cuh"
#include "preference_common.cuh"

namespace fastalign::cuda {
namespace {

using namespace dpo;  // NOLINT: the shared pair math and row reductions

template <typename T>
__global__ void __launch_bounds__(kThreads)
    seq_fwd_kernel(const T* x, const bool* m, float* out, int64_t steps, bool mean) {
  __shared__ float scratch[kThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * steps;
  const float s = row_sum(x + base, m + base, steps, mean, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    seq_bwd_kernel(const float* grad, const bool* m, T* gx, int64_t steps, bool mean) {
  __shared__ float scratch[kThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * steps;
  write_row_grad(gx + base, m + base, steps, grad[blockIdx.x], mean, scratch);
}

template <typename T>
__global__ void dpo_fwd_kernel(const T* c, const T* r, const T* rc, const T* rr, float* loss, float* cw, float* rw,
                               int64_t n, PairParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float dc = to_f32(c[i]) - to_f32(rc[i]), dr = to_f32(r[i]) - to_f32(rr[i]);
  loss[i] = pair_loss(dc - dr, p);
  cw[i] = p.beta * dc;
  rw[i] = p.beta * dr;
}

template <typename T>
__global__ void dpo_bwd_kernel(const float* go, const T* c, const T* r, const T* rc, const T* rr, float* g, int64_t n,
                               PairParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float dc = to_f32(c[i]) - to_f32(rc[i]), dr = to_f32(r[i]) - to_f32(rr[i]);
  g[i] = go[i] * pair_grad(dc - dr, p);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) tok_fwd_kernel(const T* pol, const T* ref, const bool* m, float* loss,
                                                           float* cw, float* rw, float* pseq, float* rseq,
                                                           int64_t pairs, int64_t steps, bool mean, PairParams p) {
  __shared__ float scratch[kThreads / 32];
  const int64_t i = blockIdx.x;
  const int64_t bc = i * steps, br = (i + pairs) * steps;
  const float pc = row_sum(pol + bc, m + bc, steps, mean, scratch);
  const float qc = row_sum(ref + bc, m + bc, steps, mean, scratch);
  const float pr = row_sum(pol + br, m + br, steps, mean, scratch);
  const float qr = row_sum(ref + br, m + br, steps, mean, scratch);
  if (threadIdx.x == 0) {
    pseq[i] = pc;
    pseq[i + pairs] = pr;
    rseq[i] = qc;
    rseq[i + pairs] = qr;
    const float dc = pc - qc, dr = pr - qr;
    loss[i] = pair_loss(dc - dr, p);
    cw[i] = p.beta * dc;
    rw[i] = p.beta * dr;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) tok_bwd_kernel(const float* go, const float* gs, const float* pseq,
                                                           const float* rseq, const bool* m, T* gx, int64_t pairs,
                                                           int64_t steps, bool mean, PairParams p) {
  __shared__ float scratch[kThreads / 32];
  const int64_t j = blockIdx.x;
  const int64_t i = j < pairs ? j : j - pairs;
  const float delta = (pseq[i] - rseq[i]) - (pseq[i + pairs] - rseq[i + pairs]);
  const float g = go[i] * pair_grad(delta, p);
  float s = j < pairs ? g : -g;
  if (gs != nullptr) s += gs[j];
  write_row_grad(gx + j * steps, m + j * steps, steps, s, mean, scratch);
}

// ---- host side ----------------------------------------------------------------------------------

at::Tensor sequence_logps_fwd(const at::Tensor& x_in, const at::Tensor& mask_in, bool mean) {
  check_rows("sequence_logps", x_in, mask_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), mask = mask_in.contiguous();
  const int64_t rows = x.size(0), steps = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTALIGN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "sequence_logps", [&] {
    seq_fwd_kernel<scalar_t><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        cptr<scalar_t>(x), mask.const_data_ptr<bool>(), out.mutable_data_ptr<float>(), steps, mean);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sequence_logps_bwd(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& mask_in, bool mean) {
  check_rows("sequence_logps", x, mask_in);
  checks::sequence_logps_grad(grad_in, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), mask = mask_in.contiguous();
  const int64_t rows = x.size(0), steps = x.size(1);
  at::Tensor gx = at::empty({rows, steps}, x.options());
  if (rows == 0 || steps == 0) return gx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTALIGN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "sequence_logps", [&] {
    seq_bwd_kernel<scalar_t><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        grad.const_data_ptr<float>(), mask.const_data_ptr<bool>(), mptr<scalar_t>(gx), steps, mean);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_fwd(const at::Tensor& c_in, const at::Tensor& r_in,
                                                            const at::Tensor& rc_in, const at::Tensor& rr_in,
                                                            double beta, int64_t type, double eps) {
  checks::dpo_pairs(c_in, r_in, rc_in, rr_in);
  checks::dpo_loss_args("dpo_loss", beta, type, eps);
  const c10::cuda::CUDAGuard guard(c_in.device());
  const at::Tensor c = c_in.contiguous(), r = r_in.contiguous(), rc = rc_in.contiguous(), rr = rr_in.contiguous();
  const int64_t n = c.size(0);
  auto opts = c.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, opts), cw = at::empty({n}, opts), rw = at::empty({n}, opts);
  if (n == 0) return {loss, cw, rw};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const PairParams p = make_params(beta, type, eps);
  FASTALIGN_DISPATCH_FLOAT_TYPES(c.scalar_type(), "dpo_loss", [&] {
    dpo_fwd_kernel<scalar_t><<<pair_blocks(n), kThreads, 0, stream>>>(
        cptr<scalar_t>(c), cptr<scalar_t>(r), cptr<scalar_t>(rc), cptr<scalar_t>(rr), loss.mutable_data_ptr<float>(),
        cw.mutable_data_ptr<float>(), rw.mutable_data_ptr<float>(), n, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, cw, rw};
}

at::Tensor dpo_loss_bwd(const at::Tensor& grad_in, const at::Tensor& c_in, const at::Tensor& r_in,
                        const at::Tensor& rc_in, const at::Tensor& rr_in, double beta, int64_t type, double eps) {
  checks::dpo_pairs(c_in, r_in, rc_in, rr_in);
  checks::dpo_loss_args("dpo_loss", beta, type, eps);
  checks::dpo_loss_grad(grad_in, c_in);
  const c10::cuda::CUDAGuard guard(c_in.device());
  const at::Tensor c = c_in.contiguous(), r = r_in.contiguous(), rc = rc_in.contiguous(), rr = rr_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const int64_t n = c.size(0);
  at::Tensor g = at::empty({n}, c.options().dtype(at::kFloat));
  if (n == 0) return g;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const PairParams p = make_params(beta, type, eps);
  FASTALIGN_DISPATCH_FLOAT_TYPES(c.scalar_type(), "dpo_loss", [&] {
    dpo_bwd_kernel<scalar_t><<<pair_blocks(n), kThreads, 0, stream>>>(
        grad.const_data_ptr<float>(), cptr<scalar_t>(c), cptr<scalar_t>(r), cptr<scalar_t>(rc), cptr<scalar_t>(rr),
        g.mutable_data_ptr<float>(), n, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_tokens_fwd(
    const at::Tensor& pol_in, const at::Tensor& ref_in, const at::Tensor& mask_in, double beta, int64_t type,
    double eps, bool mean) {
  checks::dpo_tokens_fwd_args(pol_in, ref_in, mask_in, beta, type, eps);
  check_rows("dpo_loss_from_tokens", pol_in, mask_in);  // the CUDA row limit
  const c10::cuda::CUDAGuard guard(pol_in.device());
  const at::Tensor pol = pol_in.contiguous(), ref = ref_in.contiguous(), mask = mask_in.contiguous();
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  auto opts = pol.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({pairs}, opts), cw = at::empty({pairs}, opts), rw = at::empty({pairs}, opts);
  at::Tensor pseq = at::empty({rows}, opts), rseq = at::empty({rows}, opts);
  if (pairs == 0) return {loss, cw, rw, pseq, rseq};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const PairParams p = make_params(beta, type, eps);
  FASTALIGN_DISPATCH_FLOAT_TYPES(pol.scalar_type(), "dpo_loss_from_tokens", [&] {
    tok_fwd_kernel<scalar_t><<<static_cast<unsigned int>(pairs), kThreads, 0, stream>>>(
        cptr<scalar_t>(pol), cptr<scalar_t>(ref), mask.const_data_ptr<bool>(), loss.mutable_data_ptr<float>(),
        cw.mutable_data_ptr<float>(), rw.mutable_data_ptr<float>(), pseq.mutable_data_ptr<float>(),
        rseq.mutable_data_ptr<float>(), pairs, steps, mean, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, cw, rw, pseq, rseq};
}

at::Tensor dpo_tokens_bwd(const at::Tensor& grad_in, const c10::optional<at::Tensor>& grad_seq_in,
                          const at::Tensor& pseq_in, const at::Tensor& rseq_in, const at::Tensor& pol,
                          const at::Tensor& mask_in, double beta, int64_t type, double eps, bool mean) {
  checks::dpo_tokens_bwd_args(grad_in, grad_seq_in, pseq_in, rseq_in, pol, mask_in, beta, type, eps);
  check_rows("dpo_loss_from_tokens", pol, mask_in);  // the CUDA row limit
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  const c10::cuda::CUDAGuard guard(pol.device());
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), mask = mask_in.contiguous();
  const at::Tensor pseq = pseq_in.to(at::kFloat).contiguous(), rseq = rseq_in.to(at::kFloat).contiguous();
  at::Tensor gseq;
  if (grad_seq_in.has_value()) {
    gseq = grad_seq_in->to(at::kFloat).contiguous();
  }
  at::Tensor gx = at::empty({rows, steps}, pol.options());
  if (rows == 0 || steps == 0) return gx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const PairParams p = make_params(beta, type, eps);
  FASTALIGN_DISPATCH_FLOAT_TYPES(pol.scalar_type(), "dpo_loss_from_tokens", [&] {
    tok_bwd_kernel<scalar_t><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        grad.const_data_ptr<float>(), gseq.defined() ? gseq.const_data_ptr<float>() : nullptr,
        pseq.const_data_ptr<float>(), rseq.const_data_ptr<float>(), mask.const_data_ptr<bool>(), mptr<scalar_t>(gx),
        pairs, steps, mean, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("sequence_logps_fwd", &sequence_logps_fwd);
  m.impl("sequence_logps_bwd", &sequence_logps_bwd);
  m.impl("dpo_loss_fwd", &dpo_loss_fwd);
  m.impl("dpo_loss_bwd", &dpo_loss_bwd);
  m.impl("dpo_tokens_fwd", &dpo_tokens_fwd);
  m.impl("dpo_tokens_bwd", &dpo_tokens_bwd);
}

}  // namespace fastalign::cuda
