"""Eager PyTorch references: the ground truth every fused kernel is tested against.

Plain, readable math in fp32, straight from the formulas in each op's docstring; no fusion tricks.
These are also the `backend="torch"` implementations.
"""

from __future__ import annotations

import torch


def gather_logprobs(logits, labels, temperature=1.0, ignore_index=-100, return_entropy=False):
    """fp32 log_softmax(logits / T)[label] and, optionally, the entropy of softmax(logits / T).

    Positions whose label is ignore_index give 0 (for both outputs) and receive no gradient.
    Labels are assumed valid (the public op checks them).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = labels.long() != ignore_index  # int64: an int32 compare would wrap a large ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    token_logp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    token_logp = torch.where(valid, token_logp, torch.zeros_like(token_logp))
    if not return_entropy:
        return token_logp
    p = logp.exp()
    # 0 * log 0 = 0 for masked-out vocabulary entries (logit -inf), with a finite gradient
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return token_logp, entropy


# ---- GAE, whitening, KL penalties (fastalign.ops.gae, fastalign.ops.kl) -----------------------


@torch.no_grad()
def gae(rewards, values, mask, gamma=1.0, lam=1.0):
    """Generalized Advantage Estimation, the plain per-time-step loop (as TRL and verl write it).

    rewards, values, mask `[B, T]`; mask nonzero = a valid (action) step. Reverse scan with
    state (next value V, running advantage A), both 0 after the last step. At a valid step t:
        delta_t = r_t + gamma * V - v_t;   A = delta_t + gamma * lam * A;   V = v_t
    and the outputs are advantages[t] = A, returns[t] = A + v_t. A masked step leaves (V, A)
    unchanged (verl's multi-turn semantics: the value and advantage carry through observation
    tokens) and its outputs are 0. fp32 outputs; no gradient.
    """
    r, v = rewards.float(), values.float()
    valid = mask != 0
    batch, steps = r.shape
    next_value = r.new_zeros(batch)
    running = r.new_zeros(batch)
    advantages = r.new_zeros(batch, steps)
    for t in reversed(range(steps)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        here = valid[:, t]
        # torch.where, not a multiply by the mask: NaN/inf at masked steps must not leak in
        running = torch.where(here, delta + gamma * lam * running, running)
        next_value = torch.where(here, v[:, t], next_value)
        advantages[:, t] = torch.where(here, running, torch.zeros_like(running))
    returns = torch.where(valid, advantages + v, torch.zeros_like(advantages))
    return advantages, returns


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """fp32 `(x - mean) * rsqrt(var + eps)`, mean and unbiased (Bessel) variance over the entries
    where mask is nonzero, applied to every entry of x; with shift_mean=False the mean is added
    back. Fewer than 2 masked entries (variance undefined): the scale is 1, i.e. the result is
    x - mean (mean = 0 when nothing is masked in)."""
    xf = x.float()
    valid = mask != 0
    n = valid.sum()
    zero = torch.zeros((), dtype=torch.float32, device=xf.device)
    # where() before any arithmetic, so NaN/inf outside the mask reach neither the statistics
    # nor (through a 0 * NaN product) their gradients
    xv = torch.where(valid, xf, zero)
    mean = xv.sum() / n.clamp(min=1)
    dev = torch.where(valid, xv - mean, zero)
    var = (dev * dev).sum() / (n - 1).clamp(min=1)
    centered = xf - mean
    scale = torch.where(n >= 2, torch.rsqrt(var + eps), torch.ones_like(var))
    out = centered * scale
    return out if shift_mean else out + mean


def kl_penalty(logprobs, ref_logprobs, kind="k1"):
    """fp32 per-token KL penalty estimates, with d = logprobs - ref_logprobs:
    k1 = d; abs = |d|; k2 = d^2 / 2; k3 = clamp(e^x - x - 1, -10, 10), x = clamp(-d, -20, 20)."""
    d = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        x = torch.clamp(-d, -20.0, 20.0)
        return torch.clamp(torch.exp(x) - x - 1.0, -10.0, 10.0)
    raise ValueError(f"kl_penalty: unknown kind {kind!r}")


# ---- PPO losses (fastalign.ops.ppo) -----------------------------------------------------------

PPO_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def ppo_agg(loss_mat, valid, agg="token-mean", global_count=None, horizon=None):
    """Aggregates a per-token loss [B, T] over the valid (mask nonzero) tokens into a fp32 scalar.

    token-mean:              sum of valid losses / N          (N = number of valid tokens)
    seq-mean-token-sum:      sum_b (sum_t l_bt)        / S    (S = number of rows with a valid token)
    seq-mean-token-mean:     sum_b (sum_t l_bt / n_b)  / S    (n_b = valid tokens in row b)
    seq-mean-token-sum-norm: sum_b (sum_t l_bt)        / (S * H)   (H = horizon, default T)
    global_count replaces N (token-mean) or S (seq-mean-*) -- the global count across micro-batches
    and ranks, so that micro-batch losses add up to the full-batch loss. Rows without a valid token
    take no part (as verl's agg_loss); a zero count gives loss 0, never NaN.
    """
    zero = torch.zeros((), dtype=torch.float32, device=loss_mat.device)
    masked = torch.where(valid, loss_mat, zero)  # where(), not * mask: no NaN from masked tokens
    n_b = valid.sum(-1).float()
    if agg == "token-mean":
        total, count = masked.sum(), n_b.sum()
    elif agg in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        seq = masked.sum(-1)
        if agg == "seq-mean-token-mean":
            seq = seq / n_b.clamp(min=1)
        total, count = seq.sum(), (n_b > 0).sum().float()
        if agg == "seq-mean-token-sum-norm":
            total = total / float(max(loss_mat.shape[-1], 1) if horizon is None else horizon)
    else:
        raise ValueError(f"unknown agg {agg!r}; valid: {PPO_AGG_MODES}")
    if global_count is not None:
        count = torch.full_like(count, float(global_count))
    return torch.where(count > 0, total / count.clamp(min=1e-30), zero)


def _masked_mean_detached(x, valid):
    x = torch.where(valid, x.detach().float(), torch.zeros((), device=x.device))
    return x.sum() / valid.sum().clamp(min=1)


def clipped_surrogate(ratio, adv, clip_low, clip_high):
    """PPO's clipped surrogate per token, max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)), and
    its clip indicators: clipfrac = the clipped term strictly larger, which is exactly A < 0 and
    r < 1 - clip_low (clipfrac_low) or A > 0 and r > 1 + clip_high (clipfrac_high)."""
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = loss2 > loss1
    extras = {"ratio": ratio, "clipfrac": clipped, "clipfrac_low": clipped & (adv < 0),
              "clipfrac_high": clipped & (adv > 0)}
    return torch.maximum(loss1, loss2), extras


def ppo_token_loss(logp, old, adv, clip_low, clip_high, dual_clip=None):
    """PPO's per-token loss, r = exp(clamp(logp - old, -20, 20)):
        l = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high));  A < 0 and dual_clip = c: l = min(l, -A c).
    Returns (l, extras): clipped_surrogate's indicators and the ratio, plus clipfrac_lower = A < 0
    and the dual-clip cap binding (l > -A c). The one formula of ppo_policy_loss and of
    fastalign.policy_loss's "ppo" (reference_policy_losses.ppo)."""
    loss, extras = clipped_surrogate(torch.exp(torch.clamp(logp - old, -20.0, 20.0)), adv, clip_low, clip_high)
    lower = torch.zeros_like(extras["clipfrac"])
    if dual_clip is not None:
        cap = -adv * dual_clip
        neg = adv < 0
        lower = neg & (loss > cap)
        loss = torch.where(neg, torch.minimum(loss, cap), loss)
    extras["clipfrac_lower"] = lower
    return loss, extras


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=None, dual_clip=None,
                    agg="token-mean", global_count=None, horizon=None):
    """PPO clipped surrogate (fastalign.ppo_policy_loss), fp32: ppo_token_loss aggregated by
    ppo_agg over mask != 0. Returns (loss, stats): clipfrac = valid fraction with the clipped term
    strictly larger, clipfrac_lower = valid fraction with A < 0 and the dual-clip cap binding (l >
    -A c), approx_kl = valid mean of old - logp (not clamped); stats are detached."""
    clip_high = clip_low if clip_high is None else clip_high
    valid = mask != 0
    # where() first: NaN/inf at masked tokens must reach neither the loss nor (0 * NaN) the gradient
    logp, old, adv = (torch.where(valid, t.float(), 0.0) for t in (logprobs, old_logprobs, advantages))
    loss_tok, extras = ppo_token_loss(logp, old, adv, clip_low, clip_high, dual_clip)
    loss = ppo_agg(loss_tok, valid, agg, global_count, horizon)
    stats = {
        "clipfrac": _masked_mean_detached(extras["clipfrac"].float(), valid),
        "clipfrac_lower": _masked_mean_detached(extras["clipfrac_lower"].float(), valid),
        "approx_kl": _masked_mean_detached(old - logp, valid),
    }
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip=None, agg="token-mean", global_count=None, horizon=None):
    """Clipped value loss (fastalign.ppo_value_loss), fp32: 0.5 * agg(max((v - R)^2, (clamp(v, v_old - c, v_old + c) - R)^2));
    without clip, 0.5 * agg((v - R)^2). Stats (detached): vf_clipfrac = valid fraction with the clipped
    term strictly larger, vpred_mean = valid mean of v, value_mse = valid mean of (v - R)^2."""
    valid = mask != 0
    v, ret = (torch.where(valid, t.float(), 0.0) for t in (values, returns))
    loss1 = (v - ret) ** 2
    clipfrac = torch.zeros_like(loss1)
    if clip is None:
        loss_tok = loss1
    else:
        vo = torch.where(valid, old_values.float(), 0.0)
        loss2 = (torch.clamp(v, vo - clip, vo + clip) - ret) ** 2
        loss_tok = torch.maximum(loss1, loss2)
        clipfrac = (loss2 > loss1).float()
    loss = 0.5 * ppo_agg(loss_tok, valid, agg, global_count, horizon)
    stats = {
        "vf_clipfrac": _masked_mean_detached(clipfrac, valid),
        "vpred_mean": _masked_mean_detached(v, valid),
        "value_mse": _masked_mean_detached(loss1, valid),
    }
    return loss, stats


