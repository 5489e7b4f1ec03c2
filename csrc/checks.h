// Host-side argument checks shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) implementations of
// one op, so that both refuse bad input with the same message. The Python wrappers validate
// first with friendlier errors; these guard direct calls of torch.ops.fastalign.*. Limits that
// only one backend has (32-bit grid sizes on CUDA) stay with that backend.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace fastalign::checks {

inline bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// A tensor whose pointer the host hands to the kernels (an incoming gradient, a saved output) must
// be on their device: the dispatcher routes on the other arguments, and a pointer to another
// device would be an illegal address, not an error.
inline void same_device(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                        const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name, " on ",
              like.device());
}

// The mask dtypes a device's kernels read (GAE, PPO losses, DPO head): the CPU ones read bool/uint8,
// int32, int64 and float32 masks as they are (nonzero = valid), so a caller's float or attention
// mask costs no conversion pass; the CUDA ones take bool (the Python wrappers convert).
inline void mask_dtype(const char* op, const at::Tensor& mask) {
  const at::ScalarType t = mask.scalar_type();
  const bool cpu_ok = t == at::kByte || t == at::kInt || t == at::kLong || t == at::kFloat;
  TORCH_CHECK(t == at::kBool || (mask.device().is_cpu() && cpu_ok), op,
              ": mask must be bool (or, on the CPU, uint8, int32, int64 or float32), got ", t, " on ", mask.device());
}

// ---- gather_logprobs ---------------------------------------------------------------------------
// op: "gather_logprobs" in the forward, "gather_logprobs_bwd" in the backward, on every backend.

// The temperature: finite, > 0, and with 1/T finite and > 0 in fp32 (the kernels scale by it).
inline void temperature(const char* op, double t) {
  const float inv = static_cast<float>(1.0 / t);
  TORCH_CHECK(t > 0.0 && std::isfinite(t) && std::isfinite(inv) && inv > 0.f, op,
              ": temperature must be finite and > 0, with 1/temperature finite and > 0 in fp32, got ", t);
}

// logits [N, V] of a float dtype with unit stride along V (rows may be strided), labels [N] int64
// on the same device, and the temperature.
inline void logits_labels(const char* op, const at::Tensor& logits, const at::Tensor& labels, double temperature_) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) <= 1, op,
              ": logits must have unit stride in the vocabulary dim, got strides ", logits.strides());
  TORCH_CHECK(is_float(logits.scalar_type()), op, ": logits must be float32, bfloat16 or float16, got ",
              logits.scalar_type());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels are on ", labels.device(), " but logits on ",
              logits.device());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels must be [N] = [",
              logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64 here, got ", labels.scalar_type());
  temperature(op, temperature_);
}

// The forward of N > 0 rows needs V > 0 (a row's log-sum-exp over nothing is undefined).
inline void vocab_nonempty(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) > 0, op, ": the vocabulary dim of logits is empty");
}

// Every label in [0, V) or ignore_index. Only where the labels are host memory (the CPU kernels):
// both CPU passes index the row at the label (the backward writes there), so this guards memory,
// not just the result; O(N), negligible next to the O(N V) kernels. (On CUDA the Python wrapper
// checks, as a check here would need a device sync.)
inline void label_range(const char* op, const at::Tensor& labels_contiguous, int64_t vocab, int64_t ignore_index) {
  const int64_t* lab = labels_contiguous.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < labels_contiguous.numel(); ++i) {
    TORCH_CHECK_INDEX(lab[i] == ignore_index || (lab[i] >= 0 && lab[i] < vocab), op, ": labels[", i, "] = ", lab[i],
                      " is outside [0, ", vocab, ") and is not ignore_index (", ignore_index, ")");
  }
}

// A per-row input of the backward ([N] elements, any float dtype, on the logits' device) as
// contiguous fp32.
inline at::Tensor row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  same_device(op, name, t, "logits", logits);
  TORCH_CHECK(t.numel() == logits.size(0), op, ": ", name, " must have N = ", logits.size(0), " elements, got ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", t.scalar_type());
  return t.reshape({-1}).to(at::kFloat).contiguous();
}

