// CPU implementation of the preference ops (fastalign/ops/preference.py):
//   sequence_logps_fwd/bwd  per-row masked sum (or mean) of token log-probs, [N, T] -> [N]
//   dpo_loss_fwd/bwd        per-pair DPO losses and implicit rewards from sequence log-probs
//   dpo_tokens_fwd/bwd      the two fused: token log-probs of a [chosen; rejected] batch -> losses
// The general ops for a weighted list of loss types and an f-divergence (dpo_multi*) are in
// dpo_multi.cpp; the shared per-pair math in preference_math.h.
//
// DPO math (x = beta * delta, delta = (c - ref_c) - (r - ref_r), eps = label smoothing):
//   sigmoid: L = -(1-eps) logsig(x) - eps logsig(-x)         dL/dx = -(1-eps) sig(-x) + eps sig(x)
//   ipo:     L = (delta - 1/(2 beta))^2                        dL/ddelta = 2 (delta - 1/(2 beta))
//   hinge:   L = relu(1 - x)                                   dL/dx = -1 where x < 1, else 0
//   robust:  L = (-(1-eps) logsig(x) + eps logsig(-x))/(1-2eps)  dL/dx = (-(1-eps) sig(-x) - eps sig(x))/(1-2eps)
// logsig(x) = min(x, 0) - log1p(exp(-|x|)) never overflows (exp of a non-positive number), so
// |x| up to 1e4 and beyond gives finite, exact-asymptote results. All math fp32; outputs fp32;
// gradients w.r.t. token log-probs in their dtype. Masked positions are never read into a sum.
// The masks may be bool/uint8, int32, int64 or float32 (nonzero = valid): read as they are, so a
// caller's attention mask costs no conversion pass. The row loops (masked sums and fills) are in
// isa/preference_lanes.h, compiled per ISA and reached through the kernel table of dispatch.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "dispatch.h"
#include "mask.h"
#include "preference_math.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastalign::cpu {
namespace {

using namespace dpo;  // NOLINT: the shared pair math

// ---- sequence_logps ---------------------------------------------------------------------------

at::Tensor sequence_logps_fwd(const at::Tensor& x_in, const at::Tensor& mask_in, bool mean) {
  checks::token_rows("sequence_logps", x_in, mask_in);
  const at::Tensor x = x_in.contiguous(), mask = mask_in.contiguous();
  const int64_t rows = x.size(0), steps = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kFloat));
  const MaskedRows mr = masked_rows(x, mask);
  const void* px = x.const_data_ptr();
  float* po = out.mutable_data_ptr<float>();
  const auto& k = best_kernels();
  at::parallel_for(0, rows, row_grain(steps), [&](int64_t r0, int64_t r1) { k.masked_sums(mr, px, mean, po, r0, r1); });
  return out;
}

at::Tensor sequence_logps_bwd(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& mask_in, bool mean) {
  checks::token_rows("sequence_logps", x, mask_in);
  checks::sequence_logps_grad(grad_in, x);
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), mask = mask_in.contiguous();
  const int64_t rows = x.size(0), steps = x.size(1);
  at::Tensor gx = at::empty({rows, steps}, x.options());
  const MaskedRows mr = masked_rows(x, mask);
  void* pg = gx.mutable_data_ptr();
  const float* gr = grad.const_data_ptr<float>();
  const auto& k = best_kernels();
  at::parallel_for(0, rows, row_grain(steps), [&](int64_t r0, int64_t r1) { k.masked_fill(mr, pg, gr, mean, r0, r1); });
  return gx;
}

