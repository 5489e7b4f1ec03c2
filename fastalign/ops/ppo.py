"""ppo_policy_loss and ppo_value_loss: PPO's clipped losses, each one fused forward kernel
(per-token loss, masking, aggregation and statistics in one pass) and one fused backward kernel.

Backends: torch (eager reference, kernels/reference.py), cpp and cuda (fastalign._C:
fastalign::ppo_{policy,value}_loss_{fwd,bwd}), triton (fastalign_triton::ppo_{policy,value}_loss_{fwd,bwd}).
cpp: rows in parallel, per-token math on 4-, 8- or 16-lane float vectors (csrc/cpu/isa/ppo_lanes.h);
cuda: a block per row, then one block reduces the row partials (no atomics); triton: a program per
row, then one program reduces. Every backend's reduction has a fixed order (deterministic).

Fused op contract (the same on every backend; the descriptions PPO_POLICY_LOSS and PPO_VALUE_LOSS
below hold the schemas):
  fwd(x, y, z, mask bool, <loss params>, agg code, global_count, horizon) -> (out, row_weight)
      out fp32 [8] = (loss, stat1, ..., stat6, stat7): stat1-6 means over the valid tokens, stat7
      a max over them (POLICY_STATS; the value loss fills stat1-3 and leaves 0 in the others),
      row_weight fp32 [B]: the loss is
      sum_b row_weight[b] * sum_{t valid} l_bt, so row_weight[b] = d loss / d l_bt (0 for empty rows).
  bwd(grad_out, x, y, z, mask, row_weight, <loss params>) -> grad w.r.t. x, in x's dtype
      = grad_out[0] * row_weight[b] * d l_bt / d x_bt at valid tokens, 0 elsewhere.
The backward recomputes the per-token math (no [B, T] tensor is saved besides the inputs) and
reproduces autograd of the reference exactly: a tie of max/min sends half the gradient to each
side, clamps pass the gradient at their bounds (inclusive) and block it outside.
"""

from __future__ import annotations

import numbers

import torch

from fastalign import _backends
from fastalign.kernels import reference
from fastalign.ops._checks import FP32_MAX, FP32_TINY, kernel_mask, same_device
from fastalign.ops._fused import FusedOp

AGG_MODES = reference.PPO_AGG_MODES  # index in this tuple = the kernels' agg code
_AGG_CODE = {name: i for i, name in enumerate(AGG_MODES)}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# the fused policy kernels' statistics, out[1:8] (ppo_policy_loss returns the first three;
# fastalign.policy_loss all that its loss type reports): computed in the loss's own pass
POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "clipfrac_low", "clipfrac_high", "ratio_mean", "ratio_max")
N_OUT = 1 + len(POLICY_STATS)
VALUE_STATS = ("vf_clipfrac", "vpred_mean", "value_mse")


# ---- the fused op descriptions: fakes and autograd, shared by every fused backend -------------

# fwd(x, y, z, mask, <loss params>, agg, global_count, horizon) -> (out fp32 [8], row_weight fp32 [B]);
# bwd(grad_out [8], x, y, z, mask, row_weight, <loss params>) -> grad w.r.t. x, in x's dtype.
# x, y, z [B, T] of one float dtype, mask [B, T] (nonzero = valid token). agg: the index in
# AGG_MODES; global_count < 0: this call's own count; horizon <= 0: T.


def _fake_fwd(op):
    def fake(x, y, z, mask, *params):
        same_device(op, **dict(zip(("first input", "second input", "third input", "mask"), (x, y, z, mask))))
        return x.new_empty((N_OUT,), dtype=torch.float32), x.new_empty((x.shape[0],), dtype=torch.float32)

    return fake


def _fake_bwd(op):
    def fake(grad_out, x, y, z, mask, row_weight, *params):
        names = ("first input", "grad_out", "second input", "third input", "mask", "row_weight")
        same_device(op, **dict(zip(names, (x, grad_out, y, z, mask, row_weight))))
        return x.new_empty(x.shape)

    return fake


def _setup_context(ctx, inputs, output):
    x, y, z, mask = inputs[:4]
    ctx.params = inputs[4:]
    ctx.save_for_backward(x, y, z, mask, output[1])


