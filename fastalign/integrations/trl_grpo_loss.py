"""TRL's GRPO policy loss (GRPOTrainer._compute_loss) computed with fastalign.policy_loss; exposed
as fastalign.integrations.trl.grpo_loss (its own file: trl.py holds the other adapters and the
patch)."""

from __future__ import annotations

import torch

import fastalign

_GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
_TRL_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def grpo_loss(per_token_logps, old_per_token_logps, advantages, completion_mask, *, loss_type="dapo", epsilon=0.2,
              epsilon_high=None, importance_sampling_level="token", sapo_temperature_pos=1.0,
              sapo_temperature_neg=1.05, max_completion_length=None, num_items_in_batch=None, num_processes=1,
              gradient_accumulation_steps=1, steps_per_generation=1, sampling_per_token_logps=None,
              vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=None,
              vllm_importance_sampling_clip_max=3.0):
    """GRPOTrainer._compute_loss's policy loss (trl/trainer/grpo_trainer.py, TRL 1.16; beta = 0,
    no entropy mask, no off-policy mask, delta None) computed with fastalign.policy_loss, in
    TRL's normalisation for a training step. Returns (loss, stats) like policy_loss.

    advantages: [B] or [B, T]. Per token (coef_1 = exp(d), or exp(mean_t d) [B, 1] with
    importance_sampling_level="sequence", which is GSPO):
      grpo, bnpo, dr_grpo, dapo: -min(coef_1 A, clamp(coef_1, 1 - epsilon, 1 + epsilon_high) A)
        -> policy_loss "ppo" ("gspo" at the sequence level);
      cispo: -sg(min(coef_1, epsilon_high)) A logp (the cap is epsilon_high itself, not 1 +
        epsilon_high as in verl; no lower bound) -> "cispo" with clip_high = epsilon_high - 1;
      sapo: -sigmoid(tau (coef_1 - 1)) 4 / tau A -> "sapo".
    Normalisation (G = gradient_accumulation_steps, m the completion mask):
      grpo, sapo: mean over ALL B rows (empty ones too) of the row's token mean, / G
        -> "seq-mean-token-mean" with global_count = B G;
      bnpo: sum(l m) / max(sum m, 1) / G -> "token-mean", global_count = max(sum m, 1) G;
      dr_grpo: sum(l m) / (B max_completion_length) / G -> "seq-mean-token-sum-norm", horizon =
        max_completion_length (default T), global_count = B G;
      dapo, cispo: sum(l m) / (max(num_items_in_batch, 1) / num_processes * G /
        steps_per_generation) (num_items_in_batch default sum m) -> "token-mean" with that count.
    vLLM importance sampling (sampling_per_token_logps given; w = exp(old - sampling), per token
    or the row's product): *_truncate: weight clamp(w, clip_min, clip_max) -> rollout_is;
    *_mask: weight w where clip_min <= w <= clip_max, else 0 -> rollout_is plus rollout_rs with
    the same bounds. TRL keeps masked tokens in its counts; the counts above are fixed, so this is
    exact except token_mask with grpo/sapo (a row mean over the kept tokens), which is refused.
    Not supported: importance_sampling_level="sequence" with cispo or sapo.
    """
    if loss_type not in _GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_GRPO_LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo"):
        raise NotImplementedError(f"importance_sampling_level='sequence' with loss_type={loss_type!r}")
    mask = completion_mask
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.expand(mask.shape)
    batch, steps = mask.shape
    accum = float(gradient_accumulation_steps)
    high = epsilon if epsilon_high is None else epsilon_high
    if loss_type == "cispo":
        kw = dict(loss_type="cispo", clip_low=None, clip_high=float(high) - 1.0)
    elif loss_type == "sapo":
        kw = dict(loss_type="sapo", tau_pos=sapo_temperature_pos, tau_neg=sapo_temperature_neg)
    else:
        kw = dict(loss_type="gspo" if importance_sampling_level == "sequence" else "ppo", clip_low=epsilon,
                  clip_high=high)
    n_tokens = float((mask != 0).sum())
    if loss_type in ("grpo", "sapo"):
        kw.update(agg="seq-mean-token-mean", global_count=batch * accum)
    elif loss_type == "bnpo":
        kw.update(agg="token-mean", global_count=max(n_tokens, 1.0) * accum)
    elif loss_type == "dr_grpo":
        kw.update(agg="seq-mean-token-sum-norm", global_count=batch * accum,
                  horizon=float(steps if max_completion_length is None else max_completion_length))
    else:
        items = n_tokens if num_items_in_batch is None else float(num_items_in_batch)
        kw.update(agg="token-mean", global_count=max(items, 1.0) / num_processes * accum / steps_per_generation)
    if sampling_per_token_logps is not None:
        mode = vllm_importance_sampling_mode
        if mode not in _TRL_IS_MODES:
            raise ValueError(f"vllm_importance_sampling_mode must be one of {_TRL_IS_MODES}, got {mode!r}")
        level = mode.split("_")[0]
        big = torch.finfo(torch.float32).max
        upper = big if vllm_importance_sampling_clip_max is None else vllm_importance_sampling_clip_max
        kw.update(rollout_logprobs=sampling_per_token_logps, rollout_is=level, rollout_is_threshold=upper)
        if mode.endswith("truncate"):
            kw.update(rollout_is_threshold_lower=vllm_importance_sampling_clip_min)
        else:
            if mode == "token_mask" and loss_type in ("grpo", "sapo"):
                raise NotImplementedError("vllm_importance_sampling_mode='token_mask' with loss_type grpo/sapo: TRL's "
                                          "row means count the masked tokens, fastalign's rollout_rs drops them")
            lower = vllm_importance_sampling_clip_min
            kw.update(rollout_rs=level, rollout_rs_threshold=upper, rollout_rs_threshold_lower=0.0 if lower is None
                      else lower)
    return fastalign.policy_loss(per_token_logps, old_per_token_logps, advantages, mask, **kw)