// The forward's saved (max, log-sum-exp) per row: fp32 [N, 2] on the logits' device.
inline void row_stats(const char* op, const at::Tensor& stats, const at::Tensor& logits) {
  TORCH_CHECK(stats.device() == logits.device() && stats.dim() == 2 && stats.size(0) == logits.size(0) &&
                  stats.size(1) == 2 && stats.scalar_type() == at::kFloat,
              op, ": row_stats must be fp32 [N, 2] on the logits' device, got ", stats.scalar_type(), " ",
              stats.sizes(), " on ", stats.device());
}

// Whether the entropy output received a gradient; its backward then needs the entropy too.
inline bool entropy_grad(const char* op, const std::optional<at::Tensor>& grad_entropy,
                         const std::optional<at::Tensor>& entropy) {
  const bool used = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!used || (entropy.has_value() && entropy->defined()), op, ": grad_entropy given without entropy");
  return used;
}

// ---- gae ----------------------------------------------------------------------------------------

inline void gae_args(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                     double lam) {
  TORCH_CHECK(rewards.dim() == 2, "gae: rewards must be 2-D [B, T], got ", rewards.sizes());
  TORCH_CHECK(values.sizes() == rewards.sizes(), "gae: values must have the shape of rewards ", rewards.sizes(),
              ", got ", values.sizes());
  TORCH_CHECK(mask.sizes() == rewards.sizes(), "gae: mask must have the shape of rewards ", rewards.sizes(), ", got ",
              mask.sizes());
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "gae: rewards and values must have one dtype, got ",
              rewards.scalar_type(), " and ", values.scalar_type());
  TORCH_CHECK(is_float(rewards.scalar_type()), "gae: rewards and values must be float32, bfloat16 or float16, got ",
              rewards.scalar_type());
  mask_dtype("gae", mask);
  TORCH_CHECK(values.device() == rewards.device() && mask.device() == rewards.device(),
              "gae: rewards, values and mask must be on one device");
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, "gae: gamma must be in [0, 1], got ", gamma);
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "gae: lam must be in [0, 1], got ", lam);
}

// ---- ppo_policy_loss / ppo_value_loss -------------------------------------------------------------

// x: the differentiated input (log-probs or values), y, z: the two other float inputs; agg: the
// aggregation code (the backward passes none: it gets per-row weights instead).
inline void ppo_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& z,
                       const at::Tensor& mask, int64_t agg = 0) {
  TORCH_CHECK(x.dim() == 2, op, ": inputs must be 2-D [B, T], got ", x.sizes());
  TORCH_CHECK(y.sizes() == x.sizes() && z.sizes() == x.sizes() && mask.sizes() == x.sizes(), op,
              ": all inputs must have one shape ", x.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && z.scalar_type() == x.scalar_type(), op,
              ": the three float inputs must have one dtype");
  mask_dtype(op, mask);
  TORCH_CHECK(y.device() == x.device() && z.device() == x.device() && mask.device() == x.device(), op,
              ": all inputs must be on one device");
  TORCH_CHECK(agg >= 0 && agg <= 3, op, ": agg code must be in [0, 3], got ", agg);
  TORCH_CHECK(is_float(x.scalar_type()), op, ": inputs must be float32, bfloat16 or float16, got ", x.scalar_type());
}

// The policy loss's ratio bounds as the kernels take them: clip_lo = 1 - clip_low in [0, 1],
// clip_hi = 1 + clip_high >= 1 (closed: 1 - 1e-20 rounds to 1), dual_clip 0 (off) or > 1, all finite.
inline void policy_params(const char* op, double clip_lo, double clip_hi, double dual_clip) {
  TORCH_CHECK(clip_lo >= 0.0 && clip_lo <= 1.0, op, ": clip_lo (1 - clip_low) must be in [0, 1], got ", clip_lo);
  TORCH_CHECK(clip_hi >= 1.0 && std::isfinite(clip_hi), op, ": clip_hi (1 + clip_high) must be finite and >= 1, got ",
              clip_hi);
  TORCH_CHECK(dual_clip == 0.0 || (dual_clip > 1.0 && std::isfinite(dual_clip)), op,
              ": dual_clip must be 0 (off) or a finite number > 1, got ", dual_clip);
}

// The value loss's clip: <= 0 (off) or a number > 0 that is still > 0 in fp32.
inline void value_clip(const char* op, double clip) {
  TORCH_CHECK(clip <= 0.0 || (std::isfinite(clip) && static_cast<float>(clip) > 0.f), op,
              ": clip must be <= 0 (off) or a finite number > 0 in fp32, got ", clip);
}