def _backward_with(n_params):
    """The backward of a loss with `n_params` loss parameters: the fwd's params after them (agg,
    global_count, horizon) are not the bwd's, whose row_weight already holds the aggregation."""

    def backward(ctx, bwd, grad_out, _grad_row_weight):
        x, y, z, mask, row_weight = ctx.saved_tensors
        if grad_out is None:
            grad_out = row_weight.new_zeros(N_OUT)
        grad = bwd(grad_out, x, y, z, mask, row_weight, *ctx.params[:n_params])
        return (grad,) + (None,) * (3 + len(ctx.params))

    return backward


# Policy: clip_lo = 1 - clip_low, clip_hi = 1 + clip_high, dual_clip <= 0 = off; stats (clipfrac,
# clipfrac_lower, approx_kl).
PPO_POLICY_LOSS = FusedOp(
    name="ppo_policy_loss",
    fwd_schema="(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, float clip_lo, "
               "float clip_hi, float dual_clip, int agg, float global_count, float horizon) -> (Tensor, Tensor)",
    bwd_schema="(Tensor grad_out, Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
               "Tensor row_weight, float clip_lo, float clip_hi, float dual_clip) -> Tensor",
    fake_fwd=_fake_fwd("ppo_policy_loss_fwd"),
    fake_bwd=_fake_bwd("ppo_policy_loss_bwd"),
    setup_context=_setup_context,
    backward=_backward_with(3),
    triton="fastalign.kernels.triton.ppo",
)

# Value: clip <= 0 = off; stats (vf_clipfrac, vpred_mean, value_mse).
PPO_VALUE_LOSS = FusedOp(
    name="ppo_value_loss",
    fwd_schema="(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip, int agg, "
               "float global_count, float horizon) -> (Tensor, Tensor)",
    bwd_schema="(Tensor grad_out, Tensor values, Tensor old_values, Tensor returns, Tensor mask, "
               "Tensor row_weight, float clip) -> Tensor",
    fake_fwd=_fake_fwd("ppo_value_loss_fwd"),
    fake_bwd=_fake_bwd("ppo_value_loss_bwd"),
    setup_context=_setup_context,
    backward=_backward_with(1),
    triton="fastalign.kernels.triton.ppo",
)

# (loss, backend) -> (fwd, bwd): the tests run the raw ops from it
_FUSED = {(loss, b): k for loss, op in (("policy", PPO_POLICY_LOSS), ("value", PPO_VALUE_LOSS))
          for b, k in op.table().items()}


def _fused_ops(loss: str, backend: str):
    return _FUSED[(loss, backend)]


# ---- validation -------------------------------------------------------------------------------


def _is_number(x) -> bool:
    # Finite in fp32, not just in Python: the kernels take their parameters as fp32 and the torch
    # backend failed on e.g. clip_high=1e300 ("cannot be converted to float") where they ran.
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and abs(float(x)) <= FP32_MAX


