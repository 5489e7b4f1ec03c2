// CUDA implementation of the general DPO ops (fastalign/ops/dpo_multi.py; the math in
// csrc/cpu/dpo_multi.cpp): dpo_multi_fwd/bwd a thread per pair, dpo_multi_tokens_fwd a block per
// pair (four masked row sums, then the pair terms), dpo_multi_tokens_bwd a block per row.
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

// ---- the general op (dpo_multi*): see csrc/cpu/dpo_multi.cpp (pair_terms) for the math ---------
constexpr int kMaxTypes = 16;
constexpr float kExpClamp = 80.f;

struct MultiParams {
  PairParams base;
  float exo_lpw, exo_lpl, tau, am1;
  int fdiv, n;
  int types[kMaxTypes];
  float weights[kMaxTypes];
};

MultiParams make_multi(double beta, at::IntArrayRef types, at::ArrayRef<double> weights, double eps, int64_t fdiv,
                       double f_alpha, double tau) {
  MultiParams m{};
  m.base = make_params(beta, 0, eps);
  m.exo_lpw = eps > 0.0 ? static_cast<float>(std::log1p(-eps)) : 0.f;
  m.exo_lpl = eps > 0.0 ? static_cast<float>(std::log(eps)) : 0.f;
  m.tau = static_cast<float>(tau);
  m.am1 = fdiv == 3 ? static_cast<float>(f_alpha - 1.0) : 1.f;
  m.fdiv = static_cast<int>(fdiv);
  m.n = static_cast<int>(types.size());
  for (int k = 0; k < m.n; ++k) {
    m.types[k] = static_cast<int>(types[k]);
    m.weights[k] = static_cast<float>(weights[k]);
  }
  return m;
}

__device__ __forceinline__ float sig_prod(float x) {
  const float e = expf(-fabsf(x));
  return e / ((1.f + e) * (1.f + e));
}

__device__ __forceinline__ void score(float t, const MultiParams& m, float& s, float& ds) {
  if (m.fdiv == 0) {
    s = t;
    ds = 1.f;
  } else if (m.fdiv == 1) {
    const float u = -t, e = expf(fminf(u, kExpClamp));
    s = 1.f - e;
    ds = u <= kExpClamp ? e : 0.f;
  } else if (m.fdiv == 2) {
    s = kLn2 + log_sigmoid(t);
    ds = sigmoid(-t);
  } else {
    const float u = m.am1 * t, e = expf(fminf(u, kExpClamp));
    s = (e - 1.f) / m.am1;
    ds = u <= kExpClamp ? e : 0.f;
  }
}

struct Terms {
  float loss, dcr, drr;
};

__device__ Terms pair_terms(float cr, float rr, float inc, float inr, const MultiParams& m) {
  float sc, dsc, sr, dsr;
  score(cr, m, sc, dsc);
  score(rr, m, sr, dsr);
  const float beta = m.base.beta, d = sc - sr, dn = sc * inc - sr * inr, a = beta * cr, b = beta * rr;
  float loss = 0.f, gd = 0.f, gn = 0.f, gc = 0.f, gr = 0.f;
  PairParams p = m.base;
  for (int k = 0; k < m.n; ++k) {
    const float w = m.weights[k];
    const int type = m.types[k];
    if (type <= 3) {
      p.type = type;
      loss += w * pair_loss(d, p);
      gd += w * pair_grad(d, p);
    } else if (type == 4) {
      const float x = beta * d;
      loss += w * (sigmoid(x) * (log_sigmoid(x) - m.exo_lpw) + sigmoid(-x) * (log_sigmoid(-x) - m.exo_lpl));
      gd += w * beta * sig_prod(x) * (x - (m.exo_lpw - m.exo_lpl));
    } else if (type == 5) {
      loss += w * (-log_sigmoid(a) - 0.5f * log_sigmoid(-a) - 0.5f * log_sigmoid(-b));
      gc += w * beta * (-sigmoid(-a) + 0.5f * sigmoid(a));
      gr += w * beta * 0.5f * sigmoid(b);
    } else if (type == 6) {
      loss += w * (-log_sigmoid(a) - log_sigmoid(-b));
      gc += w * beta * -sigmoid(-a);
      gr += w * beta * sigmoid(b);
    } else if (type == 7) {
      const float pc = cr - m.base.half_inv_beta, pr = rr + m.base.half_inv_beta;
      loss += w * (pc * pc + pr * pr);
      gc += w * 2.f * pc;
      gr += w * 2.f * pr;
    } else if (type == 8) {
      loss += w * (1.f - sigmoid(a) + sigmoid(b));
      gc += w * beta * -sig_prod(a);
      gr += w * beta * sig_prod(b);
    } else if (type == 9) {
      const float u = a - b;
      loss += w * (sigmoid(a) + 1.f - sigmoid(u));
      gc += w * beta * (sig_prod(a) - sig_prod(u));
      gr += w * beta * sig_prod(u);
    } else if (type == 10) {
      const float x = beta * d, xt = x / m.tau, m1 = sigmoid(-xt), ex = expf(-x + log_sigmoid(xt));
      loss += w * (-log_sigmoid(x) * m1 + ex);
      gd += w * beta * (-sigmoid(-x) * m1 + log_sigmoid(x) * sig_prod(xt) / m.tau + ex * (m1 / m.tau - 1.f));
    } else {  // 11 sigmoid_norm, 12 ipo_norm
      p.type = type == 11 ? 0 : 1;
      loss += w * pair_loss(dn, p);
      gn += w * pair_grad(dn, p);
    }
  }
  return {loss, (gd + gn * inc) * dsc + gc, -(gd + gn * inr) * dsr + gr};
}

