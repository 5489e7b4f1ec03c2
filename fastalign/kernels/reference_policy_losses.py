"""Eager references of the policy-loss family (fastalign.policy_loss): plain torch autograd of
each formula, fp32. These are also what every backend runs for the loss types without a fused
kernel (all but "ppo"), and the per-token formulas behind the built-in registry entries
(fastalign/ops/policy_loss_types.py).

Conventions of every per-token formula here:
  formula(logp, old, adv, valid, **params) -> (loss_tok [B, T], extras)
  logp, old, adv: fp32 [B, T], already zeroed (where()) outside `valid` so that NaN/inf there reach
  neither the loss nor the gradient; valid: bool [B, T], the tokens that take part in the loss.
  extras: {name: [B, T] tensor}: "ratio" (the importance ratio the loss uses; reported as
  ratio_mean / ratio_max over the valid tokens), every other entry a per-token indicator or value
  reported as its mean over the valid tokens. Only logp carries a gradient.
  d = logp - old is the log-ratio; r = exp(clamp(d, -20, 20)) (verl's SAFETY_BOUND / the ppo
  kernels' clamp) unless a formula says otherwise.

The formulas and where the peers differ are in docs/policy_losses.md and the docstrings below.
"""

from __future__ import annotations

import torch

from fastalign.kernels.reference import PPO_AGG_MODES, clipped_surrogate, ppo_agg, ppo_token_loss

__all__ = ["PPO_AGG_MODES", "ROLLOUT_IS_LEVELS", "ROLLOUT_RS_LEVELS", "clip_cov", "cispo", "geo_mean", "gpg", "gspo",
           "gspo_token", "kl_cov", "policy_loss", "ppo", "ppo_agg", "reinforce", "rollout_correction", "sapo",
           "summarize"]

LOG_RATIO_BOUND = 20.0  # |log-ratio| clamp before exp (verl's rollout_corr SAFETY_BOUND, ppo kernels)
GSPO_LOG_RATIO_MAX = 10.0  # verl's compute_policy_loss_gspo: clamp(log s, max=10)


def _ratio(logp, old):
    return torch.exp(torch.clamp(logp - old, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))


def _row_mean(x, valid):
    """[B]: mean of x over each row's valid tokens (0 for a row without any)."""
    n = valid.sum(-1).clamp(min=1).to(x.dtype)
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1) / n


# ---- per-token formulas of the built-in loss types ---------------------------------------------


def ppo(logp, old, adv, valid, clip_low=0.2, clip_high=None, dual_clip=None):
    """PPO clip (arXiv 1707.06347) with DAPO's asymmetric "clip-higher" bounds (arXiv 2503.14476)
    and dual clip (arXiv 1912.09729): r = exp(clamp(d, -20, 20)),
        l = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)),  A < 0 and dual_clip = c: min(l, -A c).
    clipfrac_lower: A < 0 and the dual-clip cap binding (verl's pg_clipfrac_lower). The per-token
    math is kernels/reference.ppo_token_loss, the one of fastalign.ppo_policy_loss."""
    return ppo_token_loss(logp, old, adv, clip_low, clip_low if clip_high is None else clip_high, dual_clip)


def gspo(logp, old, adv, valid, clip_low=3e-4, clip_high=4e-4):
    """GSPO, sequence form (arXiv 2507.18071, eq. 5-7): s_b = exp(min(mean_t d_bt, 10)) over the
    row's valid tokens, differentiable through every token of the row;
        l_bt = max(-A_bt s_b, -A_bt clamp(s_b, 1 - clip_low, 1 + clip_high)).
    With a sequence-level advantage and agg="seq-mean-token-mean" this is the paper's objective."""
    log_s = torch.clamp(_row_mean(logp - old, valid), max=GSPO_LOG_RATIO_MAX)
    s = torch.exp(log_s).unsqueeze(-1).expand_as(logp)
    return clipped_surrogate(s, adv, clip_low, clip_high)


