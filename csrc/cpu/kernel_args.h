// The arguments of the CPU kernels in the dispatch table (dispatch.h): plain data only, because
// they cross from the host files (compiled for the baseline ISA) into the per-ISA objects.
// Tensors arrive as typed pointers plus their c10::ScalarType; the host has checked shapes,
// dtypes and devices (csrc/checks.h), so the kernels trust them.
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastalign::cpu {

// ---- gather_logprobs ----------------------------------------------------------------------------

struct LogprobsFwdArgs {
  const void* logits;  // [N, V], element (i, j) at logits + i * row_stride + j
  int64_t row_stride;
  c10::ScalarType dtype;  // Float, BFloat16 or Half
  int64_t vocab;
  const int64_t* labels;  // [N], validated by the caller
  float inv_temperature;
  int64_t ignore_index;
  float* logprobs;  // [N]
  float* entropy;   // [N] or nullptr
  float* row_stats;  // [N, 2]: (max_j z_j, log sum_j exp(z_j - max)), saved for the backward
};

struct LogprobsBwdArgs {
  const void* logits;
  int64_t row_stride;
  c10::ScalarType dtype;
  int64_t vocab;
  const int64_t* labels;
  float inv_temperature;
  int64_t ignore_index;
  const float* grad_logprobs;  // [N]
  const float* grad_entropy;   // [N] or nullptr
  const float* row_stats;      // [N, 2]
  const float* entropy;        // [N] or nullptr (needed only with grad_entropy)
  void* grad_logits;           // [N, V] contiguous, dtype
};

// ---- masked token rows (PPO losses, DPO head) ----------------------------------------------------

// The mask of [rows, steps] token tensors, contiguous: Bool/Byte, Int, Long or Float, read as it
// is (nonzero = valid), so a caller's float or attention mask costs no conversion pass.
struct MaskedRows {
  c10::ScalarType dtype;  // of the float token tensors: Float, BFloat16 or Half
  const void* mask;
  c10::ScalarType mask_dtype;
  int64_t steps;
};

// The three [B, T] float inputs of a PPO loss, x the differentiated one (log-probs or values).
struct TokenInputs {
  MaskedRows rows;
  const void* x;
  const void* y;
  const void* z;
};

// Per-row partials of the PPO-family losses: loss sum, valid count, six statistic sums and one
// statistic max. The policy losses' statistics (fastalign/ops/ppo.py POLICY_STATS): clipped,
// dual-clip cap binding, old - logp, clipped low (A < 0), clipped high (A > 0), ratio; the max:
// ratio. The value loss uses the first three (clipped, v, (v - R)^2) and leaves the rest 0.
constexpr int kPpoParts = 9;
constexpr int kPpoMaxPart = 8;  // reduced by max (NaN-propagating), every other part by sum

struct PolicyParams {
  float lo, hi, dual;  // 1 - clip_low, 1 + clip_high, dual-clip c (used when use_dual)
  bool use_dual;
};

// fastalign.policy_loss's types with a fused kernel besides ppo (fastalign/ops/policy_loss_fused.py):
// kind 0 = -A logp (reinforce, gpg); 1 = cispo, a = 1 - clip_low (0: no lower bound), b = 1 + clip_high;
// 2 = sapo, a = tau_pos, b = tau_neg; 3 = gspo (sequence ratio), a = 1 - clip_low, b = 1 + clip_high;
// 4 = geo_mean (GMPO), a = clip_low, b = clip_high (log-space bounds). 3 and 4 are sequence-level:
// a row pass computes the row's ratio before the token pass.
enum PgKind : int32_t { kPgReinforce = 0, kPgCispo = 1, kPgSapo = 2, kPgGspo = 3, kPgGeoMean = 4 };

struct PgParams {
  int32_t kind;
  float a, b;
};

struct ValueParams {
  float clip;  // > 0: clipped loss; <= 0: plain squared error
};

}  // namespace fastalign::cpu
