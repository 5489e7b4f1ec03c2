// CPU implementations of fastalign::ppo_policy_loss_{fwd,bwd} and fastalign::ppo_value_loss_{fwd,bwd}.
//
// Forward: one pass over the tokens, rows in parallel (at::parallel_for over B); each row writes
// its own partial sums (double) into a [B, 5] buffer, which one thread then reduces in row order,
// so the result does not depend on the number of threads. The per-token math (ppo_math.h-style
// inline functions below) mirrors kernels/reference.py op by op, including the way autograd
// splits gradients at ties of max/min (half to each side) and passes them at clamp boundaries
// (inclusive), so the fused backward equals autograd of the reference exactly, not just nearly.
//
// Aggregation (see fastalign/ops/ppo.py): loss = sum_b w_b * sum_{t valid} l_bt, with a per-row
// weight w_b that depends on agg (0 for rows without valid tokens); the forward also returns w_b,
// so the backward is grad_b,t = g * w_b * dl_bt/dx_bt without any reduction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace fastalign::cpu {
namespace {

// agg codes, as fastalign/ops/ppo.py passes them
enum Agg : int64_t { kTokenMean = 0, kSeqMeanTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSumNorm = 3 };
constexpr int kParts = 5;  // per-row partials: loss sum, valid count, stat1, stat2, stat3 sums

// torch.maximum/minimum backward: the share of the gradient that goes to `self` (NaN: all of it).
inline float max_share(float self, float other) { return self < other ? 0.f : (self == other ? 0.5f : 1.f); }
inline float min_share(float self, float other) { return self > other ? 0.f : (self == other ? 0.5f : 1.f); }
// torch.maximum / torch.minimum / torch.clamp forward, NaN-propagating like torch.
inline float tmax(float a, float b) { return (a >= b || a != a) ? a : b; }
inline float tmin(float a, float b) { return (a <= b || a != a) ? a : b; }
inline float tclamp(float x, float lo, float hi) { return tmin(tmax(x, lo), hi); }
inline bool inside(float x, float lo, float hi) { return x >= lo && x <= hi; }  // clamp passes the gradient

struct PolicyParams {
  float lo, hi, dual;  // 1 - clip_low, 1 + clip_high, dual-clip c (used when use_dual)
  bool use_dual;
};

// Per-token policy loss; sets the clipfrac / clipfrac_lower indicators.
inline float policy_token(float logp, float old, float a, const PolicyParams& p, bool& clipped, bool& lower) {
  const float ratio = std::exp(tclamp(logp - old, -20.f, 20.f));
  const float na = -a;
  const float l1 = na * ratio, l2 = na * tclamp(ratio, p.lo, p.hi);
  float m = tmax(l1, l2);
  clipped = l2 > l1;
  lower = false;
  if (p.use_dual && a < 0.f) {
    const float l3 = na * p.dual;
    lower = m > l3;
    m = tmin(m, l3);
  }
  return m;
}

// d(policy_token)/d(logp), times g.
inline float policy_token_grad(float logp, float old, float a, const PolicyParams& p, float g) {
  const float d = logp - old;
  const float ratio = std::exp(tclamp(d, -20.f, 20.f));
  const float na = -a;
  const float rc = tclamp(ratio, p.lo, p.hi);
  const float l1 = na * ratio, l2 = na * rc;
  float gm = g;
  if (p.use_dual && a < 0.f) gm *= min_share(tmax(l1, l2), na * p.dual);
  const float g1 = gm * max_share(l1, l2), g2 = gm * max_share(l2, l1);
  float gr = na * g1;
  if (inside(ratio, p.lo, p.hi)) gr += na * g2;
  const float gd = gr * ratio;  // d exp(x)/dx = exp(x)
  return inside(d, -20.f, 20.f) ? gd : 0.f;
}

struct ValueParams {
  float clip;  // > 0: clipped loss; <= 0: plain squared error
};

inline float value_token(float v, float vo, float r, const ValueParams& p, bool& clipped) {
  const float e1 = v - r;
  const float s1 = e1 * e1;
  clipped = false;
  if (p.clip <= 0.f) return s1;
  const float e2 = tclamp(v, vo - p.clip, vo + p.clip) - r;
  const float s2 = e2 * e2;
  clipped = s2 > s1;
  return tmax(s1, s2);
}

inline float value_token_grad(float v, float vo, float r, const ValueParams& p, float g) {
  const float e1 = v - r;
  if (p.clip <= 0.f) return g * 2.f * e1;
  const float lo = vo - p.clip, hi = vo + p.clip;
  const float e2 = tclamp(v, lo, hi) - r;
  const float s1 = e1 * e1, s2 = e2 * e2;
  float gv = g * max_share(s1, s2) * 2.f * e1;
  if (inside(v, lo, hi)) gv += g * max_share(s2, s1) * 2.f * e2;
  return gv;
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 2, op, ": inputs must be 2-D [B, T], got ", x.sizes());
  TORCH_CHECK(y.sizes() == x.sizes() && z.sizes() == x.sizes() && mask.sizes() == x.sizes(), op,
              ": all inputs must have one shape ", x.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && z.scalar_type() == x.scalar_type(), op,
              ": the three float inputs must have one dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool here, got ", mask.scalar_type());
}

