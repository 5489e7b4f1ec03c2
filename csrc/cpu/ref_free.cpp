// CPU kernels of the reference-free paired losses (fastalign/ops/ref_free.py: ORPO, CPO, SimPO):
//   ref_free_tokens_fwd  token log-probs [2B, T] of [chosen; rejected] -> per-pair losses, metrics,
//                        and the row stats (row log-prob, valid count) [2, 2B] the backward needs
//   ref_free_tokens_bwd  the gradient w.r.t. the token log-probs: one scalar per row at its valid
//                        tokens (the saved counts: the log-probs are not read again)
//
// Per row j: S = masked sum, n = valid count, s = S / max(n, 1) (mean) or S. Pair i: c = s_i,
// r = s_{B+i}; nll = -S_i / max(n_i, 1); losses = pref(c, r) + alpha nll. With eps = label smoothing:
//   orpo     z = lo(c~) - lo(r~), lo(y) = y - log1mexp(y), y~ = min(y, -2^-24)   pref = -beta logsig(z)
//            dpref/dc = beta sig(-z) / expm1(c~),  dpref/dr = -beta sig(-z) / expm1(r~)
//            (the floor passes the gradient straight through: d y~/dy = 1)
//   sigmoid  z = beta (c - r) - gamma     pref = -(1-eps) logsig(z) - eps logsig(-z)
//            dpref/dc = beta (-(1-eps) sig(-z) + eps sig(z)) = -dpref/dr
//   hinge    z = beta (c - r)             pref = relu(1 - z),   dpref/dc = -beta where z < 1 = -dpref/dr
//   ipo      z = c - r                    pref = (z - 1/(2 beta))^2,   dpref/dc = 2 (z - 1/(2 beta)) = -dpref/dr
// Row gradients: chosen g (dpref/dc [/ n_c for the mean] - alpha / n_c), rejected g dpref/dr [/ n_r].
// log1mexp(y) = log1p(-e^y) for y < -ln 2, log(-expm1(y)) otherwise; logsig(x) = min(x, 0) -
// log1p(e^-|x|): finite for any finite input. All math fp32; masked positions never read into a
// sum. The row sums are the DPO head's (isa/preference_lanes.h, through the kernel table), so a
// row's sum has the same bits as sequence_logps's on this backend; the counts are a plain loop
// over the mask, read as it is (bool/uint8, int32, int64, float32; nonzero = valid).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ref_free_checks.h"
#include "dispatch.h"
#include "mask.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastalign::cpu {
namespace {

enum Kind : int64_t { kOrpo = 0, kSigmoid = 1, kHinge = 2, kIpo = 3 };
constexpr float kOddsFloor = 5.9604644775390625e-08f;  // 2^-24
constexpr float kLn2 = 0.6931471805599453f;

struct Params {
  float beta, gamma, alpha, eps, half_inv_beta;
  int64_t kind;
};

Params make_params(double beta, int64_t kind, double gamma, double alpha, double eps) {
  return {static_cast<float>(beta), static_cast<float>(gamma), static_cast<float>(alpha), static_cast<float>(eps),
          static_cast<float>(1.0 / (2.0 * beta)), kind};
}

inline float log_sigmoid(float x) { return std::min(x, 0.f) - std::log1p(std::exp(-std::fabs(x))); }
inline float sigmoid(float x) {
  const float e = std::exp(-std::fabs(x));  // in (0, 1]: no overflow
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}
inline float log1mexp(float y) { return y < -kLn2 ? std::log1p(-std::exp(y)) : std::log(-std::expm1(y)); }
inline float odds_floor(float y) { return y > -kOddsFloor ? -kOddsFloor : y; }  // NaN stays NaN

// z, the argument of the pair loss, from the (floored, for orpo) row log-probs
inline float pair_logits(float c, float r, const Params& p) {
  switch (p.kind) {
    case kOrpo:
      return (c - r) - (log1mexp(c) - log1mexp(r));
    case kSigmoid:
      return p.beta * (c - r) - p.gamma;
    case kHinge:
      return p.beta * (c - r);
    default:
      return c - r;
  }
}

inline float pair_loss(float z, const Params& p) {
  switch (p.kind) {
    case kOrpo:
      return -p.beta * log_sigmoid(z);
    case kSigmoid:
      return -(1.f - p.eps) * log_sigmoid(z) - p.eps * log_sigmoid(-z);
    case kHinge: {
      const float h = 1.f - z;
      return (h > 0.f || std::isnan(h)) ? h : 0.f;
    }
    default: {
      const float d = z - p.half_inv_beta;
      return d * d;
    }
  }
}

// (dpref/dc, dpref/dr) of one pair
inline void pair_grads(float c, float r, const Params& p, float& gc, float& gr) {
  if (p.kind == kOrpo) {
    c = odds_floor(c);
    r = odds_floor(r);
    const float s = p.beta * sigmoid(-pair_logits(c, r, p));
    gc = s / std::expm1(c);
    gr = -s / std::expm1(r);
    return;
  }
  const float z = pair_logits(c, r, p);
  switch (p.kind) {
    case kSigmoid:
      gc = p.beta * (-(1.f - p.eps) * sigmoid(-z) + p.eps * sigmoid(z));
      break;
    case kHinge:
      gc = (1.f - z > 0.f || std::isnan(z)) ? -p.beta : 0.f;
      break;
    default:
      gc = 2.f * (z - p.half_inv_beta);
  }
  gr = -gc;
}

// Pairs per parallel task: about 16 K tokens (two rows a pair), so that small batches stay on one thread.
int64_t pair_grain(int64_t steps) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(steps, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ref_free_tokens_fwd(
    const at::Tensor& pol_in, const at::Tensor& mask_in, int64_t kind, double beta, double gamma, double alpha,
    double eps, bool mean) {
  checks::ref_free_fwd_args(pol_in, mask_in, beta, kind, gamma, alpha, eps);
  const at::Tensor pol = pol_in.contiguous(), mask = mask_in.contiguous();
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  auto opts = pol.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({pairs}, opts), cw = at::empty({pairs}, opts), rw = at::empty({pairs}, opts);
  at::Tensor nll = at::empty({pairs}, opts), logits = at::empty({pairs}, opts), stats = at::empty({2, rows}, opts);
  const Params p = make_params(beta, kind, gamma, alpha, eps);
  const MaskedRows mr = masked_rows(pol, mask);
  const void* px = pol.const_data_ptr();
  float *pl = loss.mutable_data_ptr<float>(), *pcw = cw.mutable_data_ptr<float>(), *prw = rw.mutable_data_ptr<float>();
  float *pn = nll.mutable_data_ptr<float>(), *pz = logits.mutable_data_ptr<float>();
  float* ps = stats.mutable_data_ptr<float>();  // row 0: s [2B], row 1: counts [2B]
  float* pc = ps + rows;
  const auto& k = best_kernels();
  // a task takes pairs [i0, i1): their chosen rows i and rejected rows i + pairs
  at::parallel_for(0, pairs, pair_grain(steps), [&](int64_t i0, int64_t i1) {
    for (const int64_t r0 : {i0, i0 + pairs}) {
      const int64_t r1 = r0 + (i1 - i0);
      k.masked_sums(mr, px, false, ps, r0, r1);
      with_mask(mask, [&](const auto* m) {
        for (int64_t r = r0; r < r1; ++r) {
          const auto* mrow = m + r * steps;
          int64_t n = 0;
          for (int64_t t = 0; t < steps; ++t) n += mrow[t] != 0;
          pc[r] = static_cast<float>(n);
        }
      });
    }
    for (int64_t i = i0; i < i1; ++i) {
      const float nc = std::max(pc[i], 1.f), nr = std::max(pc[i + pairs], 1.f);
      const float sum_c = ps[i];
      if (mean) {  // the same division as sequence_logps's mean
        ps[i] = ps[i] / nc;
        ps[i + pairs] = ps[i + pairs] / nr;
      }
      const float c = ps[i], r = ps[i + pairs];
      const float z = p.kind == kOrpo ? pair_logits(odds_floor(c), odds_floor(r), p) : pair_logits(c, r, p);
      const float n_ll = -(mean ? c : sum_c / nc);
      pz[i] = z;
      pn[i] = n_ll;
      pl[i] = pair_loss(z, p) + p.alpha * n_ll;
      pcw[i] = p.beta * c;
      prw[i] = p.beta * r;
    }
  });
  return {loss, cw, rw, nll, logits, stats};
}

at::Tensor ref_free_tokens_bwd(const at::Tensor& grad_in, const at::Tensor& stats_in, const at::Tensor& pol,
                               const at::Tensor& mask_in, int64_t kind, double beta, double gamma, double alpha,
                               double eps, bool mean) {
  checks::ref_free_bwd_args(grad_in, stats_in, pol, mask_in, beta, kind, gamma, alpha, eps);
  const int64_t rows = pol.size(0), pairs = rows / 2, steps = pol.size(1);
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), stats = stats_in.to(at::kFloat).contiguous();
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor gx = at::empty({rows, steps}, pol.options());
  const Params p = make_params(beta, kind, gamma, alpha, eps);
  // the per-row scalars first (2B floats), then one masked fill of the [2B, T] gradient
  std::vector<float> value(rows);
  const float *go = grad.const_data_ptr<float>(), *ps = stats.const_data_ptr<float>(), *pc = ps + rows;
  for (int64_t i = 0; i < pairs; ++i) {
    float gc, gr;
    pair_grads(ps[i], ps[i + pairs], p, gc, gr);
    const float nc = std::max(pc[i], 1.f), nr = std::max(pc[i + pairs], 1.f);
    const float ac = mean ? gc / nc : gc, ar = mean ? gr / nr : gr;
    value[i] = go[i] * (ac - p.alpha / nc);
    value[i + pairs] = go[i] * ar;
  }
  const MaskedRows mr = masked_rows(pol, mask);
  void* pg = gx.mutable_data_ptr();
  const float* pv = value.data();
  const auto& k = best_kernels();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(steps, 1)),
                   [&](int64_t r0, int64_t r1) { k.masked_fill(mr, pg, pv, false, r0, r1); });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("ref_free_tokens_fwd", &ref_free_tokens_fwd);
  m.impl("ref_free_tokens_bwd", &ref_free_tokens_bwd);
}

}  // namespace fastalign::cpu
