// CPU implementation of the general DPO ops (fastalign/ops/dpo_multi.py): dpo_multi_fwd/bwd (from
// sequence log-probs) and dpo_multi_tokens_fwd/bwd (the fused head from token log-probs) for a
// weighted list of per-pair loss types, an f-divergence and optional token counts. The row loops
// are preference.cpp's (the kernel table of dispatch.h); the pair math below and in preference_math.h.
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

// ---- the general op (dpo_multi*): a weighted sum of per-pair types of the two log-ratios ---------
// cr = c - ref_c, rr = r - ref_r; the f-divergence score F (0 reverse KL t, 1 forward KL 1 - e^-t,
// 2 JS log 2 + logsig t, 3 alpha (e^{(alpha-1) t} - 1)/(alpha-1); exponents clamped at 80 with zero
// gradient beyond, as torch.clamp) gives sc = F(cr), sr = F(rr), d = sc - sr, dn = sc/n_c - sr/n_r;
// a = beta cr, b = beta rr. Types (ids = reference_dpo_types.FUSED_TYPES):
//   0..3 sigmoid, ipo, hinge, robust of d (pair_loss/pair_grad above)
//   4  exo_pair  sig(x)(ls(x) - log(1-eps)) + sig(-x)(ls(-x) - log eps), x = beta d;
//                dL/dx = sig(x) sig(-x) (x - log((1-eps)/eps))
//   5  nca_pair  -ls(a) - ls(-a)/2 - ls(-b)/2    dL/da = -sig(-a) + sig(a)/2, dL/db = sig(b)/2
//   6  bco_pair  -ls(a) - ls(-b)                 dL/da = -sig(-a), dL/db = sig(b)
//   7  sppo_hard (cr - 1/(2beta))^2 + (rr + 1/(2beta))^2
//   8  apo_zero  1 - sig(a) + sig(b)             dL/da = -sig'(a), dL/db = sig'(b), sig' = sig(.) sig(-.)
//   9  apo_down  sig(a) + 1 - sig(a - b)         dL/da = sig'(a) - sig'(a-b), dL/db = sig'(a-b)
//   10 discopop  -ls(x) sig(-x/tau) + exp(-x + ls(x/tau))   (= exp(-x) sig(x/tau), without inf * 0)
//      dL/dx = -sig(-x) sig(-x/tau) + ls(x) sig'(x/tau)/tau + exp(-x + ls(x/tau)) (sig(-x/tau)/tau - 1)
//   11 sigmoid_norm, 12 ipo_norm: sigmoid / ipo of dn
// dL/dcr = (dL/dd + dL/ddn / n_c) F'(cr) + (terms of a), dL/drr = -(dL/dd + dL/ddn / n_r) F'(rr) + (terms of b).
constexpr int kMaxTypes = 16;
constexpr float kExpClamp = 80.f;
constexpr float kLog2 = 0.69314718055994531f;

struct MultiParams {
  PairParams base;  // beta, eps, 1/(2 beta), 1/(1 - 2 eps)
  float exo_lpw, exo_lpl, tau, am1;
  int64_t fdiv, n;
  int64_t types[kMaxTypes];
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
  m.fdiv = fdiv;
  m.n = static_cast<int64_t>(types.size());
  for (int64_t k = 0; k < m.n; ++k) {
    m.types[k] = types[k];
    m.weights[k] = static_cast<float>(weights[k]);
  }
  return m;
}

inline float sig_prod(float x) {  // sig(x) sig(-x) = e/(1+e)^2, e = exp(-|x|): 0 at the extremes
  const float e = std::exp(-std::fabs(x));
  return e / ((1.f + e) * (1.f + e));
}

// F(t) and F'(t) of the f-divergence
inline void score(float t, const MultiParams& m, float& s, float& ds) {
  switch (m.fdiv) {
    case 0:
      s = t;
      ds = 1.f;
      return;
    case 1: {
      const float u = -t, e = std::exp(std::min(u, kExpClamp));
      s = 1.f - e;
      ds = u <= kExpClamp ? e : 0.f;
      return;
    }
    case 2:
      s = kLog2 + log_sigmoid(t);
      ds = sigmoid(-t);
      return;
    default: {
      const float u = m.am1 * t, e = std::exp(std::min(u, kExpClamp));
      s = (e - 1.f) / m.am1;
      ds = u <= kExpClamp ? e : 0.f;
    }
  }
}