# ---- Preference (sequence_logps, dpo_loss, dpo_loss_from_tokens, reward_loss) -----------------


def sequence_logps(token_logps, mask, mean=False):
    """fp32 per-row sum (or mean) of token_logps over valid positions (mask nonzero), [N, T] -> [N].
    Masked positions are never read into the result (NaN there is harmless); a row with no valid
    position gives 0 for both sum and mean."""
    valid = mask != 0
    s = torch.where(valid, token_logps.float(), 0.0).sum(-1)
    if mean:
        s = s / valid.sum(-1).clamp(min=1).to(torch.float32)
    return s


def _logsigmoid(x):
    return torch.nn.functional.logsigmoid(x)


def dpo_pair_losses(delta, beta, loss_type, label_smoothing):
    """The published per-pair DPO losses of the fp32 margin delta = (c - ref_c) - (r - ref_r)."""
    eps = label_smoothing
    x = beta * delta
    if loss_type == "sigmoid":  # conservative DPO (Mitchell 2023) for eps > 0
        return -(1 - eps) * _logsigmoid(x) - eps * _logsigmoid(-x)
    if loss_type == "ipo":  # Azar et al. 2023
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":  # SLiC (Zhao et al. 2023)
        return torch.relu(1 - x)
    if loss_type == "robust":  # rDPO (Chowdhury et al. 2024)
        return (-(1 - eps) * _logsigmoid(x) + eps * _logsigmoid(-x)) / (1 - 2 * eps)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}")


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    """(losses, chosen_rewards, rejected_rewards), fp32 [B]; rewards detached."""
    c, r, rc, rr = (t.float() for t in (chosen, rejected, ref_chosen, ref_rejected))
    delta = (c - rc) - (r - rr)
    losses = dpo_pair_losses(delta, beta, loss_type, label_smoothing)
    return losses, (beta * (c - rc)).detach(), (beta * (r - rr)).detach()


