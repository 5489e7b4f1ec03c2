"""OpenRLHF's advantage, KL and loss conventions, computed with fastalign ops.

Mirrors openrlhf/trainer/ppo_utils/experience_maker.py (GAE, reward shaping per group, global
advantage normalisation), openrlhf/models/utils.py (compute_approx_kl) and
openrlhf/models/loss.py (PolicyLoss, ValueLoss, DPOLoss, aggregate_loss), checked against
OpenRLHF/OpenRLHF as of August 2026. OpenRLHF is not imported. Differences from fastalign's own
defaults, reproduced here:
- GAE: values and rewards are multiplied by the action mask first, then the plain loop runs over
  every step (masked steps are not skipped) -> fastalign.gae on the masked inputs with an
  all-ones mask.
- Advantage normalisation: one mean and *biased* variance over all experiences' action-mask
  entries, rstd = rsqrt(max(var, 1e-8)) (fastalign.masked_whiten: unbiased, rsqrt(var + eps)).
- group_norm: (r - group mean) / (unbiased group std + 1e-9); dr_grpo / reinforce_baseline:
  r - group mean; rloo: r - mean of the other samples.
- KL estimators: k1, k2, k3 are all clamped to [-10, 10] (k3 without clamping its input; the
  results are the same since e^x - x - 1 > 10 wherever fastalign's input clamp acts).
- DPO: sigmoid with label smoothing is conservative DPO; IPO uses the summed (not averaged)
  log-probs; the loss is the batch mean.
"""

from __future__ import annotations

import torch

import fastalign

__all__ = ["compute_approx_kl", "dpo_loss", "get_advantages_and_returns", "normalize_advantages", "policy_loss",
           "shape_group_rewards", "value_loss"]

_KINDS = ("k1", "k2", "k3")


def get_advantages_and_returns(values, rewards, action_mask, gamma, lambd):
    """OpenRLHF's GAE: returns (advantages, returns), both [B, T] fp32."""
    if action_mask is not None:
        values = values * action_mask
        rewards = rewards * action_mask
    ones = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    adv, ret = fastalign.gae(rewards, values, ones, gamma=float(gamma), lam=float(lambd))
    return adv, ret


def normalize_advantages(advantages, action_masks, std_norm=True):
    """OpenRLHF's normalisation across all experiences: `advantages` and `action_masks` are a
    tensor each or lists of tensors (one per experience); returns the same structure."""
    single = isinstance(advantages, torch.Tensor)
    advs = [advantages] if single else list(advantages)
    masks = [action_masks] if single else list(action_masks)
    flat_a = torch.cat([a.flatten() for a in advs]).float()
    flat_m = torch.cat([m.flatten() for m in masks]).float()
    n = flat_m.sum()
    mean = (flat_a * flat_m).sum() / n
    rstd = (((flat_a - mean) ** 2 * flat_m).sum() / n).clamp(min=1e-8).rsqrt() if std_norm else 1.0
    out = [(a.float() - mean) * rstd for a in advs]
    return out[0] if single else out


def shape_group_rewards(rewards, n_samples_per_prompt, estimator="group_norm"):
    """OpenRLHF's per-prompt reward shaping of the [N] sequence rewards (N = prompts x samples,
    samples of one prompt consecutive): "group_norm" (GRPO, std eps 1e-9), "dr_grpo" and
    "reinforce_baseline" (minus the group mean), "rloo" (minus the mean of the others)."""
    if estimator == "group_norm":
        return fastalign.group_advantages(rewards, n_samples_per_prompt, eps=1e-9, scale="group")
    if estimator in ("dr_grpo", "reinforce_baseline"):
        return fastalign.group_advantages(rewards, n_samples_per_prompt, scale="none")
    if estimator == "rloo":
        if n_samples_per_prompt < 2:
            raise ValueError("rloo needs n_samples_per_prompt >= 2")
        # r - (sum - r) / (n - 1) = (r - mean) * n / (n - 1)
        n = n_samples_per_prompt
        return fastalign.group_advantages(rewards, n, scale="none") * (n / (n - 1))
    raise ValueError(f"unknown estimator {estimator!r}: group_norm, dr_grpo, reinforce_baseline or rloo")


def compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"):
    """OpenRLHF's compute_approx_kl: the estimator, clamped to [-10, 10], fp32."""
    if kl_estimator not in _KINDS:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    return fastalign.kl_penalty(log_probs, log_probs_base, kind=kl_estimator).clamp(-10.0, 10.0)


def _agg(token_level_loss, dp_size, batch_num_tokens, global_batch_size):
    if token_level_loss:
        count = None if batch_num_tokens is None else float(batch_num_tokens) / dp_size
        return "token-mean", count
    count = None if global_batch_size is None else float(global_batch_size) / dp_size
    return "seq-mean-token-mean", count


def policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_eps_low=0.2, clip_eps_high=0.2,
                dual_clip=None, token_level_loss=True, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """OpenRLHF's PolicyLoss (policy_loss_type "ppo", no vLLM IS correction): returns
    (loss, clip_ratio, ppo_kl)."""
    agg, count = _agg(token_level_loss, dp_size, batch_num_tokens, global_batch_size)
    loss, stats = fastalign.ppo_policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_low=clip_eps_low,
                                            clip_high=clip_eps_high, dual_clip=dual_clip, agg=agg, global_count=count)
    return loss, stats["clipfrac"], stats["approx_kl"]


def value_loss(values, old_values, returns, action_mask, clip_eps=None, token_level_loss=True, dp_size=1,
               batch_num_tokens=None, global_batch_size=None):
    """OpenRLHF's ValueLoss: 0.5 * aggregate(max((v - R)^2, (clipped v - R)^2)); returns the loss."""
    agg, count = _agg(token_level_loss, dp_size, batch_num_tokens, global_batch_size)
    loss, _ = fastalign.ppo_value_loss(values, old_values, returns, action_mask, clip=clip_eps, agg=agg,
                                       global_count=count)
    return loss


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
             label_smoothing=0.0, ipo=False):
    """OpenRLHF's DPOLoss: returns (mean loss, chosen_rewards, rejected_rewards)."""
    if ipo:
        losses, cr, rr = fastalign.dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                            reference_rejected_logps, beta=beta, loss_type="ipo")
    else:
        losses, cr, rr = fastalign.dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                            reference_rejected_logps, beta=beta, loss_type="sigmoid",
                                            label_smoothing=label_smoothing)
    return losses.mean(), cr, rr
