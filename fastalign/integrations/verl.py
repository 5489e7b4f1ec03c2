"""verl's core_algos / torch_functional functions, computed with fastalign ops.

Same names, arguments and return values as verl (verl/trainer/ppo/core_algos.py and
verl/utils/torch_functional.py, checked against volcengine/verl as of January 2026), so a verl
user replaces e.g. `core_algos.compute_gae_advantage_return` by
`fastalign.integrations.verl.compute_gae_advantage_return`. verl is not imported.

What is equal, and where it is not (all tested in tests/test_peer_numerics.py):
- compute_gae_advantage_return: equal at response_mask positions. verl's loop leaves the carried
  advantage at masked (observation/padding) positions; fastalign.gae writes 0 there, and verl's
  whitening is applied to every entry, so masked positions differ (every verl consumer masks them).
- compute_policy_loss_{gspo, sapo, cispo, gpg, geo_mean, clip_cov, kl_cov}: fastalign.policy_loss
  with verl's parameters from the actor config; equal to verl's (tests/test_policy_losses.py).
  rollout_is_weights fold into the advantages (exact: see _weighted), refused for clip_cov/kl_cov.
- compute_policy_loss / compute_policy_loss_vanilla: loss and clip fractions equal. ppo_kl: verl
  averages the log-ratio after clamping it to [-20, 20], fastalign does not clamp (differs only
  for |log-ratio| > 20, where the ratio is clamped anyway).
- agg_loss: every mode and the dp_size / batch_num_tokens / global_batch_size /
  loss_scale_factor arguments. Rows without a valid token: verl's token-mean gives NaN for an
  all-masked batch, fastalign 0; seq-mean-token-mean divides by n + 1e-8 in verl, n here.
- kl_penalty: every kind, including the "+" straight-through variants (k1+, k3+, ...).
- masked_whiten, logprobs_from_logits, entropy_from_logits: equal. verl's masked_whiten raises
  for fewer than 2 masked entries; fastalign returns x - mean (scale 1).
- compute_grpo_outcome_advantage: equal, including verl's treatment of single-sample groups
  (mean 0, std 1).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

import fastalign
from fastalign.kernels import reference

__all__ = [
    "agg_loss", "compute_gae_advantage_return", "compute_grpo_outcome_advantage", "compute_policy_loss",
    "compute_policy_loss_clip_cov", "compute_policy_loss_cispo", "compute_policy_loss_geo_mean",
    "compute_policy_loss_gpg", "compute_policy_loss_gspo", "compute_policy_loss_kl_cov", "compute_policy_loss_sapo",
    "compute_policy_loss_vanilla", "compute_value_loss", "entropy_from_logits", "kl_penalty", "logprobs_from_logits",
    "masked_whiten",
]

# verl's kl_penalty names -> fastalign.kl_penalty kinds
_KL_KINDS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def masked_whiten(values, mask, shift_mean=True):
    """verl_F.masked_whiten: unbiased variance, eps 1e-8 inside the rsqrt, over mask entries."""
    return fastalign.masked_whiten(values, mask, shift_mean=shift_mean, eps=1e-8)


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl_F.logprobs_from_logits: log_softmax(logits)[labels], fp32, without the fp32 [.., V]
    intermediate. `inplace_backward` is accepted and ignored: fastalign never writes into logits."""
    return fastalign.gather_logprobs(logits, labels)


def entropy_from_logits(logits):
    """verl_F.entropy_from_logits: entropy of softmax(logits) per row, fp32."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return fastalign.gather_logprobs(logits, labels, return_entropy=True)[1]


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl's GAE: masked steps carry the next value and the running advantage (fastalign.gae's
    own convention), returns = advantages + values, then the advantages are whitened over
    response_mask. Returns (advantages, returns), equal to verl's at response_mask positions."""
    adv, _ = fastalign.gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam))
    returns = adv + values.float()
    return masked_whiten(adv, response_mask), returns


