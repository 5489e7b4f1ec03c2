"""Eager PyTorch reference of the reference-free paired losses (fastalign/ops/ref_free.py): ORPO,
CPO (sigmoid, hinge, ipo) and SimPO, from the token log-probs of a [chosen; rejected] batch.

Plain fp32 math straight from the formulas, differentiated by autograd; the ground truth of the
cpp, triton and cuda kernels, and the `backend="torch"` implementation.

Per row j of the [2B, T] token log-probs x with mask m: S_j = sum of the valid x, n_j = the valid
count, the row's log-prob s_j = S_j / max(n_j, 1) (mean) or S_j (sum). Pair i: c = s_i (chosen),
r = s_{B+i} (rejected). With eps = label_smoothing:

    orpo     z = log odds(c) - log odds(r),  log odds(y) = y - log1mexp(y),  log1mexp(y) = log(1 - e^y)
             pref = -beta logsig(z)                                       (Hong et al. 2024)
    sigmoid  z = beta (c - r) - gamma
             pref = -(1 - eps) logsig(z) - eps logsig(-z)                 (CPO, Xu et al. 2024;
                                                                          SimPO, Meng et al. 2024)
    hinge    z = beta (c - r),             pref = relu(1 - z)
    ipo      z = c - r,                    pref = (z - 1/(2 beta))^2

    losses   = pref + nll_weight * nll,   nll = -S_i / max(n_i, 1)  (the chosen row's mean NLL)
    rewards  = beta c, beta r  (detached)

ORPO's log odds need y < 0: a mean log-prob of exactly 0 (every token certain in fp32) has
infinite odds. Both c and r are floored at -2^-24 (ODDS_FLOOR: exp(y) rounds to 1 in fp32 above
it, i.e. the probability is 1 to fp32 resolution) before the odds are taken; the floor passes the
gradient straight through (the derivative is that of the floored point, not 0), so a rejected
response at probability ~1 is still pushed down. log1mexp is evaluated as log1p(-e^y) below -ln 2
and log(-expm1(y)) above (Maechler 2012), accurate for y from -2^-24 to -1e4 and beyond.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("orpo", "sigmoid", "hinge", "ipo")  # index = the kernels' kind id
ODDS_FLOOR = 2.0**-24
LN2 = math.log(2.0)


def row_stats(x, mask, mean):
    """(s [2B], n [2B]) fp32: the masked row sums (or means) and valid counts. Masked positions are
    never read into a sum (NaN there is harmless)."""
    valid = mask != 0
    s = torch.where(valid, x.float(), 0.0).sum(-1)
    n = valid.sum(-1).to(torch.float32)
    return (s / n.clamp(min=1) if mean else s), n


def log1mexp(y):
    """log(1 - exp(y)) for y < 0, stable at both ends. Each branch is evaluated on an argument of
    its own range, so the branch torch.where discards has a finite gradient (0 * inf = NaN)."""
    low = y < -LN2
    a = torch.where(low, y, torch.full_like(y, -1.0))
    b = torch.where(low, torch.full_like(y, -0.5), y)
    return torch.where(low, torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(b)))


def odds_floor(y):
    """min(y, -ODDS_FLOOR) in value, with derivative 1 (straight through); NaN stays NaN."""
    floored = (y - y.detach()) - ODDS_FLOOR  # the value -ODDS_FLOOR exactly, the gradient of y
    return torch.where(y > -ODDS_FLOOR, floored, y)


def log_odds(y):
    """log(p / (1 - p)) of p = e^y, y floored at -2^-24."""
    y = odds_floor(y)
    return y - log1mexp(y)


def pair_logits(c, r, kind, beta, gamma):
    """z, the argument of the pair loss (see the module)."""
    if kind == "orpo":
        return log_odds(c) - log_odds(r)
    if kind == "sigmoid":
        return beta * (c - r) - gamma
    if kind == "hinge":
        return beta * (c - r)
    if kind == "ipo":
        return c - r
    raise ValueError(f"unknown reference-free loss kind {kind!r}")


def pair_loss(z, kind, beta, label_smoothing):
    """The preference term of each pair from its logits z."""
    eps = label_smoothing
    if kind == "orpo":
        return -beta * F.logsigmoid(z)
    if kind == "sigmoid":
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if kind == "hinge":
        return torch.relu(1 - z)
    return (z - 1 / (2 * beta)) ** 2


def ref_free_losses(policy, mask, kind, beta, gamma=0.0, nll_weight=0.0, label_smoothing=0.0, mean=True):
    """(losses, chosen_rewards, rejected_rewards, nll, logits [B], row_stats [2, 2B]) fp32, as the
    fused op returns them: row_stats = (s, n), the rows' log-probs and valid counts. Only the losses
    carry a gradient (to policy)."""
    s, n = row_stats(policy, mask, mean)
    b = s.shape[0] // 2
    c, r = s[:b], s[b:]
    z = pair_logits(c, r, kind, beta, gamma)
    nll = -(s[:b] if mean else s[:b] / n[:b].clamp(min=1))
    losses = pair_loss(z, kind, beta, label_smoothing) + nll_weight * nll
    return (losses, (beta * c).detach(), (beta * r).detach(), nll.detach(), z.detach(),
            torch.stack([s.detach(), n]))