def _check_tensors(op: str, names, tensors, mask) -> None:
    for name, t in zip(names + ("mask",), tensors + (mask,)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    for name, t in zip(names, tensors):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if mask.dtype.is_complex:
        raise TypeError(f"{op}: mask must be bool or a real numeric dtype (nonzero = valid token), got {mask.dtype}")
    first = tensors[0]
    if first.dim() != 2:
        raise ValueError(f"{op}: {names[0]} must be 2-D [B, T], got shape {tuple(first.shape)}")
    for name, t in zip(names[1:] + ("mask",), tensors[1:] + (mask,)):
        if t.shape != first.shape:
            raise ValueError(
                f"{op}: {name} must have the shape of {names[0]} {tuple(first.shape)}, got {tuple(t.shape)}"
            )
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {names[0]} on {first.device}")


def _check_agg(op: str, agg, global_count, horizon) -> None:
    if not isinstance(agg, str) or agg not in _AGG_CODE:  # (an unhashable agg raised TypeError)
        raise ValueError(f"{op}: agg must be one of {AGG_MODES}, got {agg!r}")
    # Positive values below fp32's smallest normal would be 0 in the CUDA finalize (fp32) but not in
    # the C++ one (double): "no tokens" (loss 0) on one backend, a huge loss on the other.
    if global_count is not None and not (
        _is_number(global_count) and (global_count == 0 or global_count >= FP32_TINY)
    ):
        raise ValueError(f"{op}: global_count must be None, 0 or a finite number >= {FP32_TINY}, got {global_count!r}")
    if horizon is not None and not (_is_number(horizon) and horizon >= FP32_TINY):
        raise ValueError(f"{op}: horizon must be None or a finite number >= {FP32_TINY}, got {horizon!r}")


def _prepare(tensors, mask, backend):
    """One float dtype for the kernels (fp32 when the inputs disagree) and the mask they read."""
    if any(t.dtype != tensors[0].dtype for t in tensors):
        tensors = tuple(t.float() for t in tensors)
    return tensors, kernel_mask(mask, backend)


def _agg_args(agg, global_count, horizon):
    count = -1.0 if global_count is None else float(global_count)  # < 0: this call's own count
    return _AGG_CODE[agg], count, 0.0 if horizon is None else float(horizon)  # 0: horizon = T


# ---- public ops -------------------------------------------------------------------------------

_AGG_DOC = """
    agg (how the per-token losses l_bt over the valid tokens become one number; "valid" = mask
    nonzero; n_b = valid tokens in row b; rows with n_b = 0 take no part, as in verl's agg_loss):
      "token-mean":              sum_bt l_bt / N,              N = sum_b n_b
      "seq-mean-token-sum":      sum_b (sum_t l_bt) / S,       S = number of rows with n_b > 0
      "seq-mean-token-mean":     sum_b (sum_t l_bt / n_b) / S
      "seq-mean-token-sum-norm": sum_b (sum_t l_bt) / (S * H)  (Dr. GRPO; H = horizon, default T)
    global_count: replaces the divisor N (token-mean) or S (seq-mean-*) by a count over the whole
      batch across micro-batches and data-parallel ranks. Pass the global number of valid tokens
      (token-mean) or of non-empty sequences (seq-mean-*) and *sum* the micro-batch losses (and
      their gradients): the sum then equals the loss of the full batch, where averaging per-micro-
      batch means would weight tokens unequally. (Under DDP, which averages gradients over R ranks,
      multiply the loss by R, or pass global_count / R.) Default None: this call's own count.
    horizon: H for "seq-mean-token-sum-norm"; keep it constant across calls (e.g. the maximum
      response length) for Dr. GRPO's constant normaliser. Default None: T of this call.
    A zero count (nothing valid) gives loss 0 and zero gradients, never NaN.
"""


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    global_count: float | None = None,
    horizon: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate loss. Returns `(loss, stats)`: a fp32 0-dim loss and a dict of
    detached fp32 0-dim tensors.

    Inputs `[B, T]`: logprobs, old_logprobs, advantages float32/bfloat16/float16 (math in fp32);
    mask bool or any real dtype (nonzero = valid token). Per token, with
    ratio = exp(clamp(logprobs - old_logprobs, -20, 20)):

        l = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))

    (clip_high defaults to clip_low; clip_low in (0, 1), clip_high > 0). With dual_clip = c > 1,
    tokens with A < 0 are capped: l = min(l, -A * c). Then aggregated by `agg` (below).

    stats (means over the valid tokens of this call): "clipfrac" (the clipped term strictly
    larger), "clipfrac_lower" (A < 0 and the dual-clip cap binding; 0 without dual_clip),
    "approx_kl" (old_logprobs - logprobs, not clamped).

    Only logprobs receives a gradient (in its dtype); it is exactly autograd of the formula: zero
    where the log-ratio is outside [-20, 20] or the clip is active, half shares at exact ties.
    """
    op = "ppo_policy_loss"
    names = ("logprobs", "old_logprobs", "advantages")
    _check_tensors(op, names, (logprobs, old_logprobs, advantages), mask)
    if not (_is_number(clip_low) and 0 < clip_low < 1):
        raise ValueError(f"{op}: clip_low must be a number in (0, 1), got {clip_low!r}")
    if clip_high is not None and not (_is_number(clip_high) and clip_high > 0):
        raise ValueError(f"{op}: clip_high must be None or a finite number > 0, got {clip_high!r}")
    if dual_clip is not None and not (_is_number(dual_clip) and dual_clip > 1):
        raise ValueError(f"{op}: dual_clip must be None or a finite number > 1, got {dual_clip!r}")
    _check_agg(op, agg, global_count, horizon)
    name = _backends.resolve(backend, logprobs.device, op=op)
    # floats for every backend (the torch backend failed on dual_clip=2**70, an int)
    clip_low = float(clip_low)
    clip_high = clip_low if clip_high is None else float(clip_high)
    dual_clip = None if dual_clip is None else float(dual_clip)
    if name == "torch":  # detached like the fused path: only logprobs gets a gradient on every backend
        return reference.ppo_policy_loss(
            logprobs, old_logprobs.detach(), advantages.detach(), mask, clip_low, clip_high, dual_clip, agg,
            global_count, horizon,
        )
    loss, s = _policy_fused(name, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg,
                            global_count, horizon)
    return loss, {"clipfrac": s[1], "clipfrac_lower": s[2], "approx_kl": s[3]}


def _policy_fused(name, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg, global_count,
                  horizon):
    """The fused policy kernels of backend `name` on checked arguments (floats; clip_high
    resolved): (loss, out detached), out[1:] = POLICY_STATS. fastalign.policy_loss reads them all."""
    (x, old, adv), valid = _prepare((logprobs, old_logprobs.detach(), advantages.detach()), mask, name)
    fwd, _ = PPO_POLICY_LOSS.kernels(name)
    out, _ = fwd(
        x, old, adv, valid, 1.0 - clip_low, 1.0 + clip_high,
        0.0 if dual_clip is None else dual_clip, *_agg_args(agg, global_count, horizon),
    )
    return out[0], out.detach()


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
    global_count: float | None = None,
    horizon: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """PPO value loss `0.5 * agg(max((v - R)^2, (clamp(v, v_old - clip, v_old + clip) - R)^2))`;
    without clip (None), `0.5 * agg((v - R)^2)`. Returns `(loss, stats)` like ppo_policy_loss.

    Inputs `[B, T]`: values, old_values, returns float32/bfloat16/float16; mask bool or real
    (nonzero = valid). clip must be None or > 0. Only values receives a gradient (in its dtype).
    stats (means over the valid tokens): "vf_clipfrac" (the clipped term strictly larger),
    "vpred_mean" (v), "value_mse" ((v - R)^2, unclipped).
    """
    op = "ppo_value_loss"
    names = ("values", "old_values", "returns")
    _check_tensors(op, names, (values, old_values, returns), mask)
    # >= fp32's smallest normal, not just > 0: the kernels take clip in fp32, where 1e-300 is 0 and
    # the cpp kernel then ran the unclipped loss while the torch backend clipped.
    if clip is not None and not (_is_number(clip) and clip >= FP32_TINY):
        raise ValueError(f"{op}: clip must be None or a finite number > 0 (at least fp32's smallest normal, "
                         f"{FP32_TINY}), got {clip!r}")
    clip = None if clip is None else float(clip)  # (the torch backend failed on clip=2**70, an int)
    _check_agg(op, agg, global_count, horizon)
    name = _backends.resolve(backend, values.device, op=op)
    if name == "torch":
        return reference.ppo_value_loss(
            values, old_values.detach(), returns.detach(), mask, clip, agg, global_count, horizon
        )
    (v, old, ret), valid = _prepare((values, old_values.detach(), returns.detach()), mask, name)
    fwd, _ = PPO_VALUE_LOSS.kernels(name)
    out, _ = fwd(v, old, ret, valid, -1.0 if clip is None else clip, *_agg_args(agg, global_count, horizon))
    s = out.detach()
    return out[0], {"vf_clipfrac": s[1], "vpred_mean": s[2], "value_mse": s[3]}


for _fn in (ppo_policy_loss, ppo_value_loss):
    if _fn.__doc__:  # None under python -OO
        _fn.__doc__ += _AGG_DOC