struct Terms {
  float loss, dcr, drr;
};

inline Terms pair_terms(float cr, float rr, float inc, float inr, const MultiParams& m) {
  float sc, dsc, sr, dsr;
  score(cr, m, sc, dsc);
  score(rr, m, sr, dsr);
  const float beta = m.base.beta, d = sc - sr, dn = sc * inc - sr * inr, a = beta * cr, b = beta * rr;
  float loss = 0.f, gd = 0.f, gn = 0.f, gc = 0.f, gr = 0.f;
  PairParams p = m.base;
  for (int64_t k = 0; k < m.n; ++k) {
    const float w = m.weights[k];
    const int64_t type = m.types[k];
    switch (type) {
      case 0:
      case 1:
      case 2:
      case 3:
        p.type = type;
        loss += w * pair_loss(d, p);
        gd += w * pair_grad(d, p);
        break;
      case 4: {
        const float x = beta * d;
        loss += w * (sigmoid(x) * (log_sigmoid(x) - m.exo_lpw) + sigmoid(-x) * (log_sigmoid(-x) - m.exo_lpl));
        gd += w * beta * sig_prod(x) * (x - (m.exo_lpw - m.exo_lpl));
        break;
      }
      case 5:
        loss += w * (-log_sigmoid(a) - 0.5f * log_sigmoid(-a) - 0.5f * log_sigmoid(-b));
        gc += w * beta * (-sigmoid(-a) + 0.5f * sigmoid(a));
        gr += w * beta * 0.5f * sigmoid(b);
        break;
      case 6:
        loss += w * (-log_sigmoid(a) - log_sigmoid(-b));
        gc += w * beta * -sigmoid(-a);
        gr += w * beta * sigmoid(b);
        break;
      case 7: {
        const float pc = cr - m.base.half_inv_beta, pr = rr + m.base.half_inv_beta;
        loss += w * (pc * pc + pr * pr);
        gc += w * 2.f * pc;
        gr += w * 2.f * pr;
        break;
      }
      case 8:
        loss += w * (1.f - sigmoid(a) + sigmoid(b));
        gc += w * beta * -sig_prod(a);
        gr += w * beta * sig_prod(b);
        break;
      case 9: {
        const float u = a - b;
        loss += w * (sigmoid(a) + 1.f - sigmoid(u));
        gc += w * beta * (sig_prod(a) - sig_prod(u));
        gr += w * beta * sig_prod(u);
        break;
      }
      case 10: {
        const float x = beta * d, xt = x / m.tau, m1 = sigmoid(-xt), ex = std::exp(-x + log_sigmoid(xt));
        loss += w * (-log_sigmoid(x) * m1 + ex);
        gd += w * beta * (-sigmoid(-x) * m1 + log_sigmoid(x) * sig_prod(xt) / m.tau + ex * (m1 / m.tau - 1.f));
        break;
      }
      default:  // 11 sigmoid_norm, 12 ipo_norm
        p.type = type == 11 ? kSigmoid : kIpo;
        loss += w * pair_loss(dn, p);
        gn += w * pair_grad(dn, p);
    }
  }
  return {loss, (gd + gn * inc) * dsc + gc, -(gd + gn * inr) * dsr + gr};
}

inline float inv_len(const float* len, int64_t j) { return len != nullptr ? 1.f / std::max(len[j], 1.f) : 1.f; }

// ---- dpo_multi / dpo_multi_tokens: the general ops -------------------------------------------

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
  const at::Tensor c = c_in.contiguous(), r = r_in.contiguous(), rc = rc_in.contiguous(), rr = rr_in.contiguous();
  const int64_t n = c.size(0);
  auto opts = c.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, opts), cw = at::empty({n}, opts), rw = at::empty({n}, opts), len_keep;
  const float* len = lengths_ptr(lengths, len_keep);
  const MultiParams m = make_multi(beta, types, weights, eps, fdiv, f_alpha, tau);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "dpo_multi_fwd", [&] {
    const scalar_t *pc = c.data_ptr<scalar_t>(), *pr = r.data_ptr<scalar_t>();
    const scalar_t *prc = rc.data_ptr<scalar_t>(), *prr = rr.data_ptr<scalar_t>();
    float *pl = loss.data_ptr<float>(), *pcw = cw.data_ptr<float>(), *prw = rw.data_ptr<float>();
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float dc = static_cast<float>(pc[i]) - static_cast<float>(prc[i]);
        const float dr = static_cast<float>(pr[i]) - static_cast<float>(prr[i]);
        pl[i] = pair_terms(dc, dr, inv_len(len, i), inv_len(len, i + n), m).loss;
        pcw[i] = m.base.beta * dc;
        prw[i] = m.base.beta * dr;
      }
    });
  });
  return {loss, cw, rw};
}