// ---- dpo_loss (from sequence log-probs) -------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_fwd(const at::Tensor& c_in, const at::Tensor& r_in,
                                                            const at::Tensor& rc_in, const at::Tensor& rr_in,
                                                            double beta, int64_t type, double eps) {
  checks::dpo_pairs(c_in, r_in, rc_in, rr_in);
  checks::dpo_loss_args("dpo_loss", beta, type, eps);
  const at::Tensor c = c_in.contiguous(), r = r_in.contiguous(), rc = rc_in.contiguous(), rr = rr_in.contiguous();
  const int64_t n = c.size(0);
  auto opts = c.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, opts), cw = at::empty({n}, opts), rw = at::empty({n}, opts);
  const PairParams p = make_params(beta, type, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "dpo_loss_fwd", [&] {
    const scalar_t *pc = c.data_ptr<scalar_t>(), *pr = r.data_ptr<scalar_t>();
    const scalar_t *prc = rc.data_ptr<scalar_t>(), *prr = rr.data_ptr<scalar_t>();
    float *pl = loss.data_ptr<float>(), *pcw = cw.data_ptr<float>(), *prw = rw.data_ptr<float>();
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float dc = static_cast<float>(pc[i]) - static_cast<float>(prc[i]);
        const float dr = static_cast<float>(pr[i]) - static_cast<float>(prr[i]);
        pl[i] = pair_loss(dc - dr, p);
        pcw[i] = p.beta * dc;
        prw[i] = p.beta * dr;
      }
    });
  });
  return {loss, cw, rw};
}

// Returns g [B] fp32 = grad_losses * dL/ddelta, the gradient w.r.t. chosen_logps (and ref_rejected);
// rejected and ref_chosen get -g (applied by the autograd formula in Python).
at::Tensor dpo_loss_bwd(const at::Tensor& grad_in, const at::Tensor& c_in, const at::Tensor& r_in,
                        const at::Tensor& rc_in, const at::Tensor& rr_in, double beta, int64_t type, double eps) {
  checks::dpo_pairs(c_in, r_in, rc_in, rr_in);
  checks::dpo_loss_args("dpo_loss", beta, type, eps);
  checks::dpo_loss_grad(grad_in, c_in);
  const at::Tensor c = c_in.contiguous(), r = r_in.contiguous(), rc = rc_in.contiguous(), rr = rr_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const int64_t n = c.size(0);
  at::Tensor g = at::empty({n}, c.options().dtype(at::kFloat));
  const PairParams p = make_params(beta, type, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "dpo_loss_bwd", [&] {
    const scalar_t *pc = c.data_ptr<scalar_t>(), *pr = r.data_ptr<scalar_t>();
    const scalar_t *prc = rc.data_ptr<scalar_t>(), *prr = rr.data_ptr<scalar_t>();
    const float* pgo = grad.data_ptr<float>();
    float* pg = g.data_ptr<float>();
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float dc = static_cast<float>(pc[i]) - static_cast<float>(prc[i]);
        const float dr = static_cast<float>(pr[i]) - static_cast<float>(prr[i]);
        pg[i] = pgo[i] * pair_grad(dc - dr, p);
      }
    });
  });
  return g;
}

// ---- dpo_tokens: [chosen; rejected] token log-probs -> per-pair losses ------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_tokens_fwd(
    const at::Tensor& pol_in, const at::Tensor& ref_in, const at::Tensor& mask_in, double beta, int64_t type,
    double eps, bool mean) {
  checks::dpo_tokens_fwd_args(pol_in, ref_in, mask_in, beta, type, eps);
  const at::Tensor pol = pol_in.contiguous(), ref = ref_in.contiguous(), mask = mask_in.contiguous();
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  auto opts = pol.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({pairs}, opts), cw = at::empty({pairs}, opts), rw = at::empty({pairs}, opts);
  at::Tensor pseq = at::empty({rows}, opts), rseq = at::empty({rows}, opts);
  const PairParams p = make_params(beta, type, eps);
  const MaskedRows mr = masked_rows(pol, mask);
  const void *pp = pol.const_data_ptr(), *pr = ref.const_data_ptr();
  float *pl = loss.mutable_data_ptr<float>(), *pcw = cw.mutable_data_ptr<float>(), *prw = rw.mutable_data_ptr<float>();
  float *pps = pseq.mutable_data_ptr<float>(), *prs = rseq.mutable_data_ptr<float>();
  const auto& k = best_kernels();
  // a task takes pairs [i0, i1): their chosen rows i and rejected rows i + pairs, both models
  at::parallel_for(0, pairs, std::max<int64_t>(1, row_grain(steps) / 4), [&](int64_t i0, int64_t i1) {
    for (const int64_t r0 : {i0, i0 + pairs}) {
      k.masked_sums(mr, pp, mean, pps, r0, r0 + (i1 - i0));
      k.masked_sums(mr, pr, mean, prs, r0, r0 + (i1 - i0));
    }
    for (int64_t i = i0; i < i1; ++i) {
      const float dc = pps[i] - prs[i], dr = pps[i + pairs] - prs[i + pairs];
      pl[i] = pair_loss(dc - dr, p);
      pcw[i] = p.beta * dc;
      prw[i] = p.beta * dr;
    }
  });
  return {loss, cw, rw, pseq, rseq};
}

