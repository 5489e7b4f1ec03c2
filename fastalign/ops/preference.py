"""Preference ops: sequence_logps, dpo_loss (every loss type), dpo_loss_from_tokens, reward_loss.

Backends: torch (kernels/reference.py, the eager ground truth), cpp and cuda (fastalign._C:
fastalign::{sequence_logps,dpo_loss,dpo_tokens}_{fwd,bwd}), triton (fastalign_triton::...), all from
the descriptions SEQUENCE_LOGPS, DPO_LOSS and DPO_TOKENS below (fastalign/ops/_fused.py).
Each fused op is one kernel launch forward and one backward; all math is fp32 for every input
dtype and every result is fp32; token gradients come back in the token log-probs' dtype.

DPO loss types live in a registry, `DPO_LOSS_TYPES` (name -> DPOLossType, fastalign/ops/
dpo_loss_types.py). The four built-in
types (sigmoid, ipo, hinge, robust) have fused kernels; a plugin adds a type with
`register_dpo_loss_type(name, formula)`, where `formula(delta, beta, label_smoothing)` maps the
fp32 margin delta = (c - ref_c) - (r - ref_r) [B] to per-pair losses [B] in torch. A plugin type
runs that torch formula on every backend (a fused backend still computes the per-sequence
log-probs of dpo_loss_from_tokens with its fused sequence_logps kernel), so it is correct
everywhere and fast where the formula is cheap.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastalign import _backends
from fastalign.kernels import reference
from fastalign.ops._checks import (check_flag, check_float_tensor, check_mask, check_normal_fp32, kernel_mask,
                                   same_device)
from fastalign.ops._fused import FusedOp
from fastalign.ops.dpo_loss_types import DPO_LOSS_TYPES, DPOLossType, register_dpo_loss_type  # noqa: F401


# ---- fused op descriptions: fakes and autograd, shared by every backend -----------------------


def _fake_seq_fwd(x, mask, mean):
    same_device("sequence_logps_fwd", token_logps=x, mask=mask)
    return x.new_empty((x.shape[0],), dtype=torch.float32)


def _fake_seq_bwd(grad, x, mask, mean):
    same_device("sequence_logps_bwd", token_logps=x, grad=grad, mask=mask)
    return torch.empty_like(x)


# Tensors go through save_for_backward (an output kept as a ctx attribute would form a reference
# cycle output -> grad_fn -> ctx -> output).
def _seq_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.mean = inputs[2]


def _seq_backward(ctx, bwd, grad):
    x, mask = ctx.saved_tensors
    return bwd(grad, x, mask, ctx.mean), None, None


def _fake_dpo_fwd(c, r, rc, rr, beta, loss_type, eps):
    same_device("dpo_loss_fwd", chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr)
    return tuple(c.new_empty(c.shape, dtype=torch.float32) for _ in range(3))


def _fake_dpo_bwd(grad, c, r, rc, rr, beta, loss_type, eps):
    same_device("dpo_loss_bwd", chosen=c, grad_losses=grad, rejected=r, ref_chosen=rc, ref_rejected=rr)
    return c.new_empty(c.shape, dtype=torch.float32)


def _dpo_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.args = inputs[4:]


def _dpo_backward(ctx, bwd, grad_losses, _grad_cw, _grad_rw):
    # rewards are detached in the public function: only the losses carry a gradient.
    c, r, rc, rr = ctx.saved_tensors
    g = bwd(grad_losses, c, r, rc, rr, *ctx.args)  # dL/d chosen = dL/d delta
    pos, neg = g.to(c.dtype), (-g).to(c.dtype)
    return pos, neg, neg, pos, None, None, None


def _fake_tok_fwd(pol, ref, mask, beta, loss_type, eps, mean):
    same_device("dpo_tokens_fwd", policy=pol, ref=ref, mask=mask)
    rows = pol.shape[0]
    pairs = rows // 2
    return (*(pol.new_empty((pairs,), dtype=torch.float32) for _ in range(3)),
            pol.new_empty((rows,), dtype=torch.float32), pol.new_empty((rows,), dtype=torch.float32))


def _fake_tok_bwd(grad, grad_seq, pseq, rseq, pol, mask, beta, loss_type, eps, mean):
    same_device("dpo_tokens_bwd", policy=pol, grad_losses=grad, grad_policy_seq=grad_seq, policy_seq=pseq,
                ref_seq=rseq, mask=mask)
    return torch.empty_like(pol)


def _tok_setup(ctx, inputs, output):
    pol, _ref, mask, beta, loss_type, eps, mean = inputs
    ctx.save_for_backward(pol, mask, output[3], output[4])
    ctx.args = (beta, loss_type, eps, mean)


def _tok_backward(ctx, bwd, grad_losses, _g_cw, _g_rw, grad_pseq, _g_rseq):
    # the reference token log-probs are frozen (detached in the public function): no gradient.
    pol, mask, pseq, rseq = ctx.saved_tensors
    g = bwd(grad_losses, grad_pseq, pseq, rseq, pol, mask, *ctx.args)
    return g, None, None, None, None, None, None


# Token log-probs [N, T] float32/bfloat16/float16 with a mask (nonzero = valid); mean: divide by
# the valid count (>= 1). Outputs fp32; token gradients in the input dtype.
SEQUENCE_LOGPS = FusedOp(
    name="sequence_logps",
    fwd_schema="(Tensor token_logps, Tensor mask, bool mean) -> Tensor",
    bwd_schema="(Tensor grad, Tensor token_logps, Tensor mask, bool mean) -> Tensor",
    fake_fwd=_fake_seq_fwd, fake_bwd=_fake_seq_bwd, setup_context=_seq_setup, backward=_seq_backward,
    triton="fastalign.kernels.triton.preference",
)

# (losses, chosen_rewards, rejected_rewards) [B] fp32; loss_type: the kernel_id of DPO_LOSS_TYPES
# (0 sigmoid, 1 ipo, 2 hinge, 3 robust). The backward returns grad_losses * dL/ddelta [B].
DPO_LOSS = FusedOp(
    name="dpo_loss",
    fwd_schema="(Tensor chosen, Tensor rejected, Tensor ref_chosen, Tensor ref_rejected, float beta, "
               "int loss_type, float label_smoothing) -> (Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_losses, Tensor chosen, Tensor rejected, Tensor ref_chosen, Tensor ref_rejected, "
               "float beta, int loss_type, float label_smoothing) -> Tensor",
    fake_fwd=_fake_dpo_fwd, fake_bwd=_fake_dpo_bwd, setup_context=_dpo_setup, backward=_dpo_backward,
    triton="fastalign.kernels.triton.preference",
)

# policy, ref [2B, T] = [chosen; rejected]: (losses, chosen_rewards, rejected_rewards [B],
# policy_seq, ref_seq [2B]); the backward returns the gradient w.r.t. policy [2B, T].
DPO_TOKENS = FusedOp(
    name="dpo_tokens",
    fwd_schema="(Tensor policy, Tensor ref, Tensor mask, float beta, int loss_type, float label_smoothing, "
               "bool mean) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_losses, Tensor? grad_policy_seq, Tensor policy_seq, Tensor ref_seq, Tensor policy, "
               "Tensor mask, float beta, int loss_type, float label_smoothing, bool mean) -> Tensor",
    fake_fwd=_fake_tok_fwd, fake_bwd=_fake_tok_bwd, setup_context=_tok_setup, backward=_tok_backward,
    triton="fastalign.kernels.triton.preference",
)

# backend -> (fwd, bwd) per op: the tests run the raw ops from them
_SEQ, _DPO, _TOK = (op.table() for op in (SEQUENCE_LOGPS, DPO_LOSS, DPO_TOKENS))


# ---- validation -------------------------------------------------------------------------------


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_loss_args(op, beta, loss_type, label_smoothing) -> None:
    # a normal fp32 number, as the kernels take it: 1e-300 is 0 there (IPO's 1/(2 beta) inf), 1e300 inf
    check_normal_fp32(op, "beta", beta)
    if not _is_real(label_smoothing) or not (0.0 <= float(label_smoothing) < 0.5):
        raise ValueError(f"{op}: label_smoothing must be a number in [0, 0.5), got {label_smoothing!r}")
    if not isinstance(loss_type, str) or loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"{op}: unknown loss_type {loss_type!r}; valid choices: {', '.join(DPO_LOSS_TYPES)}")


def _check_reduce(op, reduce) -> bool:
    if reduce not in ("sum", "mean") or not isinstance(reduce, str):
        raise ValueError(f"{op}: reduce must be 'sum' or 'mean', got {reduce!r}")
    return reduce == "mean"


# ---- public ops -------------------------------------------------------------------------------


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, *, reduce: str = "sum",
                   backend: str = "auto") -> torch.Tensor:
    """Per-sequence sum (reduce="sum") or mean ("mean") of token log-probs over valid positions.

    token_logps `[..., T]` float32/bfloat16/float16; mask of the same shape, bool or any real dtype
    (nonzero = valid; the mask selects, it does not weight). Returns fp32 `[...]`. Masked positions
    are never read into the result (NaN there is harmless) and get zero gradient; a row with no
    valid position gives 0 for both sum and mean (never NaN). Gradient flows to token_logps (in
    its dtype): 1 (sum) or 1/count (mean) at valid positions. Fused backends: one pass per row.
    """
    op = "sequence_logps"
    check_float_tensor(op, "token_logps", token_logps)
    if token_logps.dim() < 1:
        raise ValueError(f"{op}: token_logps must have at least 1 dimension [..., T], got a scalar")
    check_mask(op, mask, token_logps, "token_logps")
    mean = _check_reduce(op, reduce)
    name = _backends.resolve(backend, token_logps.device, op=op)
    if name == "torch":
        return reference.sequence_logps(token_logps, mask, mean)
    lead, steps = token_logps.shape[:-1], token_logps.shape[-1]
    rows = math.prod(lead)
    x = token_logps.reshape(rows, steps).contiguous()
    out = SEQUENCE_LOGPS.kernels(name)[0](x, kernel_mask(mask, name).reshape(rows, steps), mean)
    return out.reshape(lead)


def _check_pairs(op, names, tensors) -> None:
    for n, t in zip(names, tensors):
        check_float_tensor(op, n, t)
    first = tensors[0]
    if first.dim() != 1:
        raise ValueError(f"{op}: {names[0]} must be 1-D [B], got shape {tuple(first.shape)}")
    for n, t in zip(names[1:], tensors[1:]):
        if t.shape != first.shape:
            raise ValueError(f"{op}: {n} must have the shape of {names[0]} {tuple(first.shape)} (one entry per "
                             f"pair), got {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{op}: {n} is on {t.device} but {names[0]} on {first.device}")


def _torch_dpo(c, r, rc, rr, beta, loss_type, eps):
    c, r, rc, rr = (t.float() for t in (c, r, rc, rr))
    delta = (c - rc) - (r - rr)
    losses = DPO_LOSS_TYPES[loss_type].formula(delta, beta, eps)
    # a plugin's formula must give one loss per pair: a scalar (e.g. a .mean() inside) or a list
    # would otherwise come back as the "per-pair losses", a float64 one as a non-fp32 result
    if not isinstance(losses, torch.Tensor) or not losses.dtype.is_floating_point or losses.shape != delta.shape:
        got = f"{losses.dtype} {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise TypeError(f"dpo_loss: the formula of loss_type {loss_type!r} must return a float tensor of per-pair "
                        f"losses of delta's shape {tuple(delta.shape)}, got {got}")
    return losses.float(), (beta * (c - rc)).detach(), (beta * (r - rr)).detach()


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards: `(losses, chosen_rewards, rejected_rewards)`, fp32 [B].

    Inputs: per-sequence log-probs [B] (float32/bfloat16/float16; math in fp32). With
    delta = (c - ref_c) - (r - ref_r), x = beta * delta, eps = label_smoothing in [0, 0.5):
        sigmoid  -(1-eps) logsig(x) - eps logsig(-x)        (eps > 0: conservative DPO)
        ipo      (delta - 1/(2 beta))^2                      (pass length-averaged log-probs)
        hinge    relu(1 - x)
        robust   (-(1-eps) logsig(x) + eps logsig(-x)) / (1 - 2 eps)
    and any type added with `register_dpo_loss_type`. label_smoothing is accepted (and validated)
    for every type; ipo and hinge do not use it. logsig is evaluated as min(x, 0) - log1p(exp(-|x|)),
    finite for any finite x (|x| = 1e4 included). Rewards are beta * (logp - ref), detached.

    Gradients reach all four log-prob inputs that require grad (the loss is symmetric in them:
    +g for chosen and ref_rejected, -g for rejected and ref_chosen); pass detached reference
    log-probs for the usual frozen reference. Fused backends: one kernel forward, one backward.
    A loss type without a kernel (a plugin) runs its torch formula on every backend.

    Where peers differ: label_smoothing under "sigmoid" is conservative DPO here (as in OpenRLHF
    and older TRL; current TRL ignores it, i.e. use 0.0 to match it). "ipo" takes the log-probs
    as given: TRL averages them over tokens (pass sequence_logps(..., reduce="mean"), or use
    dpo_loss_from_tokens(..., average_log_prob=True)), OpenRLHF passes sums.
    """
    op = "dpo_loss"
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    tensors = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_pairs(op, names, tensors)
    _check_loss_args(op, beta, loss_type, label_smoothing)
    beta, eps = float(beta), float(label_smoothing)
    name = _backends.resolve(backend, chosen_logps.device, op=op)
    kernel_id = DPO_LOSS_TYPES[loss_type].kernel_id
    if name == "torch" or kernel_id is None:
        return _torch_dpo(*tensors, beta, loss_type, eps)
    if len({t.dtype for t in tensors}) > 1:  # the kernels take one dtype; fp32 loses nothing
        tensors = tuple(t.float() for t in tensors)
    losses, cw, rw = DPO_LOSS.kernels(name)[0](*(t.contiguous() for t in tensors), beta, kernel_id, eps)
    return losses, cw.detach(), rw.detach()


