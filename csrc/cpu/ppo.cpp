// CPU implementations of fastalign::ppo_policy_loss_{fwd,bwd} and fastalign::ppo_value_loss_{fwd,bwd}.
//
// Forward: one pass over the tokens (two for the sequence-level gspo / geo_mean: the row's ratio
// first), rows in parallel (at::parallel_for over B); each row writes its own partial sums (fp32
// vector lanes, added in lane order) and one partial max into a [B, 9] buffer, which one
// thread then reduces in row order (in double), so the result does not depend on the number of
// threads. The per-token math (csrc/cpu/isa/ppo_lanes.h, compiled per ISA and reached through the
// kernel table of dispatch.h) mirrors kernels/reference.py op by op, including the way autograd
// splits gradients at ties of max/min (half to each side) and passes them at clamp boundaries
// (inclusive), so the fused backward equals autograd of the reference.
//
// Aggregation (see fastalign/ops/ppo.py): loss = sum_b w_b * sum_{t valid} l_bt, with a per-row
// weight w_b that depends on agg (0 for rows without valid tokens); the forward also returns w_b,
// so the backward is grad_b,t = g * w_b * dl_bt/dx_bt without any reduction.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "dispatch.h"
#include "mask.h"

namespace fastalign::cpu {
namespace {

// agg codes, as fastalign/ops/ppo.py passes them
enum Agg : int64_t { kTokenMean = 0, kSeqMeanTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSumNorm = 3 };
constexpr int kParts = kPpoParts;

// Reduces the [B, kParts] row partials in row order into out = (loss, stat1/N, ..., stat6/N,
// max of stat7) and the per-row weights w_b (already times `scale`).
constexpr int kStats = kParts - 2;  // out = loss + kStats statistics

void finalize(const std::vector<float>& parts, int64_t batch, int64_t steps, int64_t agg, double global_count,
              double horizon, double scale, float* out, float* row_w) {
  double n_tok = 0, n_seq = 0, total = 0, st[kStats] = {};
  for (int64_t b = 0; b < batch; ++b) {
    const float* p = &parts[b * kParts];
    n_tok += p[1];
    n_seq += p[1] > 0;
    // seq-mean-token-mean: fp32 division per row, as the reference
    total += agg == kSeqMeanTokenMean ? (p[1] > 0 ? static_cast<float>(p[0]) / static_cast<float>(p[1]) : 0.0) : p[0];
    for (int k = 0; k < kStats; ++k) {
      const double v = p[2 + k];
      if (2 + k != kPpoMaxPart) {
        st[k] += v;
      } else if (b == 0 || v > st[k] || v != v) {  // NaN-propagating max (torch's amax)
        st[k] = st[k] != st[k] ? st[k] : v;
      }
    }
  }
  const double count = global_count >= 0 ? global_count : (agg == kTokenMean ? n_tok : n_seq);
  double norm = 0;  // d loss / d (row sum) for a row with valid tokens (before / n_b)
  const double h = horizon > 0 ? horizon : std::max<double>(static_cast<double>(steps), 1.0);  // T = 0: no tokens
  if (count > 0) norm = scale / count / (agg == kSeqMeanTokenSumNorm ? h : 1.0);
  out[0] = static_cast<float>(total * norm);
  for (int k = 0; k < kStats; ++k)
    out[1 + k] = 2 + k == kPpoMaxPart ? static_cast<float>(st[k]) : n_tok > 0 ? static_cast<float>(st[k] / n_tok) : 0.f;
  for (int64_t b = 0; b < batch; ++b) {
    const double n_b = parts[b * kParts + 1];
    row_w[b] = n_b > 0 ? static_cast<float>(agg == kSeqMeanTokenMean ? norm / n_b : norm) : 0.f;
  }
}

int64_t grain_for(int64_t steps) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(steps, 1)); }