def reward_loss(chosen_scores, rejected_scores, margin=None, center_coef=None):
    """Mean Bradley-Terry loss -logsigmoid(c - r - margin), fp32 scalar; with center_coef,
    plus center_coef * mean((c + r)^2) (the centring regulariser of Eisenstein et al. 2023)."""
    c, r = chosen_scores.float(), rejected_scores.float()
    d = c - r
    if margin is not None:
        d = d - (margin.float() if isinstance(margin, torch.Tensor) else float(margin))
    loss = -_logsigmoid(d).mean()
    if center_coef is not None:
        loss = loss + float(center_coef) * (c + r).square().mean()
    return loss


# ---- linear_gather_logprobs (fastalign.ops.linear_logprobs) ----------------------------------


def linear_gather_logprobs(hidden, weight, bias, labels, temperature=1.0, ignore_index=-100,
                           return_entropy=False, chunk_size=1024):
    """gather_logprobs(hidden @ weight.T + bias, labels) computed `chunk_size` tokens at a time.

    hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 (valid). Each chunk's logits
    are recomputed in the backward (activation checkpointing), so only one chunk's [chunk, V]
    logits are alive at a time; the math is the plain eager reference's.
    """
    from torch.utils.checkpoint import checkpoint

    def chunk(h, w, b, lab):
        logits = h @ w.T if b is None else torch.addmm(b, h, w.T)
        res = gather_logprobs(logits, lab, temperature, ignore_index, return_entropy)
        return res if return_entropy else (res,)

    outs = []
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        outs.append(checkpoint(chunk, hidden[sl], weight, bias, labels[sl], use_reentrant=False))
    if not outs:  # no tokens: the plain path on empty tensors (keeps the autograd graph)
        res = chunk(hidden, weight, bias, labels)
        return res if return_entropy else res[0]
    cols = [torch.cat(c) for c in zip(*outs)]
    return tuple(cols) if return_entropy else cols[0]