// (grad_losses * dL/dcr, grad_losses * dL/drr) [B] fp32; ref_chosen / ref_rejected get their negatives.
std::tuple<at::Tensor, at::Tensor> dpo_multi_bwd(const at::Tensor& grad_in, const at::Tensor& c_in,
                                                 const at::Tensor& r_in, const at::Tensor& rc_in,
                                                 const at::Tensor& rr_in, const c10::optional<at::Tensor>& lengths,
                                                 double beta, at::IntArrayRef types, at::ArrayRef<double> weights,
                                                 double eps, int64_t fdiv, double f_alpha, double tau) {
  checks::dpo_pairs(c_in, r_in, rc_in, rr_in);
  checks::dpo_multi_args("dpo_multi", beta, types, weights, eps, fdiv, tau);
  checks::dpo_lengths("dpo_multi", lengths, 2 * c_in.size(0), c_in);
  checks::dpo_loss_grad(grad_in, c_in);
  const at::Tensor c = c_in.contiguous(), r = r_in.contiguous(), rc = rc_in.contiguous(), rr = rr_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const int64_t n = c.size(0);
  at::Tensor gc = at::empty({n}, c.options().dtype(at::kFloat)), gr = at::empty({n}, c.options().dtype(at::kFloat));
  at::Tensor len_keep;
  const float* len = lengths_ptr(lengths, len_keep);
  const MultiParams m = make_multi(beta, types, weights, eps, fdiv, f_alpha, tau);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "dpo_multi_bwd", [&] {
    const scalar_t *pc = c.data_ptr<scalar_t>(), *pr = r.data_ptr<scalar_t>();
    const scalar_t *prc = rc.data_ptr<scalar_t>(), *prr = rr.data_ptr<scalar_t>();
    const float* pgo = grad.data_ptr<float>();
    float *pgc = gc.data_ptr<float>(), *pgr = gr.data_ptr<float>();
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float dc = static_cast<float>(pc[i]) - static_cast<float>(prc[i]);
        const float dr = static_cast<float>(pr[i]) - static_cast<float>(prr[i]);
        const Terms t = pair_terms(dc, dr, inv_len(len, i), inv_len(len, i + n), m);
        pgc[i] = pgo[i] * t.dcr;
        pgr[i] = pgo[i] * t.drr;
      }
    });
  });
  return {gc, gr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_multi_tokens_fwd(
    const at::Tensor& pol_in, const at::Tensor& ref_in, const at::Tensor& mask_in,
    const c10::optional<at::Tensor>& lengths, double beta, at::IntArrayRef types, at::ArrayRef<double> weights,
    double eps, int64_t fdiv, double f_alpha, double tau, bool mean) {
  checks::dpo_tokens_fwd_args(pol_in, ref_in, mask_in, beta, 0, eps);
  checks::dpo_multi_args("dpo_loss_from_tokens", beta, types, weights, eps, fdiv, tau);
  checks::dpo_lengths("dpo_loss_from_tokens", lengths, pol_in.size(0), pol_in);
  const at::Tensor pol = pol_in.contiguous(), ref = ref_in.contiguous(), mask = mask_in.contiguous();
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  auto opts = pol.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({pairs}, opts), cw = at::empty({pairs}, opts), rw = at::empty({pairs}, opts);
  at::Tensor pseq = at::empty({rows}, opts), rseq = at::empty({rows}, opts), len_keep;
  const float* len = lengths_ptr(lengths, len_keep);
  const MultiParams m = make_multi(beta, types, weights, eps, fdiv, f_alpha, tau);
  const MaskedRows mr = masked_rows(pol, mask);
  const void *pp = pol.const_data_ptr(), *pr = ref.const_data_ptr();
  float *pl = loss.mutable_data_ptr<float>(), *pcw = cw.mutable_data_ptr<float>(), *prw = rw.mutable_data_ptr<float>();
  float *pps = pseq.mutable_data_ptr<float>(), *prs = rseq.mutable_data_ptr<float>();
  const auto& k = best_kernels();
  // as dpo_tokens_fwd: a task sums the chosen and rejected rows of its pairs, then their losses
  at::parallel_for(0, pairs, std::max<int64_t>(1, row_grain(steps) / 4), [&](int64_t i0, int64_t i1) {
    for (const int64_t r0 : {i0, i0 + pairs}) {
      k.masked_sums(mr, pp, mean, pps, r0, r0 + (i1 - i0));
      k.masked_sums(mr, pr, mean, prs, r0, r0 + (i1 - i0));
    }
    for (int64_t i = i0; i < i1; ++i) {
      const float dc = pps[i] - prs[i], dr = pps[i + pairs] - prs[i + pairs];
      pl[i] = pair_terms(dc, dr, inv_len(len, i), inv_len(len, i + pairs), m).loss;
      pcw[i] = m.base.beta * dc;
      prw[i] = m.base.beta * dr;
    }
  });
  return {loss, cw, rw, pseq, rseq};
}

// grad wrt policy token log-probs [2B, T]: row j (pair i) gets grad_losses[i] * dL/dcr_i (chosen) or
// * dL/drr_i (rejected), + grad_policy_seq[j], / count for the mean, at its valid positions.
at::Tensor dpo_multi_tokens_bwd(const at::Tensor& grad_in, const c10::optional<at::Tensor>& grad_seq_in,
                                const at::Tensor& pseq_in, const at::Tensor& rseq_in, const at::Tensor& pol,
                                const at::Tensor& mask_in, const c10::optional<at::Tensor>& lengths, double beta,
                                at::IntArrayRef types, at::ArrayRef<double> weights, double eps, int64_t fdiv,
                                double f_alpha, double tau, bool mean) {
  checks::dpo_tokens_bwd_args(grad_in, grad_seq_in, pseq_in, rseq_in, pol, mask_in, beta, 0, eps);
  checks::dpo_multi_args("dpo_loss_from_tokens", beta, types, weights, eps, fdiv, tau);
  checks::dpo_lengths("dpo_loss_from_tokens", lengths, pol.size(0), pol);
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), mask = mask_in.contiguous();
  const at::Tensor pseq = pseq_in.to(at::kFloat).contiguous(), rseq = rseq_in.to(at::kFloat).contiguous();
  at::Tensor gseq, len_keep;
  if (grad_seq_in.has_value()) {
    gseq = grad_seq_in->to(at::kFloat).contiguous();
  }
  const float* len = lengths_ptr(lengths, len_keep);
  at::Tensor gx = at::empty({rows, steps}, pol.options());
  const MultiParams m = make_multi(beta, types, weights, eps, fdiv, f_alpha, tau);
  std::vector<float> row_value(rows);
  {
    const float *go = grad.const_data_ptr<float>(), *ps = pseq.const_data_ptr<float>();
    const float* rs = rseq.const_data_ptr<float>();
    const float* gs = gseq.defined() ? gseq.const_data_ptr<float>() : nullptr;
    for (int64_t i = 0; i < pairs; ++i) {
      const Terms t = pair_terms(ps[i] - rs[i], ps[i + pairs] - rs[i + pairs], inv_len(len, i),
                                 inv_len(len, i + pairs), m);
      row_value[i] = go[i] * t.dcr + (gs != nullptr ? gs[i] : 0.f);
      row_value[i + pairs] = go[i] * t.drr + (gs != nullptr ? gs[i + pairs] : 0.f);
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
  m.impl("dpo_multi_fwd", &dpo_multi_fwd);
  m.impl("dpo_multi_bwd", &dpo_multi_bwd);
  m.impl("dpo_multi_tokens_fwd", &dpo_multi_tokens_fwd);
  m.impl("dpo_multi_tokens_bwd", &dpo_multi_tokens_bwd);
}

}  // namespace fastalign::cpu