// The forward both losses share, once their arguments are checked: the kernel table's row kernel
// `rows` over [B, T] rows in parallel, then finalize (row order). `scale` multiplies the loss.
template <typename Params, typename Rows>
std::tuple<at::Tensor, at::Tensor> run_fwd(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& z_in,
                                           const at::Tensor& mask_in, const Params& p, Rows rows, int64_t agg,
                                           double global_count, double horizon, double scale) {
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), z = z_in.contiguous(), mask = mask_in.contiguous();
  const int64_t batch = x.size(0), steps = x.size(1);
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty({kStats + 1}, opts);
  at::Tensor row_w = at::empty({batch}, opts);
  std::vector<float> parts(batch * kParts, 0.f);
  const TokenInputs in{masked_rows(x, mask), x.const_data_ptr(), y.const_data_ptr(), z.const_data_ptr()};
  at::parallel_for(0, batch, grain_for(steps), [&](int64_t b0, int64_t b1) { rows(in, p, parts.data(), b0, b1); });
  finalize(parts, batch, steps, agg, global_count, horizon, scale, out.data_ptr<float>(), row_w.data_ptr<float>());
  return {out, row_w};
}

// The backward both losses share: grad[b, t] = grad_out[0] * row_w[b] * dl_bt/dx_bt, by the row
// kernel `rows`, in x's dtype.
template <typename Params, typename Rows>
at::Tensor run_bwd(const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& z_in,
                   const at::Tensor& mask_in, const at::Tensor& row_w_in, const Params& p, Rows rows) {
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), z = z_in.contiguous(), mask = mask_in.contiguous(),
                   row_w = row_w_in.to(at::kFloat).contiguous();
  const int64_t batch = x.size(0), steps = x.size(1);
  at::Tensor grad = at::empty({batch, steps}, x.options());
  if (grad.numel() == 0) return grad;
  const float g = grad_out.reshape(-1)[0].item<float>();
  const TokenInputs in{masked_rows(x, mask), x.const_data_ptr(), y.const_data_ptr(), z.const_data_ptr()};
  const float* w = row_w.const_data_ptr<float>();
  void* gx = grad.mutable_data_ptr();
  at::parallel_for(0, batch, grain_for(steps), [&](int64_t b0, int64_t b1) { rows(in, p, w, g, gx, b0, b1); });
  return grad;
}

// ---- policy loss ------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd(const at::Tensor& logprobs_in, const at::Tensor& old_in,
                                                       const at::Tensor& adv_in, const at::Tensor& mask_in,
                                                       double clip_lo, double clip_hi, double dual_clip, int64_t agg,
                                                       double global_count, double horizon) {
  checks::ppo_inputs("ppo_policy_loss", logprobs_in, old_in, adv_in, mask_in, agg);
  checks::policy_params("ppo_policy_loss", clip_lo, clip_hi, dual_clip);
  checks::agg_args("ppo_policy_loss", global_count, horizon);
  const PolicyParams p{static_cast<float>(clip_lo), static_cast<float>(clip_hi), static_cast<float>(dual_clip),
                       dual_clip > 0};
  return run_fwd(logprobs_in, old_in, adv_in, mask_in, p, best_kernels().ppo_policy_fwd, agg, global_count, horizon,
                 1.0);
}

at::Tensor ppo_policy_loss_bwd(const at::Tensor& grad_out, const at::Tensor& logprobs_in, const at::Tensor& old_in,
                               const at::Tensor& adv_in, const at::Tensor& mask_in, const at::Tensor& row_w_in,
                               double clip_lo, double clip_hi, double dual_clip) {
  checks::ppo_inputs("ppo_policy_loss_bwd", logprobs_in, old_in, adv_in, mask_in);
  checks::policy_params("ppo_policy_loss_bwd", clip_lo, clip_hi, dual_clip);
  checks::ppo_bwd_args("ppo_policy_loss_bwd", grad_out, logprobs_in, row_w_in);
  const PolicyParams p{static_cast<float>(clip_lo), static_cast<float>(clip_hi), static_cast<float>(dual_clip),
                       dual_clip > 0};
  return run_bwd(grad_out, logprobs_in, old_in, adv_in, mask_in, row_w_in, p, best_kernels().ppo_policy_bwd);
}