// Reduces the [B, kParts] row partials in row order into out = (loss, stat1/N, stat2/N, stat3/N)
// and the per-row weights w_b (already times `scale`).
void finalize(const std::vector<double>& parts, int64_t batch, int64_t steps, int64_t agg, double global_count,
              double horizon, double scale, float* out, float* row_w) {
  double n_tok = 0, n_seq = 0, total = 0, st[3] = {0, 0, 0};
  for (int64_t b = 0; b < batch; ++b) {
    const double* p = &parts[b * kParts];
    n_tok += p[1];
    n_seq += p[1] > 0;
    // seq-mean-token-mean: fp32 division per row, as the reference
    total += agg == kSeqMeanTokenMean ? (p[1] > 0 ? static_cast<float>(p[0]) / static_cast<float>(p[1]) : 0.0) : p[0];
    for (int k = 0; k < 3; ++k) st[k] += p[2 + k];
  }
  const double count = global_count >= 0 ? global_count : (agg == kTokenMean ? n_tok : n_seq);
  double norm = 0;  // d loss / d (row sum) for a row with valid tokens (before / n_b)
  if (count > 0) norm = scale / count / (agg == kSeqMeanTokenSumNorm ? (horizon > 0 ? horizon : steps) : 1.0);
  out[0] = static_cast<float>(total * norm);
  for (int k = 0; k < 3; ++k) out[1 + k] = n_tok > 0 ? static_cast<float>(st[k] / n_tok) : 0.f;
  for (int64_t b = 0; b < batch; ++b) {
    const double n_b = parts[b * kParts + 1];
    row_w[b] = n_b > 0 ? static_cast<float>(agg == kSeqMeanTokenMean ? norm / n_b : norm) : 0.f;
  }
}

void check_agg(const char* op, int64_t agg) {
  TORCH_CHECK(agg >= kTokenMean && agg <= kSeqMeanTokenSumNorm, op, ": agg code must be in [0, 3], got ", agg);
}

int64_t grain_for(int64_t steps) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(steps, 1)); }

