"""Reference-free paired preference losses from token log-probs: orpo_loss_from_tokens,
cpo_loss_from_tokens and simpo_loss_from_tokens.

One fused op, REF_FREE_TOKENS (fastalign::ref_free_tokens_{fwd,bwd}; fastalign_triton::...),
serves the three: they share everything but a few scalar lines per pair. Each row of the
[chosen; rejected] batch is reduced once to its masked sum and valid count (one read of the token
log-probs), the pair's loss -- preference term plus an NLL term on the chosen row -- follows from
those two numbers per row, and the backward writes one scalar per row to its valid tokens (one
write, no re-read of the log-probs: the counts are saved). A `kind` id picks the pair formula
(kernels/reference_ref_free.py has them all): one kernel per backend instead of three, three
public functions because their parameters and defaults differ (ORPO's lambda, CPO's alpha and
loss types, SimPO's gamma).

Backends: torch (kernels/reference_ref_free.py), cpp (csrc/cpu/ref_free.cpp), cuda
(csrc/cuda/ref_free.cu), triton (kernels/triton/ref_free.py). All math in fp32, results fp32,
token gradients in the token log-probs' dtype.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from fastalign import _backends
from fastalign.kernels import reference_ref_free as R
from fastalign.ops._checks import (FP32_MAX, check_flag, check_float_tensor, check_mask, check_normal_fp32,
                                   kernel_mask, same_device)
from fastalign.ops._fused import FusedOp

KIND_IDS = {name: i for i, name in enumerate(R.KINDS)}  # the kernels' kind argument
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


class PairLosses(NamedTuple):
    """Per-pair results [B], fp32. `losses` carries the gradient; the rest are detached.

    losses            preference term + nll_weight * nll
    chosen_rewards    beta * c (c: the chosen row's log-prob as the loss uses it, mean or sum)
    rejected_rewards  beta * r
    nll               the chosen row's mean negative log-likelihood, -sum / count (0 for no token)
    logits            the argument of the pair loss: ORPO's log odds ratio, beta (c - r) - gamma
                      (sigmoid, simpo), beta (c - r) (hinge), c - r (ipo)
    chosen_logps, rejected_logps   c and r
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    nll: torch.Tensor
    logits: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


# ---- the fused op description -------------------------------------------------------------------


def _fake_fwd(pol, mask, kind, beta, gamma, nll_weight, eps, mean):
    same_device("ref_free_tokens_fwd", policy=pol, mask=mask)
    rows = pol.shape[0]
    pairs = tuple(pol.new_empty((rows // 2,), dtype=torch.float32) for _ in range(5))
    return (*pairs, pol.new_empty((2, rows), dtype=torch.float32))


def _fake_bwd(grad, stats, pol, mask, kind, beta, gamma, nll_weight, eps, mean):
    same_device("ref_free_tokens_bwd", policy=pol, grad_losses=grad, row_stats=stats, mask=mask)
    return torch.empty_like(pol)


def _setup(ctx, inputs, output):
    pol, mask = inputs[:2]
    ctx.save_for_backward(pol, mask, output[5])
    ctx.args = inputs[2:]


def _backward(ctx, bwd, grad_losses, *_detached):
    # only the losses carry a gradient (the public functions detach the other outputs)
    if grad_losses is None:
        return (None,) * 8
    pol, mask, stats = ctx.saved_tensors
    return (bwd(grad_losses, stats, pol, mask, *ctx.args), *(None,) * 7)


# policy [2B, T] = [chosen; rejected] token log-probs, mask [2B, T] (nonzero = valid); kind: KIND_IDS;
# mean: rows reduced to their mean (else sum). Returns (losses, chosen_rewards, rejected_rewards,
# nll, logits) [B] and row_stats [2, 2B] = (row log-probs, valid counts), all fp32; the backward
# returns the gradient w.r.t. policy, in its dtype.
REF_FREE_TOKENS = FusedOp(
    name="ref_free_tokens",
    fwd_schema="(Tensor policy, Tensor mask, int kind, float beta, float gamma, float nll_weight, "
               "float label_smoothing, bool mean) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_losses, Tensor row_stats, Tensor policy, Tensor mask, int kind, float beta, "
               "float gamma, float nll_weight, float label_smoothing, bool mean) -> Tensor",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup, backward=_backward,
    triton="fastalign.kernels.triton.ref_free",
)

_OPS = REF_FREE_TOKENS.table()  # backend -> (fwd, bwd): the tests run the raw ops from it


# ---- validation and the shared driver -----------------------------------------------------------


def _check_number(op, name, x, *, lo=None, hi=None, what="") -> float:
    """x as a float: a real number (not a bool) that is finite in fp32 (the kernels take it there),
    with lo <= x (and x < hi); `what` describes the range in the error."""
    v = float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else float("nan")
    if not (abs(v) <= FP32_MAX and (lo is None or v >= lo) and (hi is None or v < hi)):
        raise ValueError(f"{op}: {name} must be a finite number{what}, got {x!r}")
    return v


def _run(op, policy_token_logps, mask, kind, beta, gamma, nll_weight, eps, mean, backend) -> PairLosses:
    check_float_tensor(op, "policy_token_logps", policy_token_logps)
    pol = policy_token_logps
    if pol.dim() != 2:
        raise ValueError(f"{op}: policy_token_logps must be 2-D [2B, T] ([chosen; rejected]), got "
                         f"{tuple(pol.shape)}")
    if pol.shape[0] % 2:
        raise ValueError(f"{op}: policy_token_logps must have an even number of rows 2B ([chosen; rejected]), "
                         f"got {pol.shape[0]}")
    check_mask(op, mask, pol, "policy_token_logps")
    name = _backends.resolve(backend, pol.device, op=op)
    b = pol.shape[0] // 2
    if name == "torch":
        out = R.ref_free_losses(pol, mask, R.KINDS[kind], beta, gamma, nll_weight, eps, mean)
    else:
        out = REF_FREE_TOKENS.kernels(name)[0](pol.contiguous(), kernel_mask(mask, name), kind, beta, gamma,
                                               nll_weight, eps, mean)
    losses, cw, rw, nll, z, stats = out
    s = stats[0].detach()
    return PairLosses(losses, cw.detach(), rw.detach(), nll.detach(), z.detach(), s[:b], s[b:])


# ---- public ops ---------------------------------------------------------------------------------


def orpo_loss_from_tokens(policy_token_logps: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.1,
                          nll_weight: float = 1.0, backend: str = "auto") -> PairLosses:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"),
    per pair, from the token log-probs of a [chosen; rejected] batch.

    policy_token_logps [2B, T] float32/bfloat16/float16 (rows 0..B-1 the chosen completions,
    B..2B-1 the rejected ones of the same pairs); mask [2B, T], bool or any real dtype (nonzero =
    valid). With c, r the length-averaged (masked mean) log-probs of chosen and rejected:

        log odds(y) = y - log(1 - e^y)
        losses = nll_weight * nll - beta * logsig(log odds(c) - log odds(r)),   nll = -c

    beta is the paper's lambda (TRL's ORPOConfig.beta). Returns `PairLosses` (losses with gradient
    to policy_token_logps, in its dtype; rewards beta * c, beta * r; nll; logits = the log odds
    ratio, TRL's `log_odds`; c and r). Finite for any finite input: log(1 - e^y) is computed as
    log1p(-e^y) below -ln 2 and log(-expm1(y)) above, and c, r are floored at -2^-24 (see
    kernels/reference_ref_free.py), so a mean log-prob of exactly 0 (probability 1 in fp32) gives
    a finite loss and gradient, as does -1e4.

    Differences from the peers (the odds-ratio term equals TRL 1.16's `odds_ratio_loss` wherever
    theirs is finite):
      * NLL: here the chosen row's mean NLL per pair over the completion tokens of `mask` (the
        mean over pairs is a per-sequence token mean). TRL's ORPOTrainer takes the token mean of
        the cross-entropy over the whole chosen batch, prompt tokens included; Liger's fused ORPO
        the token mean over the batch's chosen target tokens. Equal when the chosen completions
        have one length (and, for TRL, the mask covers the prompt).
      * c or r = 0 (or within 2^-24 of it): TRL's log1mexp gives -inf there (an infinite log
        odds, a NaN gradient); Liger's log1p(-exp(y)) already for y > -2^-25 and loses accuracy
        near 0 (exp(y) rounds to 1 - 2^-24k). Here the floor keeps both finite.
    """
    op = "orpo_loss_from_tokens"
    beta = check_normal_fp32(op, "beta", beta)
    nll_weight = _check_number(op, "nll_weight", nll_weight, lo=0.0, what=" >= 0")
    return _run(op, policy_token_logps, mask, KIND_IDS["orpo"], beta, 0.0, nll_weight, 0.0, True, backend)


def cpo_loss_from_tokens(policy_token_logps: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.1,
                         loss_type: str = "sigmoid", nll_weight: float = 1.0, label_smoothing: float = 0.0,
                         simpo_gamma: float = 0.5, average_log_prob: bool | None = None,
                         backend: str = "auto") -> PairLosses:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization"), with TRL 1.16 CPOTrainer's
    loss types, per pair, from the token log-probs of a [chosen; rejected] batch.

    Inputs as `orpo_loss_from_tokens`. c, r: the chosen and rejected log-probs, masked sums, or
    means with average_log_prob=True (None: TRL's choice, means for "ipo" and "simpo", sums for
    "sigmoid" and "hinge"). With eps = label_smoothing, alpha = nll_weight (TRL's cpo_alpha):

        sigmoid  -(1-eps) logsig(beta (c - r)) - eps logsig(-beta (c - r))
        hinge    relu(1 - beta (c - r))
        ipo      (c - r - 1/(2 beta))^2
        simpo    -(1-eps) logsig(x) - eps logsig(-x),  x = beta (c - r) - simpo_gamma
        losses = that + alpha * nll,   nll = the chosen row's mean NLL (-sum / count)

    Returns `PairLosses` (rewards beta * c, beta * r as TRL logs them; logits = the argument of
    the loss above, c - r for ipo). logsig is evaluated as min(x, 0) - log1p(exp(-|x|)): finite
    for any finite margin (|beta (c - r)| = 1e4 included).

    Differences from TRL 1.16 (cpo_trainer.py, CPOTrainer.cpo_loss / concatenated_forward): TRL's
    NLL is the token mean of the chosen completions' cross-entropy over the whole batch, here the
    per-pair mean (the same when the chosen completions have one length); TRL forms simpo's
    argument as beta ((c - r) - gamma / beta), here beta (c - r) - gamma (equal but for rounding).
    TRL's AlphaPO reward transform (CPOConfig.alpha != 0) is not implemented. Liger's fused CPO
    uses mean log-probs for every type (average_log_prob=True here).
    """
    op = "cpo_loss_from_tokens"
    beta = check_normal_fp32(op, "beta", beta)
    if not isinstance(loss_type, str) or loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"{op}: unknown loss_type {loss_type!r}; valid choices: {', '.join(CPO_LOSS_TYPES)}")
    nll_weight = _check_number(op, "nll_weight", nll_weight, lo=0.0, what=" >= 0")
    eps = _check_number(op, "label_smoothing", label_smoothing, lo=0.0, hi=0.5, what=" in [0, 0.5)")
    gamma = _check_number(op, "simpo_gamma", simpo_gamma)
    if average_log_prob is None:
        mean = loss_type in ("ipo", "simpo")
    else:
        mean = check_flag(op, "average_log_prob", average_log_prob)
    kind = KIND_IDS["sigmoid" if loss_type == "simpo" else loss_type]
    gamma = gamma if loss_type == "simpo" else 0.0
    return _run(op, policy_token_logps, mask, kind, beta, gamma, nll_weight, eps, mean, backend)


def simpo_loss_from_tokens(policy_token_logps: torch.Tensor, mask: torch.Tensor, *, beta: float = 2.0,
                           gamma: float = 0.5, label_smoothing: float = 0.0, nll_weight: float = 0.0,
                           backend: str = "auto") -> PairLosses:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward"), per pair, from the token log-probs of a [chosen; rejected] batch.

    Inputs as `orpo_loss_from_tokens`. With c, r the length-averaged (masked mean) log-probs and
    x = beta (c - r) - gamma (gamma: the target reward margin), eps = label_smoothing:

        losses = -(1-eps) logsig(x) - eps logsig(-x) + nll_weight * nll

    (the paper's loss at eps = 0 and nll_weight = 0, the defaults; label smoothing as TRL's CPO
    simpo type and Liger's fused SimPO; nll = the chosen row's mean NLL, TRL's cpo_alpha).
    beta 2.0 and gamma 0.5 are the paper's (and TRL's CPOConfig simpo_gamma) defaults. Returns
    `PairLosses` (rewards beta * c, beta * r; logits = x). The same kernel as
    cpo_loss_from_tokens(loss_type="simpo"); differences from TRL: as listed there.
    """
    op = "simpo_loss_from_tokens"
    beta = check_normal_fp32(op, "beta", beta)
    gamma = _check_number(op, "gamma", gamma)
    eps = _check_number(op, "label_smoothing", label_smoothing, lo=0.0, hi=0.5, what=" in [0, 0.5)")
    nll_weight = _check_number(op, "nll_weight", nll_weight, lo=0.0, what=" >= 0")
    return _run(op, policy_token_logps, mask, KIND_IDS["sigmoid"], beta, gamma, nll_weight, eps, True, backend)