// ---- policy_loss's reinforce / cispo / sapo / gspo / geo_mean (fastalign/ops/policy_loss_fused.py) ----

PgParams pg_params(const char* op, int64_t kind, double a, double b) {
  checks::pg_params(op, kind, a, b);
  return PgParams{static_cast<int32_t>(kind), static_cast<float>(a), static_cast<float>(b)};
}

std::tuple<at::Tensor, at::Tensor> pg_policy_loss_fwd(const at::Tensor& logprobs_in, const at::Tensor& old_in,
                                                      const at::Tensor& adv_in, const at::Tensor& mask_in,
                                                      int64_t kind, double a, double b, int64_t agg,
                                                      double global_count, double horizon) {
  checks::ppo_inputs("pg_policy_loss", logprobs_in, old_in, adv_in, mask_in, agg);
  checks::agg_args("pg_policy_loss", global_count, horizon);
  return run_fwd(logprobs_in, old_in, adv_in, mask_in, pg_params("pg_policy_loss", kind, a, b),
                 best_kernels().pg_policy_fwd, agg, global_count, horizon, 1.0);
}

at::Tensor pg_policy_loss_bwd(const at::Tensor& grad_out, const at::Tensor& logprobs_in, const at::Tensor& old_in,
                              const at::Tensor& adv_in, const at::Tensor& mask_in, const at::Tensor& row_w_in,
                              int64_t kind, double a, double b) {
  checks::ppo_inputs("pg_policy_loss_bwd", logprobs_in, old_in, adv_in, mask_in);
  checks::ppo_bwd_args("pg_policy_loss_bwd", grad_out, logprobs_in, row_w_in);
  return run_bwd(grad_out, logprobs_in, old_in, adv_in, mask_in, row_w_in, pg_params("pg_policy_loss_bwd", kind, a, b),
                 best_kernels().pg_policy_bwd);
}

// ---- value loss -------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd(const at::Tensor& values_in, const at::Tensor& old_in,
                                                      const at::Tensor& returns_in, const at::Tensor& mask_in,
                                                      double clip, int64_t agg, double global_count, double horizon) {
  checks::ppo_inputs("ppo_value_loss", values_in, old_in, returns_in, mask_in, agg);
  checks::value_clip("ppo_value_loss", clip);
  checks::agg_args("ppo_value_loss", global_count, horizon);
  // loss = 0.5 * agg(...): the 0.5 rides on the row weights
  return run_fwd(values_in, old_in, returns_in, mask_in, ValueParams{static_cast<float>(clip)},
                 best_kernels().ppo_value_fwd, agg, global_count, horizon, 0.5);
}

at::Tensor ppo_value_loss_bwd(const at::Tensor& grad_out, const at::Tensor& values_in, const at::Tensor& old_in,
                              const at::Tensor& returns_in, const at::Tensor& mask_in, const at::Tensor& row_w_in,
                              double clip) {
  checks::ppo_inputs("ppo_value_loss_bwd", values_in, old_in, returns_in, mask_in);
  checks::value_clip("ppo_value_loss_bwd", clip);
  checks::ppo_bwd_args("ppo_value_loss_bwd", grad_out, values_in, row_w_in);
  return run_bwd(grad_out, values_in, old_in, returns_in, mask_in, row_w_in, ValueParams{static_cast<float>(clip)},
                 best_kernels().ppo_value_bwd);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd);
  m.impl("pg_policy_loss_fwd", &pg_policy_loss_fwd);
  m.impl("pg_policy_loss_bwd", &pg_policy_loss_bwd);
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &ppo_value_loss_bwd);
}

}  // namespace fastalign::cpu