// The backward's incoming loss gradient (out[0] is the one that carries it) and the forward's
// per-row weights [B], both on the inputs' device.
inline void ppo_bwd_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_w) {
  same_device(op, "row_weight", row_w, "the inputs", x);
  TORCH_CHECK(row_w.numel() == x.size(0), op, ": row weights must be [B]");
  same_device(op, "grad_out", grad_out, "the inputs", x);
  TORCH_CHECK(grad_out.numel() >= 1, op, ": grad_out must hold the loss gradient");
}

// pg_policy_loss's kind and parameters (fastalign/ops/policy_loss_fused.py kernel_args).
inline void pg_params(const char* op, int64_t kind, double a, double b) {
  TORCH_CHECK(kind >= 0 && kind <= 4, op,
              ": kind must be 0 (reinforce), 1 (cispo), 2 (sapo), 3 (gspo) or 4 (geo_mean), got ", kind);
  if (kind == 1 || kind == 3)
    TORCH_CHECK(a >= 0.0 && a <= 1.0 && std::isfinite(b) && b > 0.0, op, ": ", kind == 1 ? "cispo" : "gspo",
                " needs 0 <= a (1 - clip_low) <= 1 and a finite b (1 + clip_high) > 0, got ", a, ", ", b);
  if (kind == 2)
    TORCH_CHECK(std::isfinite(a) && a > 0.0 && std::isfinite(b) && b > 0.0, op,
                ": sapo needs finite tau_pos, tau_neg > 0, got ", a, ", ", b);
  if (kind == 4)
    TORCH_CHECK(std::isfinite(a) && a >= 0.0 && std::isfinite(b) && b >= 0.0, op,
                ": geo_mean needs finite clip_low, clip_high >= 0, got ", a, ", ", b);
}

// The aggregation's normalisers: global_count < 0 (this call's own count) or >= 0, horizon 0 (T) or > 0.
inline void agg_args(const char* op, double global_count, double horizon) {
  TORCH_CHECK(std::isfinite(global_count), op, ": global_count must be finite (< 0: this call's own count), got ",
              global_count);
  TORCH_CHECK(std::isfinite(horizon) && horizon >= 0.0, op, ": horizon must be finite and >= 0 (0: T), got ", horizon);
}

// ---- preference ---------------------------------------------------------------------------------

// Token log-probs [N, T] and their mask.
inline void token_rows(const char* op, const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 2, op, ": token log-probs must be 2-D [N, T], got ", x.sizes());
  TORCH_CHECK(mask.sizes() == x.sizes(), op, ": mask must have the shape of the token log-probs ", x.sizes(),
              ", got ", mask.sizes());
  mask_dtype(op, mask);
  TORCH_CHECK(mask.device() == x.device(), op, ": mask and token log-probs must be on one device");
  TORCH_CHECK(is_float(x.scalar_type()), op, ": token log-probs must be float32, bfloat16 or float16, got ",
              x.scalar_type());
}

// sequence_logps backward: grad [N] on the log-probs' device.
inline void sequence_logps_grad(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == x.size(0), "sequence_logps: grad must be [N] = [", x.size(0),
              "], got ", grad.sizes());
  same_device("sequence_logps", "grad", grad, "the log-probs", x);
}

inline void dpo_loss_args(const char* op, double beta, int64_t type, double eps) {
  TORCH_CHECK(beta > 0.0 && std::isfinite(beta), op, ": beta must be a finite number > 0, got ", beta);
  TORCH_CHECK(type >= 0 && type <= 3, op, ": loss_type id must be 0..3 (sigmoid, ipo, hinge, robust), got ", type);
  TORCH_CHECK(eps >= 0.0 && eps < 0.5, op, ": label_smoothing must be in [0, 0.5), got ", eps);
}

// The four sequence log-prob vectors of dpo_loss.
inline void dpo_pairs(const at::Tensor& c, const at::Tensor& r, const at::Tensor& rc, const at::Tensor& rr) {
  TORCH_CHECK(c.dim() == 1, "dpo_loss: chosen_logps must be 1-D [B], got ", c.sizes());
  for (const at::Tensor* t : {&r, &rc, &rr}) {
    TORCH_CHECK(t->sizes() == c.sizes(), "dpo_loss: every log-prob input must have the shape of chosen_logps ",
                c.sizes(), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == c.scalar_type(), "dpo_loss: the log-prob inputs must share one dtype here");
    TORCH_CHECK(t->device() == c.device(), "dpo_loss: the log-prob inputs must be on one device");
  }
  TORCH_CHECK(is_float(c.scalar_type()), "dpo_loss: log-probs must be float32, bfloat16 or float16, got ",
              c.scalar_type());
}