// ---- policy loss ------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd(const at::Tensor& logprobs_in, const at::Tensor& old_in,
                                                       const at::Tensor& adv_in, const at::Tensor& mask_in,
                                                       double clip_lo, double clip_hi, double dual_clip, int64_t agg,
                                                       double global_count, double horizon) {
  check_inputs("ppo_policy_loss", logprobs_in, old_in, adv_in, mask_in);
  check_agg("ppo_policy_loss", agg);
  const at::Tensor lp = logprobs_in.contiguous(), old = old_in.contiguous(), adv = adv_in.contiguous(),
                   mask = mask_in.contiguous();
  const int64_t batch = lp.size(0), steps = lp.size(1);
  auto opts = lp.options().dtype(at::kFloat);
  at::Tensor out = at::empty({4}, opts);
  at::Tensor row_w = at::empty({batch}, opts);
  std::vector<double> parts(batch * kParts, 0.0);
  const PolicyParams p{static_cast<float>(clip_lo), static_cast<float>(clip_hi), static_cast<float>(dual_clip),
                       dual_clip > 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "ppo_policy_loss_fwd", [&] {
    const scalar_t* x = lp.data_ptr<scalar_t>();
    const scalar_t* xo = old.data_ptr<scalar_t>();
    const scalar_t* a = adv.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    at::parallel_for(0, batch, grain_for(steps), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double loss = 0, n = 0, clip = 0, lower = 0, kl = 0;
        for (int64_t i = b * steps, e = i + steps; i < e; ++i) {  // 64-bit offsets
          if (!m[i]) continue;
          const float xi = static_cast<float>(x[i]), oi = static_cast<float>(xo[i]);
          bool c, lw;
          loss += policy_token(xi, oi, static_cast<float>(a[i]), p, c, lw);
          n += 1;
          clip += c;
          lower += lw;
          kl += oi - xi;
        }
        double* q = &parts[b * kParts];
        q[0] = loss, q[1] = n, q[2] = clip, q[3] = lower, q[4] = kl;
      }
    });
  });
  finalize(parts, batch, steps, agg, global_count, horizon, 1.0, out.data_ptr<float>(), row_w.data_ptr<float>());
  return {out, row_w};
}

at::Tensor ppo_policy_loss_bwd(const at::Tensor& grad_out, const at::Tensor& logprobs_in, const at::Tensor& old_in,
                               const at::Tensor& adv_in, const at::Tensor& mask_in, const at::Tensor& row_w_in,
                               double clip_lo, double clip_hi, double dual_clip) {
  check_inputs("ppo_policy_loss_bwd", logprobs_in, old_in, adv_in, mask_in);
  const at::Tensor lp = logprobs_in.contiguous(), old = old_in.contiguous(), adv = adv_in.contiguous(),
                   mask = mask_in.contiguous(), row_w = row_w_in.to(at::kFloat).contiguous();
  const int64_t batch = lp.size(0), steps = lp.size(1);
  TORCH_CHECK(row_w.numel() == batch, "ppo_policy_loss_bwd: row weights must be [B]");
  TORCH_CHECK(grad_out.numel() >= 1, "ppo_policy_loss_bwd: grad_out must hold the loss gradient");
  at::Tensor grad = at::empty({batch, steps}, lp.options());
  if (grad.numel() == 0) return grad;
  const float g = grad_out.reshape(-1)[0].item<float>();
  const PolicyParams p{static_cast<float>(clip_lo), static_cast<float>(clip_hi), static_cast<float>(dual_clip),
                       dual_clip > 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "ppo_policy_loss_bwd", [&] {
    const scalar_t* x = lp.data_ptr<scalar_t>();
    const scalar_t* xo = old.data_ptr<scalar_t>();
    const scalar_t* a = adv.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    const float* w = row_w.data_ptr<float>();
    scalar_t* gx = grad.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(steps), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float gb = g * w[b];
        for (int64_t i = b * steps, e = i + steps; i < e; ++i) {
          gx[i] = m[i] ? static_cast<scalar_t>(policy_token_grad(static_cast<float>(x[i]), static_cast<float>(xo[i]),
                                                                 static_cast<float>(a[i]), p, gb))
                       : static_cast<scalar_t>(0.f);
        }
      }
    });
  });
  return grad;
}