def gspo_token(logp, old, adv, valid, clip_low=3e-4, clip_high=4e-4):
    """GSPO-token (arXiv 2507.18071, eq. 13), verl's "gspo": the token ratio
        s_bt = exp(min(sg(mean_t d_bt) + logp_bt - sg(logp_bt), 10)),
    equal to s_b in value, whose gradient flows only through its own token (d s_bt / d logp_bt =
    s_bt); l_bt as in gspo. Equal to gspo in value; equal in gradient when A is constant along
    the row and agg="seq-mean-token-mean"."""
    log_s = _row_mean(logp - old, valid).detach().unsqueeze(-1) + logp - logp.detach()
    s = torch.exp(torch.clamp(log_s, max=GSPO_LOG_RATIO_MAX))
    return clipped_surrogate(s, adv, clip_low, clip_high)


def cispo(logp, old, adv, valid, clip_low=None, clip_high=4.0):
    """CISPO (MiniMax-M1, arXiv 2506.13585): the clipped importance weight, stop-gradient, times
    the log-prob: l = -sg(clamp(r, 1 - clip_low, 1 + clip_high)) A logp; clip_low None = no
    lower bound (the paper's setting). clipfrac_low/high: r below/above the bounds."""
    ratio = _ratio(logp, old)
    lo = None if clip_low is None else 1.0 - clip_low
    hi = 1.0 + clip_high
    weight = torch.clamp(ratio, min=lo, max=hi).detach()
    low = torch.zeros_like(valid) if lo is None else ratio < lo
    high = ratio > hi
    extras = {"ratio": ratio, "clipfrac": low | high, "clipfrac_low": low, "clipfrac_high": high}
    return -weight * adv * logp, extras


def sapo(logp, old, adv, valid, tau_pos=1.0, tau_neg=1.05):
    """SAPO (arXiv 2511.20347): a soft gate instead of the clip,
        l = -f(r) A,  f(r) = sigmoid(tau (r - 1)) 4 / tau,  tau = tau_pos if A > 0 else tau_neg."""
    ratio = _ratio(logp, old)
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return -gate * adv, {"ratio": ratio}