def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None):
    """verl's GRPO outcome advantage: score = sum of token rewards; groups by `index` (any ids, any
    group sizes); (score - group mean) / (unbiased group std + epsilon); a group of one sample
    has mean 0 and std 1. Returns (advantages, advantages), each score broadcast over
    response_mask. Equal-size consecutive groups go through fastalign.group_advantages."""
    scores = token_level_rewards.float().sum(-1)
    ids = np.asarray(index)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    n = scores.shape[0]
    size = int(counts[0]) if len(counts) else 0
    contiguous = (n > 0 and size >= 2 and (counts == size).all()
                  and (inverse.reshape(-1, size) == inverse[::size, None]).all())
    scale = "group" if norm_adv_by_std_in_grpo else "none"
    if contiguous:
        adv = fastalign.group_advantages(scores, size, eps=epsilon, scale=scale)
    else:  # arbitrary grouping: the same statistics with scatter-adds
        g = torch.as_tensor(inverse, device=scores.device, dtype=torch.long)
        cnt = torch.as_tensor(counts, device=scores.device, dtype=torch.float32)
        mean = torch.zeros_like(cnt).index_add_(0, g, scores) / cnt
        sq = torch.zeros_like(cnt).index_add_(0, g, (scores - mean[g]) ** 2)
        std = torch.sqrt(sq / (cnt - 1).clamp(min=1))
        single = cnt == 1  # verl: a lone sample has mean 0 and std 1
        mean = torch.where(single, 0.0, mean)
        std = torch.where(single, 1.0, std)
        adv = scores - mean[g]
        if norm_adv_by_std_in_grpo:
            adv = adv / (std[g] + epsilon)
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def _agg_args(mode, mask, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's agg_loss arguments -> fastalign (agg, global_count, horizon)."""
    if mode == "seq-mean-token-sum-norm":
        # verl: sum over all tokens / loss_scale_factor, no mean over sequences (count 1)
        return mode, 1.0, float(loss_scale_factor) if loss_scale_factor is not None else None
    if mode == "token-mean":
        count = batch_num_tokens
        if count is None and dp_size != 1:
            count = float((mask != 0).sum())
    elif mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        count = global_batch_size
        if count is None and dp_size != 1:
            count = float(((mask != 0).sum(-1) > 0).sum())
    else:
        raise ValueError(f"Invalid loss_agg_mode: {mode}")
    # verl multiplies by dp_size (DDP/FSDP average the gradients over ranks): divide the count
    return mode, None if count is None else float(count) / dp_size, None


def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None):
    """verl's agg_loss (all four modes), fp32 scalar."""
    agg, count, horizon = _agg_args(loss_agg_mode, loss_mask, dp_size, batch_num_tokens, global_batch_size,
                                    loss_scale_factor)
    return reference.ppo_agg(loss_mat.float(), loss_mask != 0, agg, count, horizon)


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean", dp_size=1,
                        batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's (dual-clip) PPO policy loss: returns (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower).
    verl always applies the dual clip (clip_ratio_c, default 3) to tokens with negative advantage."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    agg, count, horizon = _agg_args(loss_agg_mode, response_mask, dp_size, batch_num_tokens, global_batch_size,
                                    loss_scale_factor)
    loss, stats = fastalign.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask, clip_low=low,
                                            clip_high=high, dual_clip=clip_ratio_c, agg=agg, global_count=count,
                                            horizon=horizon)
    return loss, stats["clipfrac"], stats["approx_kl"], stats["clipfrac_lower"]


def _getter(config):
    if config is None:
        raise ValueError("config (verl's ActorConfig, or a dict with its fields) is required")
    return config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))


def _clip_ratios(get):
    clip = get("clip_ratio", 0.2)
    low, high = get("clip_ratio_low", None), get("clip_ratio_high", None)
    return (clip if low is None else low), (clip if high is None else high)


def _policy_loss_params(get, *names, defaults):
    """verl's config.policy_loss.<name>, None meaning verl's fallback default."""
    sub = get("policy_loss", None)
    sub_get = (lambda k, d=None: None) if sub is None else _getter(sub)
    return {n: (defaults[n] if sub_get(n, None) is None else sub_get(n, None)) for n in names}


