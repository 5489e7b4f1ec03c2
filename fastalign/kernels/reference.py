"""Eager PyTorch references: the ground truth every fused kernel is tested against.

Plain, readable math in fp32, straight from the formulas in DESIGN.md; no fusion tricks.
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
    valid = labels != ignore_index
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
