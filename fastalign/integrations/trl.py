"""TRL's numerics, computed with fastalign ops.

Mirrors trl/trainer/utils.py (selective_log_softmax, entropy_from_logits), the PPO trainer's
masked_whiten and GAE loop (trl/experimental/ppo/ppo_trainer.py), the GRPO trainer's group
advantages and the DPO trainer's sigmoid / IPO / hinge / robust losses (trl/trainer/grpo_trainer.py,
dpo_trainer.py), checked against huggingface/trl as of July 2026. TRL is not imported; this
module does not patch TRL's trainers (that drop-in is separate work). Differences from
fastalign's defaults, reproduced here:
- GAE: TRL's loop has no mask; values are zero-filled past the response end -> fastalign.gae
  with an all-ones mask; advantages then whitened over the response and zero-filled outside.
- GRPO: std eps 1e-4 (added to the unbiased std); scale_rewards "group", "batch" or "none".
- DPO "sigmoid" ignores label_smoothing in current TRL; "ipo" averages each sequence's log-ratio
  over its completion tokens.
- TRL's KL estimators are not clamped (fastalign.kl_penalty k3 clamps as verl/OpenRLHF do), so no
  KL adapter is offered here.
"""

from __future__ import annotations

import torch

import fastalign

__all__ = ["compute_gae", "dpo_losses", "entropy_from_logits", "grpo_advantages", "masked_whiten",
           "selective_log_softmax"]


def selective_log_softmax(logits, index):
    """TRL's selective_log_softmax: log_softmax(logits)[index] for index `[...]` or `[..., K]`,
    without materialising log_softmax. fp32 result (TRL returns the logits' dtype)."""
    if index.dim() == logits.dim() - 1:
        return fastalign.gather_logprobs(logits, index)
    if index.dim() == logits.dim():  # K labels per position: one fused pass each
        return torch.stack([fastalign.gather_logprobs(logits, index[..., k]) for k in range(index.shape[-1])], -1)
    raise ValueError(f"index must have shape logits.shape[:-1] or [..., K], got {tuple(index.shape)}")


def entropy_from_logits(logits, chunk_size=128):
    """TRL's entropy_from_logits: per-position entropy of softmax(logits), fp32 (no chunking needed)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return fastalign.gather_logprobs(logits, labels, return_entropy=True)[1]


def masked_whiten(values, mask, shift_mean=True):
    """TRL's masked_whiten: unbiased variance, rsqrt(var + 1e-8)."""
    return fastalign.masked_whiten(values, mask, shift_mean=shift_mean, eps=1e-8)


def compute_gae(rewards, values, response_mask, gamma, lam, whiten=True):
    """The PPO trainer's advantage computation: the unmasked GAE loop over all T steps (values
    and rewards as given: TRL zero-fills values past the end beforehand), returns = advantages +
    values, then (whiten=True) advantages whitened over response_mask and zero-filled outside.
    Returns (advantages, returns)."""
    ones = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    adv, ret = fastalign.gae(rewards, values, ones, gamma=float(gamma), lam=float(lam))
    if whiten:
        adv = torch.where(response_mask.bool(), masked_whiten(adv, response_mask), 0.0)
    return adv, ret


def grpo_advantages(rewards, num_generations, scale_rewards="group"):
    """GRPOTrainer's advantages of the [N] summed rewards: (r - group mean) / (std + 1e-4), std
    per group ("group"), over the batch ("batch"), or no scaling ("none")."""
    return fastalign.group_advantages(rewards, num_generations, eps=1e-4, scale=scale_rewards)


def dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, loss_type="sigmoid",
               label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
    """DPOTrainer's per-pair losses for loss_type "sigmoid" (label_smoothing ignored, as TRL does),
    "hinge", "robust" and "ipo" (pass the completion token counts: TRL averages over them).
    Returns (losses, chosen_rewards, rejected_rewards) like fastalign.dpo_loss."""
    c, r, rc, rr = chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    eps = 0.0
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (TRL averages over tokens)")
        nc, nr = chosen_lengths.float().clamp(min=1), rejected_lengths.float().clamp(min=1)
        c, rc, r, rr = c / nc, rc / nc, r / nr, rr / nr
    elif loss_type == "robust":
        eps = label_smoothing
    elif loss_type not in ("sigmoid", "hinge"):
        raise ValueError(f"loss_type must be sigmoid, hinge, ipo or robust, got {loss_type!r}")
    losses, _, _ = fastalign.dpo_loss(c, r, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    # TRL's rewards are beta * (logp - ref) of the summed log-probs, also under IPO
    return losses, (beta * (chosen_logps - ref_chosen_logps)).detach().float(), \
        (beta * (rejected_logps - ref_rejected_logps)).detach().float()