__device__ __forceinline__ float inv_len(const float* len, int64_t j) {
  return len != nullptr ? 1.f / fmaxf(len[j], 1.f) : 1.f;
}

template <typename T>
__global__ void multi_fwd_kernel(const T* c, const T* r, const T* rc, const T* rr, const float* len, float* loss,
                                 float* cw, float* rw, int64_t n, MultiParams m) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float dc = to_f32(c[i]) - to_f32(rc[i]), dr = to_f32(r[i]) - to_f32(rr[i]);
  loss[i] = pair_terms(dc, dr, inv_len(len, i), inv_len(len, i + n), m).loss;
  cw[i] = m.base.beta * dc;
  rw[i] = m.base.beta * dr;
}

template <typename T>
__global__ void multi_bwd_kernel(const float* go, const T* c, const T* r, const T* rc, const T* rr, const float* len,
                                 float* gc, float* gr, int64_t n, MultiParams m) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float dc = to_f32(c[i]) - to_f32(rc[i]), dr = to_f32(r[i]) - to_f32(rr[i]);
  const Terms t = pair_terms(dc, dr, inv_len(len, i), inv_len(len, i + n), m);
  gc[i] = go[i] * t.dcr;
  gr[i] = go[i] * t.drr;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    multi_tok_fwd_kernel(const T* pol, const T* ref, const bool* msk, const float* len, float* loss, float* cw,
                         float* rw, float* pseq, float* rseq, int64_t pairs, int64_t steps, bool mean, MultiParams m) {
  __shared__ float scratch[kThreads / 32];
  const int64_t i = blockIdx.x;
  const int64_t bc = i * steps, br = (i + pairs) * steps;
  const float pc = row_sum(pol + bc, msk + bc, steps, mean, scratch);
  const float qc = row_sum(ref + bc, msk + bc, steps, mean, scratch);
  const float pr = row_sum(pol + br, msk + br, steps, mean, scratch);
  const float qr = row_sum(ref + br, msk + br, steps, mean, scratch);
  if (threadIdx.x == 0) {
    pseq[i] = pc;
    pseq[i + pairs] = pr;
    rseq[i] = qc;
    rseq[i + pairs] = qr;
    const float dc = pc - qc, dr = pr - qr;
    loss[i] = pair_terms(dc, dr, inv_len(len, i), inv_len(len, i + pairs), m).loss;
    cw[i] = m.base.beta * dc;
    rw[i] = m.base.beta * dr;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    multi_tok_bwd_kernel(const float* go, const float* gs, const float* pseq, const float* rseq, const bool* msk,
                         const float* len, T* gx, int64_t pairs, int64_t steps, bool mean, MultiParams m) {
  __shared__ float scratch[kThreads / 32];
  const int64_t j = blockIdx.x;
  const bool chosen = j < pairs;
  const int64_t i = chosen ? j : j - pairs;
  const Terms t = pair_terms(pseq[i] - rseq[i], pseq[i + pairs] - rseq[i + pairs], inv_len(len, i),
                             inv_len(len, i + pairs), m);
  float s = go[i] * (chosen ? t.dcr : t.drr);
  if (gs != nullptr) s += gs[j];
  write_row_grad(gx + j * steps, msk + j * steps, steps, s, mean, scratch);
}

const float* lengths_ptr(const c10::optional<at::Tensor>& lengths, at::Tensor& keep) {
  if (!lengths.has_value()) return nullptr;
  keep = lengths->contiguous();
  return keep.const_data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_multi_fwd(
    const at::Tensor& c_in, const at::Tensor& r_in, const at::Tensor& rc_in, const at::Tensor& rr_in,
    const c10::optional<at::Tensor>& lengths, double beta, at::IntArrayRef types, at::ArrayRef<double> weights,
    double eps, int64_t fdiv, double f_alpha, double tau) {
  checks::dpo_pairs(c_in, r_in, rc_in, rr_in);
  checks::dpo_multi_args("dpo_multi", beta, types, weights, eps, fdiv, tau);
  checks::dpo_lengths("dpo_multi", lengths, 2 * c_in.size(0), c_in);
  const c10::cuda::CUDAGuard guard(c_in.device());
  const at::Tensor c = c_in.contiguous(), r = r_in.contiguous(), rc = rc_in.contiguous(), rr = rr_in.contiguous();
  const int64_t n = c.size(0);
  auto opts = c.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, opts), cw = at::empty({n}, opts), rw = at::empty({n}, opts), len_keep;
  if (n == 0) return {loss, cw, rw};
  const float* len = lengths_ptr(lengths, len_keep);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const MultiParams m = make_multi(beta, types, weights, eps, fdiv, f_alpha, tau);
  FASTALIGN_DISPATCH_FLOAT_TYPES(c.scalar_type(), "dpo_multi", [&] {
    multi_fwd_kernel<scalar_t><<<pair_blocks(n), kThreads, 0, stream>>>(
        cptr<scalar_t>(c), cptr<scalar_t>(r), cptr<scalar_t>(rc), cptr<scalar_t>(rr), len,
        loss.mutable_data_ptr<float>(), cw.mutable_data_ptr<float>(), rw.mutable_data_ptr<float>(), n, m);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, cw, rw};
}

std::tuple<at::Tensor, at::Tensor> dpo_multi_bwd(const at::Tensor& grad_in, const at::Tensor& c_in,
                                                 const at::Tensor& r_in, const at::Tensor& rc_in,
                                                 const at::Tensor& rr_in, const c10::optional<at::Tensor>& lengths,
                                                 double beta, at::IntArrayRef types, at::ArrayRef<double> weights,
                                                 double eps, int64_t fdiv, double f_alpha, double tau) {
  checks::dpo_pairs(c_in, r_in, rc_in, rr_in);
  checks::dpo_multi_args("dpo_multi", beta, types, weights, eps, fdiv, tau);
  checks::dpo_lengths("dpo_multi", lengths, 2 * c_in.size(0), c_in);
  checks::dpo_loss_grad(grad_in, c_in);
  const c10::cuda::CUDAGuard guard(c_in.device());
  const at::Tensor c = c_in.contiguous(), r = r_in.contiguous(), rc = rc_in.contiguous(), rr = rr_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const int64_t n = c.size(0);
  at::Tensor gc = at::empty({n}, c.options().dtype(at::kFloat)), gr = at::empty({n}, c.options().dtype(at::kFloat));
  at::Tensor len_keep;
  if (n == 0) return {gc, gr};
  const float* len = lengths_ptr(lengths, len_keep);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const MultiParams m = make_multi(beta, types, weights, eps, fdiv, f_alpha, tau);
  FASTALIGN_DISPATCH_FLOAT_TYPES(c.scalar_type(), "dpo_multi", [&] {
    multi_bwd_kernel<scalar_t><<<pair_blocks(n), kThreads, 0, stream>>>(
        grad.const_data_ptr<float>(), cptr<scalar_t>(c), cptr<scalar_t>(r), cptr<scalar_t>(rc), cptr<scalar_t>(rr),
        len, gc.mutable_data_ptr<float>(), gr.mutable_data_ptr<float>(), n, m);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gc, gr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_multi_tokens_fwd(
    const at::Tensor& pol_in, const at::Tensor& ref_in, const at::Tensor& mask_in,
    const c10::optional<at::Tensor>& lengths, double beta, at::IntArrayRef types, at::ArrayRef<double> weights,
    double eps, int64_t fdiv, double f_alpha, double tau, bool mean) {
  checks::dpo_tokens_fwd_args(pol_in, ref_in, mask_in, beta, 0, eps);
  checks::dpo_multi_args("dpo_loss_from_tokens", beta, types, weights, eps, fdiv, tau);
  checks::dpo_lengths("dpo_loss_from_tokens", lengths, pol_in.size(0), pol_in);
  check_rows("dpo_loss_from_tokens", pol_in, mask_in);
  const c10::cuda::CUDAGuard guard(pol_in.device());
  const at::Tensor pol = pol_in.contiguous(), ref = ref_in.contiguous(), mask = mask_in.contiguous();
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  auto opts = pol.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({pairs}, opts), cw = at::empty({pairs}, opts), rw = at::empty({pairs}, opts);
  at::Tensor pseq = at::empty({rows}, opts), rseq = at::empty({rows}, opts), len_keep;
  if (pairs == 0) return {loss, cw, rw, pseq, rseq};
  const float* len = lengths_ptr(lengths, len_keep);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const MultiParams m = make_multi(beta, types, weights, eps, fdiv, f_alpha, tau);
  FASTALIGN_DISPATCH_FLOAT_TYPES(pol.scalar_type(), "dpo_loss_from_tokens", [&] {
    multi_tok_fwd_kernel<scalar_t><<<static_cast<unsigned int>(pairs), kThreads, 0, stream>>>(
        cptr<scalar_t>(pol), cptr<scalar_t>(ref), mask.const_data_ptr<bool>(), len, loss.mutable_data_ptr<float>(),
        cw.mutable_data_ptr<float>(), rw.mutable_data_ptr<float>(), pseq.mutable_data_ptr<float>(),
        rseq.mutable_data_ptr<float>(), pairs, steps, mean, m);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, cw, rw, pseq, rseq};
}

at::Tensor dpo_multi_tokens_bwd(const at::Tensor& grad_in, const c10::optional<at::Tensor>& grad_seq_in,
                                const at::Tensor& pseq_in, const at::Tensor& rseq_in, const at::Tensor& pol,
                                const at::Tensor& mask_in, const c10::optional<at::Tensor>& lengths, double beta,
                                at::IntArrayRef types, at::ArrayRef<double> weights, double eps, int64_t fdiv,
                                double f_alpha, double tau, bool mean) {
  checks::dpo_tokens_bwd_args(grad_in, grad_seq_in, pseq_in, rseq_in, pol, mask_in, beta, 0, eps);
  checks::dpo_multi_args("dpo_loss_from_tokens", beta, types, weights, eps, fdiv, tau);
  checks::dpo_lengths("dpo_loss_from_tokens", lengths, pol.size(0), pol);
  check_rows("dpo_loss_from_tokens", pol, mask_in);
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  const c10::cuda::CUDAGuard guard(pol.device());
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), mask = mask_in.contiguous();
  const at::Tensor pseq = pseq_in.to(at::kFloat).contiguous(), rseq = rseq_in.to(at::kFloat).contiguous();
  at::Tensor gseq, len_keep;
  if (grad_seq_in.has_value()) {
    gseq = grad_seq_in->to(at::kFloat).contiguous();
  }
  at::Tensor gx = at::empty({rows, steps}, pol.options());
  if (rows == 0 || steps == 0) return gx;
  const float* len = lengths_ptr(lengths, len_keep);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const MultiParams m = make_multi(beta, types, weights, eps, fdiv, f_alpha, tau);
  FASTALIGN_DISPATCH_FLOAT_TYPES(pol.scalar_type(), "dpo_loss_from_tokens", [&] {
    multi_tok_bwd_kernel<scalar_t><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        grad.const_data_ptr<float>(), gseq.defined() ? gseq.const_data_ptr<float>() : nullptr,
        pseq.const_data_ptr<float>(), rseq.const_data_ptr<float>(), mask.const_data_ptr<bool>(), len,
        mptr<scalar_t>(gx), pairs, steps, mean, m);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("dpo_multi_fwd", &dpo_multi_fwd);
  m.impl("dpo_multi_bwd", &dpo_multi_bwd);
  m.impl("dpo_multi_tokens_fwd", &dpo_multi_tokens_fwd);
  m.impl("dpo_multi_tokens_bwd", &dpo_multi_tokens_bwd);
}

}  // namespace fastalign::cuda