// grad wrt policy token log-probs [2B, T] in their dtype. Row j (pair i = j mod B) gets the
// per-row scalar  s_j = +-grad_losses[i] * dL/ddelta_i (+ for chosen, - for rejected)
// + grad_policy_seq[j], divided by the row's valid count for the mean, at its valid positions.
at::Tensor dpo_tokens_bwd(const at::Tensor& grad_in, const c10::optional<at::Tensor>& grad_seq_in,
                          const at::Tensor& pseq_in, const at::Tensor& rseq_in, const at::Tensor& pol,
                          const at::Tensor& mask_in, double beta, int64_t type, double eps, bool mean) {
  checks::dpo_tokens_bwd_args(grad_in, grad_seq_in, pseq_in, rseq_in, pol, mask_in, beta, type, eps);
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), mask = mask_in.contiguous();
  const at::Tensor pseq = pseq_in.to(at::kFloat).contiguous(), rseq = rseq_in.to(at::kFloat).contiguous();
  at::Tensor gseq;
  if (grad_seq_in.has_value()) {
    gseq = grad_seq_in->to(at::kFloat).contiguous();
  }
  at::Tensor gx = at::empty({rows, steps}, pol.options());
  const PairParams p = make_params(beta, type, eps);
  // the per-row scalars first (2B floats), then one masked fill of the [2B, T] gradient
  std::vector<float> row_value(rows);
  {
    const float *go = grad.const_data_ptr<float>(), *ps = pseq.const_data_ptr<float>();
    const float* rs = rseq.const_data_ptr<float>();
    const float* gs = gseq.defined() ? gseq.const_data_ptr<float>() : nullptr;
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t i = j < pairs ? j : j - pairs;
      const float delta = (ps[i] - rs[i]) - (ps[i + pairs] - rs[i + pairs]);
      const float g = go[i] * pair_grad(delta, p);
      row_value[j] = (j < pairs ? g : -g) + (gs != nullptr ? gs[j] : 0.f);
    }
  }
  const MaskedRows mr = masked_rows(pol, mask);
  void* pg = gx.mutable_data_ptr();
  const float* pv = row_value.data();
  const auto& k = best_kernels();
  at::parallel_for(0, rows, row_grain(steps), [&](int64_t r0, int64_t r1) { k.masked_fill(mr, pg, pv, mean, r0, r1); });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("sequence_logps_fwd", &sequence_logps_fwd);
  m.impl("sequence_logps_bwd", &sequence_logps_bwd);
  m.impl("dpo_loss_fwd", &dpo_loss_fwd);
  m.impl("dpo_loss_bwd", &dpo_loss_bwd);
  m.impl("dpo_tokens_fwd", &dpo_tokens_fwd);
  m.impl("dpo_tokens_bwd", &dpo_tokens_bwd);
}

}  // namespace fastalign::cpu