// dpo_loss backward: grad [B] on the log-probs' device.
inline void dpo_loss_grad(const at::Tensor& grad, const at::Tensor& chosen) {
  TORCH_CHECK(grad.sizes() == chosen.sizes(), "dpo_loss: grad must be [B], got ", grad.sizes());
  same_device("dpo_loss", "grad", grad, "the log-probs", chosen);
}

// dpo_loss_from_tokens forward: policy and reference token log-probs [2B, T] ([chosen; rejected]).
inline void dpo_tokens_fwd_args(const at::Tensor& pol, const at::Tensor& ref, const at::Tensor& mask, double beta,
                                int64_t type, double eps) {
  token_rows("dpo_loss_from_tokens", pol, mask);
  token_rows("dpo_loss_from_tokens", ref, mask);
  dpo_loss_args("dpo_loss_from_tokens", beta, type, eps);
  TORCH_CHECK(pol.size(0) % 2 == 0, "dpo_loss_from_tokens: the batch must have 2B rows [chosen; rejected], got ",
              pol.size(0));
  TORCH_CHECK(ref.scalar_type() == pol.scalar_type(), "dpo_loss_from_tokens: one dtype for both inputs here");
}

// dpo_loss_from_tokens backward: grad [B], the saved sequence log-probs [2B] and optional grad of them.
inline void dpo_tokens_bwd_args(const at::Tensor& grad, const c10::optional<at::Tensor>& grad_seq,
                                const at::Tensor& pseq, const at::Tensor& rseq, const at::Tensor& pol,
                                const at::Tensor& mask, double beta, int64_t type, double eps) {
  token_rows("dpo_loss_from_tokens", pol, mask);
  dpo_loss_args("dpo_loss_from_tokens", beta, type, eps);
  const int64_t rows = pol.size(0);
  TORCH_CHECK(rows % 2 == 0 && grad.dim() == 1 && grad.size(0) == rows / 2 && pseq.dim() == 1 &&
                  pseq.size(0) == rows && rseq.sizes() == pseq.sizes(),
              "dpo_loss_from_tokens: backward shapes do not match the batch");
  TORCH_CHECK(!grad_seq.has_value() || grad_seq->sizes() == pseq.sizes(),
              "dpo_loss_from_tokens: grad of the sequence log-probs must be [2B]");
  constexpr const char* op = "dpo_loss_from_tokens";
  same_device(op, "grad", grad, "the log-probs", pol);
  same_device(op, "policy sequence log-probs", pseq, "the log-probs", pol);
  same_device(op, "reference sequence log-probs", rseq, "the log-probs", pol);
  if (grad_seq.has_value()) same_device(op, "grad of the sequence log-probs", *grad_seq, "the log-probs", pol);
}

// The general DPO ops (dpo_multi, dpo_multi_tokens): 1..16 per-pair loss type ids 0..12 with one
// weight each, the f-divergence id 0..3, DiscoPOP's tau > 0; exo_pair needs label_smoothing > 0.
inline void dpo_multi_args(const char* op, double beta, at::IntArrayRef types, at::ArrayRef<double> weights,
                           double eps, int64_t fdiv, double tau) {
  TORCH_CHECK(beta > 0.0 && std::isfinite(beta), op, ": beta must be a finite number > 0, got ", beta);
  TORCH_CHECK(!types.empty() && types.size() <= 16, op, ": between 1 and 16 loss types, got ", types.size());
  TORCH_CHECK(weights.size() == types.size(), op, ": one loss weight per loss type (", types.size(), "), got ",
              weights.size());
  for (size_t k = 0; k < types.size(); ++k) {
    TORCH_CHECK(types[k] >= 0 && types[k] <= 12, op, ": loss type ids must be 0..12, got ", types[k]);
    TORCH_CHECK(std::isfinite(weights[k]), op, ": loss weights must be finite, got ", weights[k]);
    TORCH_CHECK(types[k] != 4 || eps > 0.0, op, ": exo_pair needs label_smoothing > 0, got ", eps);
  }
  TORCH_CHECK(eps >= 0.0 && eps < 0.5, op, ": label_smoothing must be in [0, 0.5), got ", eps);
  TORCH_CHECK(fdiv >= 0 && fdiv <= 3, op, ": f_divergence id must be 0..3, got ", fdiv);
  TORCH_CHECK(tau > 0.0 && std::isfinite(tau), op, ": discopop_tau must be a finite number > 0, got ", tau);
}