def dpo_loss_from_tokens(
    policy_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    return_sequence_logps: bool = False,
    backend: str = "auto",
):
    """The whole DPO head in one call: token log-probs of a [chosen; rejected] batch -> losses.

    policy_token_logps, ref_token_logps [2B, T] (rows 0..B-1 the chosen completions, rows B..2B-1
    the rejected ones of the same pairs, in order); mask [2B, T] as for `sequence_logps`. Each
    row is reduced to its sequence log-prob (masked sum, or with average_log_prob=True the masked
    mean, IPO-style), then `dpo_loss` applies. Returns `(losses, chosen_rewards, rejected_rewards)`
    and, with return_sequence_logps=True, also the fp32 per-sequence log-probs (policy [2B],
    reference [2B]); the policy ones carry gradient (e.g. for an added SFT term).

    Equal to `dpo_loss(*split(sequence_logps(policy)), *split(sequence_logps(ref)), ...)` on the
    same backend, in one kernel launch forward and one backward on the fused backends. The
    reference log-probs are token-level here (use `dpo_loss` with precomputed per-sequence
    reference log-probs) and treated as frozen: they never receive a gradient. Gradient flows to
    policy_token_logps, in its dtype.
    """
    op = "dpo_loss_from_tokens"
    check_float_tensor(op, "policy_token_logps", policy_token_logps)
    check_float_tensor(op, "ref_token_logps", ref_token_logps)
    pol, ref = policy_token_logps, ref_token_logps.detach()
    if pol.dim() != 2:
        raise ValueError(f"{op}: policy_token_logps must be 2-D [2B, T] ([chosen; rejected]), got {tuple(pol.shape)}")
    if pol.shape[0] % 2:
        raise ValueError(f"{op}: policy_token_logps must have an even number of rows 2B ([chosen; rejected]), got "
                         f"{pol.shape[0]}")
    if ref.shape != pol.shape:
        raise ValueError(f"{op}: ref_token_logps must have the shape of policy_token_logps {tuple(pol.shape)}, got "
                         f"{tuple(ref.shape)}")
    if ref.device != pol.device:
        raise ValueError(f"{op}: ref_token_logps is on {ref.device} but policy_token_logps on {pol.device}")
    check_mask(op, mask, pol, "policy_token_logps")
    _check_loss_args(op, beta, loss_type, label_smoothing)
    if not isinstance(average_log_prob, bool):
        raise TypeError(f"{op}: average_log_prob must be a bool, got {average_log_prob!r}")
    return_sequence_logps = check_flag(op, "return_sequence_logps", return_sequence_logps)
    beta, eps = float(beta), float(label_smoothing)
    name = _backends.resolve(backend, pol.device, op=op)
    kernel_id = DPO_LOSS_TYPES[loss_type].kernel_id
    b = pol.shape[0] // 2
    if name == "torch" or kernel_id is None:
        reduce = "mean" if average_log_prob else "sum"
        pseq = sequence_logps(pol, mask, reduce=reduce, backend=name)
        rseq = sequence_logps(ref, mask, reduce=reduce, backend=name)
        out = _torch_dpo(pseq[:b], pseq[b:], rseq[:b], rseq[b:], beta, loss_type, eps)
    else:
        if ref.dtype != pol.dtype:  # the kernels take one dtype; fp32 loses nothing
            pol, ref = pol.float(), ref.float()
        losses, cw, rw, pseq, rseq = DPO_TOKENS.kernels(name)[0](
            pol.contiguous(), ref.contiguous(), kernel_mask(mask, name), beta, kernel_id, eps, average_log_prob)
        out = (losses, cw.detach(), rw.detach())
    if return_sequence_logps:
        return (*out, pseq, rseq.detach())
    return out


def reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, margin=None,
                center_rewards_coefficient=None, backend: str = "auto") -> torch.Tensor:
    """Bradley-Terry pairwise loss, mean over pairs: mean(-logsig(c - r - margin)), fp32 scalar,
    plus center_rewards_coefficient * mean((c + r)^2) when that is given.

    chosen_scores, rejected_scores: one shape (usually [B]), float32/bfloat16/float16; margin:
    None, a number, or a tensor of that shape (a per-pair margin, TRL's `margin` column: the
    chosen score must beat the rejected one by m before the loss lets go). The centring term
    (Eisenstein et al. 2023, "Helping or Herding?", eq. 2; TRL's RewardConfig
    center_rewards_coefficient, 0.01 recommended) pulls the scores towards mean zero: BT only
    sees c - r, so without it the scores drift by any common offset. Both equal TRL 1.16's
    RewardTrainer.compute_loss. Gradients reach both scores (and a margin tensor that requires
    grad). The op is a handful of elementwise ops on B numbers, so every backend runs the same
    composed torch formula (fp32, logsigmoid stable for any finite argument); `backend` is
    validated and resolved like every op's.
    """
    op = "reward_loss"
    check_float_tensor(op, "chosen_scores", chosen_scores)
    check_float_tensor(op, "rejected_scores", rejected_scores)
    if rejected_scores.shape != chosen_scores.shape:
        raise ValueError(f"{op}: rejected_scores must have the shape of chosen_scores {tuple(chosen_scores.shape)}, "
                         f"got {tuple(rejected_scores.shape)}")
    if rejected_scores.device != chosen_scores.device:
        raise ValueError(f"{op}: rejected_scores is on {rejected_scores.device} but chosen_scores on "
                         f"{chosen_scores.device}")
    if chosen_scores.numel() == 0:
        raise ValueError(f"{op}: chosen_scores is empty (the mean over no pairs is undefined)")
    if isinstance(margin, torch.Tensor):
        check_float_tensor(op, "margin", margin)
        if margin.shape != chosen_scores.shape:
            raise ValueError(f"{op}: margin must have the shape of chosen_scores {tuple(chosen_scores.shape)}, got "
                             f"{tuple(margin.shape)}")
        if margin.device != chosen_scores.device:
            raise ValueError(f"{op}: margin is on {margin.device} but chosen_scores on {chosen_scores.device}")
    elif margin is not None and not (_is_real(margin) and math.isfinite(float(margin))):
        raise TypeError(f"{op}: margin must be None, a finite number or a tensor, got {margin!r}")
    coef = center_rewards_coefficient
    if coef is not None and not (_is_real(coef) and math.isfinite(float(coef)) and float(coef) >= 0):
        raise ValueError(f"{op}: center_rewards_coefficient must be None or a finite number >= 0, got {coef!r}")
    _backends.resolve(backend, chosen_scores.device, op=op)
    return reference.reward_loss(chosen_scores, rejected_scores, margin, coef)