def _weighted(advantages, rollout_is_weights, loss_type):
    """verl multiplies the per-token loss by rollout_is_weights (>= 0, stop-gradient). For these
    loss types the per-token loss is positively homogeneous in A with the decisions depending only
    on sign(A) (w l(A) = l(w A) for w > 0), so the weights fold into the advantages."""
    if rollout_is_weights is None:
        return advantages
    if loss_type in ("clip_cov", "kl_cov"):
        raise NotImplementedError(f"rollout_is_weights with {loss_type}: its token selection depends on A, so the "
                                  "weights do not fold into the advantages; use policy_loss's rollout correction")
    return advantages * rollout_is_weights.detach()


def _verl_loss(loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
               rollout_is_weights, **params):
    get = _getter(config)
    agg, count, horizon = _agg_args(loss_agg_mode, response_mask, **(get("global_batch_info", None) or {}))
    adv = _weighted(advantages, rollout_is_weights, loss_type)
    return fastalign.policy_loss(log_prob, old_log_prob, adv, response_mask, loss_type=loss_type, agg=agg,
                                 global_count=count, horizon=horizon, **params)


def _metrics(stats, clipfrac="clipfrac", lower=None):
    zero = 0.0
    return {"actor/pg_clipfrac": stats[clipfrac].item() if clipfrac else zero,
            "actor/ppo_kl": stats["approx_kl"].item(),
            "actor/pg_clipfrac_lower": stats[lower].item() if lower else zero}


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl's registered "vanilla" policy loss (current signature): clip ratios and
    global_batch_info (dp_size, batch_num_tokens, global_batch_size, ...) from the actor
    `config`; returns (pg_loss, metrics) with verl's metric names as Python floats.
    rollout_is_weights (verl multiplies the per-token loss by them) fold into the advantages."""
    get = _getter(config)
    low, high = _clip_ratios(get)
    clip = get("clip_ratio", 0.2)
    loss, clipfrac, ppo_kl, clipfrac_lower = compute_policy_loss(
        old_log_prob, log_prob, _weighted(advantages, rollout_is_weights, "ppo"), response_mask, cliprange=clip,
        cliprange_low=low, cliprange_high=high, clip_ratio_c=get("clip_ratio_c", 3.0), loss_agg_mode=loss_agg_mode,
        **(get("global_batch_info", None) or {}))
    metrics = {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
               "actor/pg_clipfrac_lower": clipfrac_lower.item()}
    return loss, metrics


def compute_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None):
    """verl's "gspo": the stop-gradient token form (policy_loss loss_type="gspo_token"), clip
    ratios from config; verl aggregates with "seq-mean-token-mean" whatever loss_agg_mode says,
    and so does this. pg_clipfrac_lower is 0, as in verl."""
    low, high = _clip_ratios(_getter(config))
    loss, stats = _verl_loss("gspo_token", old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean",
                             config, rollout_is_weights, clip_low=low, clip_high=high)
    return loss, _metrics(stats)


def compute_policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None):
    """verl's "sapo" (config tau_pos, tau_neg; verl's defaults 1.0, 1.05), aggregated with
    "seq-mean-token-mean" whatever loss_agg_mode says, as verl. Clip fractions are 0, as in verl."""
    get = _getter(config)
    loss, stats = _verl_loss("sapo", old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
                             rollout_is_weights, tau_pos=get("tau_pos", 1.0), tau_neg=get("tau_neg", 1.05))
    return loss, _metrics(stats, clipfrac=None)


def compute_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                              config=None, rollout_is_weights=None):
    """verl's "cispo": weight sg(clamp(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) (both bounds,
    from config), then loss_agg_mode. pg_clipfrac = fraction of clamped ratios."""
    low, high = _clip_ratios(_getter(config))
    loss, stats = _verl_loss("cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                             rollout_is_weights, clip_low=low, clip_high=high)
    return loss, _metrics(stats)


def compute_policy_loss_gpg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None):
    """verl's "gpg": -A logp aggregated by loss_agg_mode; no metrics (as verl)."""
    loss, _ = _verl_loss("gpg", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                         rollout_is_weights)
    return loss, {}