// Optional token counts [2B] fp32 ([chosen; rejected]) on the log-probs' device.
inline void dpo_lengths(const char* op, const c10::optional<at::Tensor>& lengths, int64_t rows,
                        const at::Tensor& like) {
  if (!lengths.has_value()) return;
  TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == rows && lengths->scalar_type() == at::kFloat, op,
              ": lengths must be fp32 [2B] = [", rows, "], got ", lengths->scalar_type(), " ", lengths->sizes());
  same_device(op, "lengths", *lengths, "the log-probs", like);
}

// ---- advantage estimators -------------------------------------------------------------------------

// outcome_advantage: rewards [B, K] (K >= 0 rows summed into the score), mask [B, T], group [B]
// int64 (dense ids; their range is checked where they are host memory), kind 0..4.
inline void outcome_advantage_args(const at::Tensor& rewards, const at::Tensor& mask, const at::Tensor& group,
                                   int64_t kind, double epsilon) {
  constexpr const char* op = "outcome_advantage";
  TORCH_CHECK(mask.dim() == 2, op, ": mask must be 2-D [B, T], got ", mask.sizes());
  TORCH_CHECK(rewards.dim() == 2 && rewards.size(0) == mask.size(0), op, ": rewards must be 2-D [B, K] with B = ",
              mask.size(0), ", got ", rewards.sizes());
  TORCH_CHECK(is_float(rewards.scalar_type()), op, ": rewards must be float32, bfloat16 or float16, got ",
              rewards.scalar_type());
  TORCH_CHECK(group.dim() == 1 && group.size(0) == mask.size(0), op, ": group must be [B] = [", mask.size(0),
              "], got ", group.sizes());
  TORCH_CHECK(group.scalar_type() == at::kLong, op, ": group must be int64, got ", group.scalar_type());
  mask_dtype(op, mask);
  TORCH_CHECK(rewards.device() == mask.device() && group.device() == mask.device(), op,
              ": rewards, mask and group must be on one device");
  TORCH_CHECK(kind >= 0 && kind <= 4, op,
              ": kind must be 0..4 (grpo, rloo, opo, grpo_passk, reinforce_plus_plus_baseline), got ", kind);
  TORCH_CHECK(std::isfinite(epsilon) && epsilon > 0.0, op, ": epsilon must be finite and > 0, got ", epsilon);
}

// return_advantage: rewards and mask [B, T], baselines [B] (remax) or undefined, kind 0..1.
inline void return_advantage_args(const at::Tensor& rewards, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& baselines, double gamma, int64_t kind) {
  constexpr const char* op = "return_advantage";
  TORCH_CHECK(rewards.dim() == 2, op, ": rewards must be 2-D [B, T], got ", rewards.sizes());
  TORCH_CHECK(mask.sizes() == rewards.sizes(), op, ": mask must have the shape of rewards ", rewards.sizes(),
              ", got ", mask.sizes());
  TORCH_CHECK(is_float(rewards.scalar_type()), op, ": rewards must be float32, bfloat16 or float16, got ",
              rewards.scalar_type());
  mask_dtype(op, mask);
  TORCH_CHECK(mask.device() == rewards.device(), op, ": rewards and mask must be on one device");
  TORCH_CHECK(kind == 0 || kind == 1, op, ": kind must be 0 (reinforce_plus_plus) or 1 (remax), got ", kind);
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, op, ": gamma must be in [0, 1], got ", gamma);
  const bool has = baselines.has_value() && baselines->defined();
  TORCH_CHECK(kind == 0 || has, op, ": remax (kind 1) needs baselines [B]");
  if (has) {
    TORCH_CHECK(baselines->dim() == 1 && baselines->size(0) == rewards.size(0), op, ": baselines must be [B] = [",
                rewards.size(0), "], got ", baselines->sizes());
    TORCH_CHECK(baselines->scalar_type() == at::kFloat, op, ": baselines must be float32, got ",
                baselines->scalar_type());
    TORCH_CHECK(baselines->device() == rewards.device(), op, ": baselines must be on the rewards' device");
  }
}

}  // namespace fastalign::checks
