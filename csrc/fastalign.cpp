// fastalign._C: the op schemas (registered once, here) and the Python module stub.
//
// Each fused kernel is a pair of ops, <name>_fwd and <name>_bwd, implemented per device in
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(fastalign, CPU)) and csrc/cuda/*.cu
// (TORCH_LIBRARY_IMPL(fastalign, CUDA)). Autograd, fake (meta) implementations and argument
// validation are registered from Python (fastalign/ops/), so every backend shares them.
#include <Python.h>
#include <torch/library.h>

#include "cpu/capability.h"

TORCH_LIBRARY(fastalign, m) {
  // Token log-probabilities: logits [N, V] (row stride free, unit inner stride), labels [N] int64.
  // Returns fp32 (logprobs [N], entropy [N] or [0] when with_entropy is false, row_stats [N, 2]).
  // row_stats = (m, log sum_j exp(z_j - m)) with z = logits / T and m = max_j z_j, so that the
  // backward recomputes log p_j = (z_j - m) - row_stats[1] without the rounding of m + log s.
  m.def(
      "gather_logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, "
      "bool with_entropy) -> (Tensor, Tensor, Tensor)");
  // Gradient w.r.t. logits [N, V] in the logits' dtype; grad_entropy/entropy absent when the
  // entropy output received no gradient.
  m.def(
      "gather_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
      "Tensor labels, Tensor row_stats, Tensor? entropy, float temperature, int ignore_index) -> Tensor");

  // ---- GAE ----
  // rewards, values [B, T] (one float dtype), mask [B, T] bool (true = valid step). Returns fp32
  // (advantages, returns) [B, T]; 0 at masked steps. A reverse scan per row; no gradient.
  m.def("gae_fwd(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");

  // ---- PPO losses ----
  // Inputs [B, T]: three of one float dtype, mask bool (true = valid token). agg: 0 token-mean,
  // 1 seq-mean-token-sum, 2 seq-mean-token-mean, 3 seq-mean-token-sum-norm; global_count < 0 =
  // this batch's own count; horizon <= 0 = T. Forward returns fp32 (out [4] = (loss, stat1, stat2,
  // stat3), row_weight [B] = d loss / d (token loss) per row); the backward takes grad of out (only
  // out[0] carries one) and the row weights, and returns the gradient w.r.t. the first input, in its
  // dtype. Policy: clip_lo = 1 - clip_low, clip_hi = 1 + clip_high, dual_clip <= 0 = off; stats
  // (clipfrac, clipfrac_lower, approx_kl). Value: clip <= 0 = off; stats (vf_clipfrac, vpred_mean,
  // value_mse). See fastalign/ops/ppo.py.
  m.def(
      "ppo_policy_loss_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, float clip_lo, "
      "float clip_hi, float dual_clip, int agg, float global_count, float horizon) -> (Tensor, Tensor)");
  m.def(
      "ppo_policy_loss_bwd(Tensor grad_out, Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
      "Tensor row_weight, float clip_lo, float clip_hi, float dual_clip) -> Tensor");
  m.def(
      "ppo_value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip, int agg, "
      "float global_count, float horizon) -> (Tensor, Tensor)");
  m.def(
      "ppo_value_loss_bwd(Tensor grad_out, Tensor values, Tensor old_values, Tensor returns, Tensor mask, "
      "Tensor row_weight, float clip) -> Tensor");

  // ---- Preference ----
  // See csrc/cpu/preference.cpp and fastalign/ops/preference.py. Token log-probs [N, T] float32/
  // bfloat16/float16 with a bool mask (true = valid); mean: divide by the valid count (>= 1).
  // loss_type: 0 sigmoid, 1 ipo, 2 hinge, 3 robust. Outputs fp32; token gradients in the input dtype.
  m.def("sequence_logps_fwd(Tensor token_logps, Tensor mask, bool mean) -> Tensor");
  m.def("sequence_logps_bwd(Tensor grad, Tensor token_logps, Tensor mask, bool mean) -> Tensor");
  // (losses, chosen_rewards, rejected_rewards) [B]; the backward returns grad_losses * dL/ddelta [B].
  m.def(
      "dpo_loss_fwd(Tensor chosen, Tensor rejected, Tensor ref_chosen, Tensor ref_rejected, float beta, "
      "int loss_type, float label_smoothing) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dpo_loss_bwd(Tensor grad_losses, Tensor chosen, Tensor rejected, Tensor ref_chosen, Tensor ref_rejected, "
      "float beta, int loss_type, float label_smoothing) -> Tensor");
  // policy, ref [2B, T] = [chosen; rejected]: (losses, chosen_rewards, rejected_rewards [B],
  // policy_seq, ref_seq [2B]); the backward returns the gradient w.r.t. policy [2B, T].
  m.def(
      "dpo_tokens_fwd(Tensor policy, Tensor ref, Tensor mask, float beta, int loss_type, float label_smoothing, "
      "bool mean) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dpo_tokens_bwd(Tensor grad_losses, Tensor? grad_policy_seq, Tensor policy_seq, Tensor ref_seq, "
      "Tensor policy, Tensor mask, float beta, int loss_type, float label_smoothing, bool mean) -> Tensor");
}

// A real (empty) Python module, so `import fastalign._C` loads the library and runs the
// registrations above. Build facts live in fastalign/_build_info.py, readable without loading.
static PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastalign::cpu::best_kernels().name);
}
static PyMethodDef fastalign_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "The CPU kernel table in use: DEFAULT, AVX2 or AVX512."},
    {nullptr, nullptr, 0, nullptr}};
static PyModuleDef fastalign_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastalign_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastalign_module); }