// ---- value loss -------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd(const at::Tensor& values_in, const at::Tensor& old_in,
                                                      const at::Tensor& returns_in, const at::Tensor& mask_in,
                                                      double clip, int64_t agg, double global_count, double horizon) {
  check_inputs("ppo_value_loss", values_in, old_in, returns_in, mask_in);
  check_agg("ppo_value_loss", agg);
  const at::Tensor v = values_in.contiguous(), old = old_in.contiguous(), ret = returns_in.contiguous(),
                   mask = mask_in.contiguous();
  const int64_t batch = v.size(0), steps = v.size(1);
  auto opts = v.options().dtype(at::kFloat);
  at::Tensor out = at::empty({4}, opts);
  at::Tensor row_w = at::empty({batch}, opts);
  std::vector<double> parts(batch * kParts, 0.0);
  const ValueParams p{static_cast<float>(clip)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "ppo_value_loss_fwd", [&] {
    const scalar_t* x = v.data_ptr<scalar_t>();
    const scalar_t* xo = old.data_ptr<scalar_t>();
    const scalar_t* r = ret.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    at::parallel_for(0, batch, grain_for(steps), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double loss = 0, n = 0, clipped = 0, vsum = 0, mse = 0;
        for (int64_t i = b * steps, e = i + steps; i < e; ++i) {
          if (!m[i]) continue;
          const float vi = static_cast<float>(x[i]), ri = static_cast<float>(r[i]);
          bool c;
          loss += value_token(vi, static_cast<float>(xo[i]), ri, p, c);
          n += 1;
          clipped += c;
          vsum += vi;
          mse += (vi - ri) * (vi - ri);
        }
        double* q = &parts[b * kParts];
        q[0] = loss, q[1] = n, q[2] = clipped, q[3] = vsum, q[4] = mse;
      }
    });
  });
  // loss = 0.5 * agg(...): the 0.5 rides on the row weights
  finalize(parts, batch, steps, agg, global_count, horizon, 0.5, out.data_ptr<float>(), row_w.data_ptr<float>());
  return {out, row_w};
}

at::Tensor ppo_value_loss_bwd(const at::Tensor& grad_out, const at::Tensor& values_in, const at::Tensor& old_in,
                              const at::Tensor& returns_in, const at::Tensor& mask_in, const at::Tensor& row_w_in,
                              double clip) {
  check_inputs("ppo_value_loss_bwd", values_in, old_in, returns_in, mask_in);
  const at::Tensor v = values_in.contiguous(), old = old_in.contiguous(), ret = returns_in.contiguous(),
                   mask = mask_in.contiguous(), row_w = row_w_in.to(at::kFloat).contiguous();
  const int64_t batch = v.size(0), steps = v.size(1);
  TORCH_CHECK(row_w.numel() == batch, "ppo_value_loss_bwd: row weights must be [B]");
  TORCH_CHECK(grad_out.numel() >= 1, "ppo_value_loss_bwd: grad_out must hold the loss gradient");
  at::Tensor grad = at::empty({batch, steps}, v.options());
  if (grad.numel() == 0) return grad;
  const float g = grad_out.reshape(-1)[0].item<float>();
  const ValueParams p{static_cast<float>(clip)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "ppo_value_loss_bwd", [&] {
    const scalar_t* x = v.data_ptr<scalar_t>();
    const scalar_t* xo = old.data_ptr<scalar_t>();
    const scalar_t* r = ret.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    const float* w = row_w.data_ptr<float>();
    scalar_t* gx = grad.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(steps), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float gb = g * w[b];
        for (int64_t i = b * steps, e = i + steps; i < e; ++i) {
          gx[i] = m[i] ? static_cast<scalar_t>(value_token_grad(static_cast<float>(x[i]), static_cast<float>(xo[i]),
                                                                static_cast<float>(r[i]), p, gb))
                       : static_cast<scalar_t>(0.f);
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd);
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &ppo_value_loss_bwd);
}

}  // namespace fastalign::cpu