def compute_policy_loss_geo_mean(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                 config=None, rollout_is_weights=None):
    """verl's "geo_mean" (GMPO): the mean over all B rows of -Abar_b R_b (loss_agg_mode and
    global_batch_info unused, as verl); rollout_is_weights enter as their per-row geometric mean
    exp(mean_t log(w + 1e-10)), as verl. pg_clipfrac / pg_clipfrac_lower: clipped tokens with
    A > 0 / A < 0. Differs from verl only where |log-ratio| > 20 (clamped here) and by verl's
    + 1e-8 in its row means."""
    low, high = _clip_ratios(_getter(config))
    adv = advantages
    if rollout_is_weights is not None:
        m = (response_mask != 0).float()
        n = m.sum(-1).clamp(min=1)
        w_seq = torch.exp((torch.log(rollout_is_weights.detach().float() + 1e-10) * m).sum(-1) / n)
        adv = advantages * w_seq.unsqueeze(-1)
    loss, stats = fastalign.policy_loss(log_prob, old_log_prob, adv, response_mask, loss_type="geo_mean",
                                        agg="seq-mean-token-mean", global_count=float(response_mask.shape[0]),
                                        clip_low=low, clip_high=high)
    return loss, _metrics(stats, clipfrac="clipfrac_high", lower="clipfrac_low")


def compute_policy_loss_clip_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                 config=None, rollout_is_weights=None):
    """verl's "clip_cov": clip ratios and config.policy_loss.{clip_cov_ratio, clip_cov_lb,
    clip_cov_ub} (verl's fallbacks 2e-4, 1.0, 5.0); the random choice of tokens uses the same
    torch.randperm draw as verl. pg_clipfrac = fraction of tokens dropped (verl's meaning)."""
    get = _getter(config)
    low, high = _clip_ratios(get)
    params = _policy_loss_params(get, "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub",
                                 defaults={"clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0})
    loss, stats = _verl_loss("clip_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                             rollout_is_weights, clip_low=low, clip_high=high, **params)
    return loss, {"actor/pg_clipfrac": stats["covfrac"].item(), "actor/ppo_kl": stats["approx_kl"].item()}


def compute_policy_loss_kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                               config=None, rollout_is_weights=None):
    """verl's "kl_cov": config.policy_loss.{kl_cov_ratio, ppo_kl_coef} (verl's fallbacks 2e-4,
    1.0; its PolicyLossConfig default ppo_kl_coef is 0.1). actor/ppo_kl is verl's mean |log-ratio|."""
    get = _getter(config)
    params = _policy_loss_params(get, "kl_cov_ratio", "ppo_kl_coef",
                                 defaults={"kl_cov_ratio": 2e-4, "ppo_kl_coef": 1.0})
    loss, _ = _verl_loss("kl_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                         rollout_is_weights, **params)
    valid = response_mask != 0
    abs_kl = torch.where(valid, (log_prob.detach().float() - old_log_prob.float()).abs(), 0.0)
    return loss, {"actor/ppo_kl": (abs_kl.sum() / valid.sum().clamp(min=1)).item()}


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean"):
    """verl's clipped value loss: returns (vf_loss, vf_clipfrac)."""
    agg, count, horizon = _agg_args(loss_agg_mode, response_mask)
    loss, stats = fastalign.ppo_value_loss(vpreds, values, returns, response_mask, clip=cliprange_value, agg=agg,
                                           global_count=count, horizon=horizon)
    return loss, stats["vf_clipfrac"]


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl's kl_penalty: "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3" (clamped as in verl), and
    the straight-through variants ending in "+" (value of the estimator, gradient of k2)."""
    name = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if name not in _KL_KINDS:
        raise NotImplementedError(f"kl_penalty {kl_penalty!r} is not supported (have {sorted(_KL_KINDS)} and '+')")
    forward = fastalign.kl_penalty(logprob, ref_logprob, kind=_KL_KINDS[name])
    if not kl_penalty.endswith("+") or _KL_KINDS[name] == "k2":
        return forward
    backward = fastalign.kl_penalty(logprob, ref_logprob, kind="k2")
    return backward - backward.detach() + forward.detach()