def geo_mean(logp, old, adv, valid, clip_low=0.4, clip_high=0.4):
    """GMPO (arXiv 2507.20673), verl's "geo_mean": the geometric mean of the token ratios, each
    clipped in log space to [-clip_low, clip_high] on the side that matters for sign(A):
        m_bt = sign(A) min(sign(A) d, sign(A) clamp(d, -clip_low, clip_high)),  d clamped to +-20,
        R_b = exp(mean_t m_bt),  Abar_b = mean_t A_bt,  l_bt = -Abar_b R_b  (every token of row b).
    With agg="seq-mean-token-mean" the loss is the mean over non-empty rows of -Abar_b R_b.
    clipfrac_high/low: d outside its clamp with A > 0 / A < 0."""
    d = torch.clamp(logp - old, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    sgn = torch.sign(adv)
    dc = torch.clamp(d, -clip_low, clip_high)
    m = sgn * torch.minimum(sgn * d, sgn * dc)
    seq_ratio = torch.exp(_row_mean(m, valid))
    abar = _row_mean(adv, valid)
    loss = (-abar * seq_ratio).unsqueeze(-1).expand_as(logp)
    clipped = d != dc
    extras = {"ratio": seq_ratio.unsqueeze(-1).expand_as(logp), "clipfrac": clipped & (adv != 0),
              "clipfrac_low": clipped & (adv < 0), "clipfrac_high": clipped & (adv > 0)}
    return loss, extras


def reinforce(logp, old, adv, valid):
    """REINFORCE: l = -A logp (no ratio, no clip). The same per-token loss as verl's "gpg"."""
    return -adv * logp, {}


def gpg(logp, old, adv, valid):
    """GPG (arXiv 2504.02546), verl's compute_policy_loss_gpg: l = -A logp, the REINFORCE loss;
    what distinguishes GPG is its advantage (verl's "gpg" estimator), not the loss."""
    return -adv * logp, {}


def _covariance(adv, logp, valid):
    """Per-token (A - mean A)(logp - mean logp), the means over the valid tokens (detached)."""
    n = valid.sum().clamp(min=1)
    zero = torch.zeros((), device=adv.device)
    a, lp = adv.detach(), logp.detach()
    mean_a = torch.where(valid, a, zero).sum() / n
    mean_lp = torch.where(valid, lp, zero).sum() / n
    return (a - mean_a) * (lp - mean_lp)


def clip_cov(logp, old, adv, valid, clip_low=0.2, clip_high=None, clip_cov_ratio=2e-4, clip_cov_lb=1.0,
             clip_cov_ub=5.0):
    """Clip-Cov (arXiv 2505.22617, verl's compute_policy_loss_clip_cov): the PPO clip loss, and
    among the tokens the clip leaves alone whose covariance (A - mean A)(logp - mean logp) lies in
    (clip_cov_lb, clip_cov_ub), max(1, int(clip_cov_ratio N)) chosen uniformly at random
    (torch.randperm on the default CPU generator, as verl) get no gradient (loss x 0).
    Batch-level: a torch composite (data-dependent selection; not torch.compile-able).
    covfrac: the fraction of valid tokens so dropped (verl reports it as pg_clipfrac)."""
    clip_high = clip_low if clip_high is None else clip_high
    loss, extras = clipped_surrogate(_ratio(logp, old), adv, clip_low, clip_high)
    cov = _covariance(adv, logp, valid)
    cand = valid & ~extras["clipfrac"] & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    n_drop = max(int(clip_cov_ratio * int(valid.sum())), 1)
    idx = torch.nonzero(cand)
    if len(idx) > 0:
        idx = idx[torch.randperm(len(idx))[: min(n_drop, len(idx))].to(idx.device)]
    drop = torch.zeros_like(valid)
    drop[idx[:, 0], idx[:, 1]] = True
    extras["covfrac"] = drop
    return torch.where(drop, torch.zeros_like(loss), loss), extras


def kl_cov(logp, old, adv, valid, kl_cov_ratio=2e-4, ppo_kl_coef=0.1):
    """KL-Cov (arXiv 2505.22617, verl's compute_policy_loss_kl_cov): no clip; l = -A r, and on
    the max(1, int(kl_cov_ratio N)) valid tokens of largest covariance (A - mean A)(logp - mean
    logp) (torch.topk) l = -A r + ppo_kl_coef |d|. Batch-level: a torch composite (not
    torch.compile-able). covfrac: the fraction of valid tokens penalised."""
    d = logp - old
    ratio = _ratio(logp, old)
    loss = -adv * ratio
    n = int(valid.sum())
    sel = torch.zeros_like(valid)
    if n > 0:
        flat_valid = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
        cov = _covariance(adv, logp, valid).reshape(-1)[flat_valid]
        top = torch.topk(cov, max(1, int(n * kl_cov_ratio)), largest=True).indices
        sel.view(-1)[flat_valid[top]] = True
    loss = torch.where(sel, loss + ppo_kl_coef * torch.clamp(d, -LOG_RATIO_BOUND, LOG_RATIO_BOUND).abs(), loss)
    return loss, {"ratio": ratio, "covfrac": sel}


# ---- rollout-mismatch correction (TIS / MIS) ------------------------------------------------------

ROLLOUT_IS_LEVELS = ("token", "sequence")
ROLLOUT_RS_LEVELS = ("token", "sequence", "geometric")


def _masked_mean(x, valid):
    zero = torch.zeros((), device=x.device)
    return torch.where(valid, x.detach().float(), zero).sum() / valid.sum().clamp(min=1)


def rollout_correction(old, rollout, valid, rollout_is=None, rollout_is_threshold=2.0, rollout_is_threshold_lower=None,
                       rollout_rs=None, rollout_rs_threshold=None, rollout_rs_threshold_lower=None):
    """Importance weights of the trainer's (old) policy against the rollout engine's, from
    lw_bt = old_bt - rollout_bt at the valid tokens (0 elsewhere). Returns (weight [B, T] fp32
    detached or None, keep bool [B, T], stats).

    TIS (rollout_is "token" | "sequence"): w = exp(clamp(lw, -20, 20)) per token, or
      exp(clamp(sum_t lw_bt, -20, 20)) per row; truncated: min(w, rollout_is_threshold), and
      max(., rollout_is_threshold_lower) when given; a stop-gradient factor on the per-token loss.
    MIS (rollout_rs "token" | "sequence" | "geometric"): the token ratio, the row's product
      (sum of lw) or its geometric mean (mean of lw); tokens (rows) whose ratio lies outside
      [rollout_rs_threshold_lower (default 1 / rollout_rs_threshold), rollout_rs_threshold] leave
      the loss: they are removed from the mask (so they leave the aggregation's counts too).
    stats (means over the valid tokens): rollout_kl_k1 = mean(rollout - old), rollout_kl_k3 =
      mean(exp(lw) - lw - 1) (lw clamped to +-20): estimates of KL(rollout || old) from rollout
      samples; rollout_is_weight_mean (after truncation; 1 without TIS); rollout_is_truncated_frac
      (w outside the truncation bounds); rollout_rs_masked_frac (tokens dropped by MIS).
    """
    zero = torch.zeros((), device=old.device)
    lw = torch.where(valid, old.float() - rollout.float(), zero)
    lw_c = torch.clamp(lw, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    row_sum = lw.sum(-1, keepdim=True).expand_as(lw)
    weight, truncated = None, torch.zeros_like(valid)
    if rollout_is is not None:
        log_w = lw if rollout_is == "token" else row_sum
        w = torch.exp(torch.clamp(log_w, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        truncated = w > rollout_is_threshold
        if rollout_is_threshold_lower is not None:
            truncated = truncated | (w < rollout_is_threshold_lower)
        weight = torch.clamp(w, min=rollout_is_threshold_lower, max=rollout_is_threshold).detach()
    keep = valid
    if rollout_rs is not None:
        if rollout_rs == "token":
            log_w = lw
        elif rollout_rs == "sequence":
            log_w = row_sum
        else:
            log_w = _row_mean(lw, valid).unsqueeze(-1).expand_as(lw)
        w = torch.exp(torch.clamp(log_w, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        lo = 1.0 / rollout_rs_threshold if rollout_rs_threshold_lower is None else rollout_rs_threshold_lower
        keep = valid & (w >= lo) & (w <= rollout_rs_threshold)
    stats = {
        "rollout_kl_k1": _masked_mean(-lw, valid),
        "rollout_kl_k3": _masked_mean(torch.exp(lw_c) - lw_c - 1.0, valid),
        "rollout_is_weight_mean": _masked_mean(torch.ones_like(lw) if weight is None else weight, valid),
        "rollout_is_truncated_frac": _masked_mean(truncated.float(), valid),
        "rollout_rs_masked_frac": _masked_mean((valid & ~keep).float(), valid),
    }
    return weight, keep, stats


# ---- the whole loss --------------------------------------------------------------------------------


def summarize(extras, logp, old, keep):
    """The stats of a policy loss: approx_kl = mean(old - logp), ratio_mean / ratio_max of
    extras["ratio"], and the mean of every other extra, over the kept tokens (0 when none)."""
    stats = {"approx_kl": _masked_mean(old - logp, keep)}
    for name, value in extras.items():
        if name == "ratio":
            r = value.detach().float()
            stats["ratio_mean"] = _masked_mean(r, keep)
            stats["ratio_max"] = torch.where(keep, r, torch.zeros((), device=r.device)).amax() if r.numel() \
                else torch.zeros((), device=r.device)
        else:
            stats[name] = _masked_mean(value.float(), keep)
    return stats


def policy_loss(formula, logprobs, old_logprobs, advantages, mask, params, agg="token-mean", global_count=None,
                horizon=None, rollout_logprobs=None, correction=None):
    """The reference of fastalign.policy_loss: fp32 (loss, stats) of the per-token `formula` with
    `params`, the rollout correction (`correction`: rollout_correction's keyword arguments) and
    the aggregation `agg` (kernels/reference.ppo_agg) over the kept tokens."""
    valid = mask != 0
    zero = torch.zeros((), device=logprobs.device)
    # where() first: NaN/inf at masked tokens must reach neither the loss nor (0 * NaN) the gradient
    logp, old, adv = (torch.where(valid, t.float(), zero) for t in (logprobs, old_logprobs, advantages))
    old, adv = old.detach(), adv.detach()
    weight, keep, rstats = None, valid, {}
    if rollout_logprobs is not None:
        weight, keep, rstats = rollout_correction(old, torch.where(valid, rollout_logprobs.detach().float(), zero),
                                                  valid, **(correction or {}))
    out = formula(logp, old, adv, keep, **params)
    loss_tok, extras = out if isinstance(out, tuple) else (out, {})
    if weight is not None:
        loss_tok = loss_tok * weight
    loss = ppo_agg(loss_tok.float(), keep, agg, global_count, horizon)
    stats = summarize(extras, logp, old, keep)
    stats.update(rstats)
    return loss, {k: v.detach().float() for k, v in stats.items()}
