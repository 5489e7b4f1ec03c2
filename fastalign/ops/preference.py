"""Preference ops: sequence_logps, dpo_loss (every loss type), dpo_loss_from_tokens, reward_loss.

Backends: torch (kernels/reference.py, the eager ground truth), cpp and cuda (fastalign._C:
fastalign::{sequence_logps,dpo_loss,dpo_tokens}_{fwd,bwd}), triton (fastalign_triton::...), all from
the descriptions SEQUENCE_LOGPS, DPO_LOSS and DPO_TOKENS below (fastalign/ops/_fused.py).
Each fused op is one kernel launch forward and one backward; all math is fp32 for every input
dtype and every result is fp32; token gradients come back in the token log-probs' dtype.

DPO loss types live in a registry, `DPO_LOSS_TYPES` (name -> DPOLossType, fastalign/ops/
dpo_loss_types.py; formulas in fastalign/kernels/reference_dpo_types.py). The per-pair built-in
types have fused kernels: one call with a single one of sigmoid, ipo, hinge, robust (and the
default reverse-KL divergence, no extras) runs the original ops DPO_LOSS / DPO_TOKENS; anything
else -- a list of types with weights, the other per-pair types, an f-divergence -- runs
DPO_MULTI / DPO_MULTI_TOKENS, whose kernels return dL/d(chosen log-ratio) and dL/d(rejected
log-ratio) separately and sum the weighted types in one pass. The batch types (aot,
aot_unpaired, sft) are torch composites on the sequence log-probs (the fused ones of
dpo_loss_from_tokens); WPO pair weights and LD-DPO token weights are applied in torch around
the kernels. A plugin adds a type with `register_dpo_loss_type(name, formula)`, where
`formula(delta, beta, label_smoothing)` maps the fp32 margin delta = (c - ref_c) - (r - ref_r)
[B] to per-pair losses [B] in torch. A plugin type runs that torch formula on every backend (a
fused backend still computes the per-sequence log-probs of dpo_loss_from_tokens with its fused
sequence_logps kernel), so it is correct everywhere and fast where the formula is cheap.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from fastalign import _backends
from fastalign.kernels import reference
from fastalign.kernels import reference_dpo_types as RT
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



# ---- the general DPO ops: several weighted per-pair types, f-divergence, token counts ------------
# The trailing parameters of both: beta, loss_types (ids of reference_dpo_types.FUSED_TYPES, 1..16
# of them), loss_weights (one per type), label_smoothing, f_divergence (index of F_DIVERGENCES),
# f_alpha (the alpha divergence's coefficient), discopop_tau. lengths: Tensor? [2B] fp32 token
# counts [chosen; rejected], read by the *_norm types (required by them).
_MULTI_ARGS = ("float beta, int[] loss_types, float[] loss_weights, float label_smoothing, int f_divergence, "
               "float f_alpha, float discopop_tau")


def _fake_multi_fwd(c, r, rc, rr, lengths, *args):
    same_device("dpo_multi_fwd", chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr, lengths=lengths)
    return tuple(c.new_empty(c.shape, dtype=torch.float32) for _ in range(3))


def _fake_multi_bwd(grad, c, r, rc, rr, lengths, *args):
    same_device("dpo_multi_bwd", chosen=c, grad_losses=grad, rejected=r, ref_chosen=rc, ref_rejected=rr,
                lengths=lengths)
    return c.new_empty(c.shape, dtype=torch.float32), c.new_empty(c.shape, dtype=torch.float32)


def _multi_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.lengths = inputs[4]  # an input, never an output: no reference cycle
    ctx.args = inputs[5:]


def _multi_backward(ctx, bwd, grad_losses, _grad_cw, _grad_rw):
    c, r, rc, rr = ctx.saved_tensors
    # gc = dL/d(c - ref_c), gr = dL/d(r - ref_r), each times grad_losses
    gc, gr = bwd(grad_losses, c, r, rc, rr, ctx.lengths, *ctx.args)
    return gc.to(c.dtype), gr.to(c.dtype), (-gc).to(c.dtype), (-gr).to(c.dtype), None, None, None, None, None, \
        None, None, None


def _fake_multi_tok_fwd(pol, ref, mask, lengths, *args):
    same_device("dpo_multi_tokens_fwd", policy=pol, ref=ref, mask=mask, lengths=lengths)
    rows = pol.shape[0]
    pairs = rows // 2
    return (*(pol.new_empty((pairs,), dtype=torch.float32) for _ in range(3)),
            pol.new_empty((rows,), dtype=torch.float32), pol.new_empty((rows,), dtype=torch.float32))


def _fake_multi_tok_bwd(grad, grad_seq, pseq, rseq, pol, mask, lengths, *args):
    same_device("dpo_multi_tokens_bwd", policy=pol, grad_losses=grad, grad_policy_seq=grad_seq, policy_seq=pseq,
                ref_seq=rseq, mask=mask, lengths=lengths)
    return torch.empty_like(pol)


def _multi_tok_setup(ctx, inputs, output):
    pol, _ref, mask, lengths = inputs[:4]
    ctx.save_for_backward(pol, mask, output[3], output[4])
    ctx.lengths = lengths
    ctx.args = inputs[4:]


def _multi_tok_backward(ctx, bwd, grad_losses, _g_cw, _g_rw, grad_pseq, _g_rseq):
    pol, mask, pseq, rseq = ctx.saved_tensors
    g = bwd(grad_losses, grad_pseq, pseq, rseq, pol, mask, ctx.lengths, *ctx.args)
    return (g,) + (None,) * 11


# (losses, chosen_rewards, rejected_rewards) [B]; backward: (grad_losses * dL/dcr, grad_losses * dL/drr)
DPO_MULTI = FusedOp(
    name="dpo_multi",
    fwd_schema="(Tensor chosen, Tensor rejected, Tensor ref_chosen, Tensor ref_rejected, Tensor? lengths, "
               + _MULTI_ARGS + ") -> (Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_losses, Tensor chosen, Tensor rejected, Tensor ref_chosen, Tensor ref_rejected, "
               "Tensor? lengths, " + _MULTI_ARGS + ") -> (Tensor, Tensor)",
    fake_fwd=_fake_multi_fwd, fake_bwd=_fake_multi_bwd, setup_context=_multi_setup, backward=_multi_backward,
    triton="fastalign.kernels.triton.preference",
)

# policy, ref [2B, T] = [chosen; rejected] -> (losses, chosen_rewards, rejected_rewards [B], policy_seq,
# ref_seq [2B]); the backward returns the gradient w.r.t. policy [2B, T].
DPO_MULTI_TOKENS = FusedOp(
    name="dpo_multi_tokens",
    fwd_schema="(Tensor policy, Tensor ref, Tensor mask, Tensor? lengths, " + _MULTI_ARGS
               + ", bool mean) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_losses, Tensor? grad_policy_seq, Tensor policy_seq, Tensor ref_seq, Tensor policy, "
               "Tensor mask, Tensor? lengths, " + _MULTI_ARGS + ", bool mean) -> Tensor",
    fake_fwd=_fake_multi_tok_fwd, fake_bwd=_fake_multi_tok_bwd, setup_context=_multi_tok_setup,
    backward=_multi_tok_backward, triton="fastalign.kernels.triton.preference",
)

# backend -> (fwd, bwd) per op: the tests run the raw ops from them
_SEQ, _DPO, _TOK, _MULTI, _MULTI_TOK = (op.table() for op in (SEQUENCE_LOGPS, DPO_LOSS, DPO_TOKENS, DPO_MULTI,
                                                               DPO_MULTI_TOKENS))


# ---- validation -------------------------------------------------------------------------------


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_loss_args(op, beta, loss_type, label_smoothing) -> None:
    # a normal fp32 number, as the kernels take it: 1e-300 is 0 there (IPO's 1/(2 beta) inf), 1e300 inf
    check_normal_fp32(op, "beta", beta)
    if not _is_real(label_smoothing) or not (0.0 <= float(label_smoothing) < 0.5):
        raise ValueError(f"{op}: label_smoothing must be a number in [0, 0.5), got {label_smoothing!r}")
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"{op}: loss_type must be a loss type name or a non-empty list of them, got {loss_type!r}")
    for name in names:
        if not isinstance(name, str) or name not in DPO_LOSS_TYPES:
            raise ValueError(f"{op}: unknown loss_type {name!r}; valid choices: {', '.join(DPO_LOSS_TYPES)}")


_MAX_TYPES = 16  # the kernels' fixed-size type list


@dataclass(frozen=True)
class _Spec:
    """A validated loss specification: the fused part (kernel ids and weights, in list order), the
    batch types and plugins ((name, weight) pairs), and the scalar parameters."""

    fused_ids: tuple
    fused_weights: tuple
    batch: tuple
    plugins: tuple
    beta: float
    eps: float
    fdiv: int
    f_alpha: float
    tau: float
    legacy: bool  # one of the original four types alone, weight 1, reverse KL: the original ops

    @property
    def needs_lengths(self) -> bool:
        return any(RT.FUSED_TYPES[k] in RT.LENGTH_TYPES for k in self.fused_ids) or \
            any(n in RT.LENGTH_TYPES for n, _ in self.batch)

    def kernel_args(self):
        return (self.beta, list(self.fused_ids), list(self.fused_weights), self.eps, self.fdiv, self.f_alpha,
                self.tau)

    def names_weights(self):
        return [(RT.FUSED_TYPES[k], w) for k, w in zip(self.fused_ids, self.fused_weights)] + list(self.batch)


def _resolve(op, beta, loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
             discopop_tau) -> _Spec:
    _check_loss_args(op, beta, loss_type, label_smoothing)
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if len(names) > _MAX_TYPES:
        raise ValueError(f"{op}: at most {_MAX_TYPES} loss types in one call, got {len(names)}")
    if loss_weights is None:
        weights = [1.0] * len(names)
    else:
        if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(names):
            raise ValueError(f"{op}: loss_weights must be a list with one weight per loss type ({len(names)}), got "
                             f"{loss_weights!r}")
        for w in loss_weights:
            if not _is_real(w) or not math.isfinite(float(w)):
                raise ValueError(f"{op}: loss_weights must be finite numbers, got {loss_weights!r}")
        weights = [float(w) for w in loss_weights]
    if f_divergence_type not in RT.F_DIVERGENCES:
        raise ValueError(f"{op}: unknown f_divergence_type {f_divergence_type!r}; valid choices: "
                         f"{', '.join(RT.F_DIVERGENCES)}")
    if not _is_real(f_alpha_divergence_coef) or not math.isfinite(float(f_alpha_divergence_coef)):
        raise ValueError(f"{op}: f_alpha_divergence_coef must be a finite number, got {f_alpha_divergence_coef!r}")
    f_alpha = float(f_alpha_divergence_coef)
    fdiv = RT.F_DIVERGENCES.index(f_divergence_type)
    if fdiv == 3 and abs(f_alpha - 1.0) < 1e-6:  # the limit alpha -> 1 is the reverse KL (as TRL)
        fdiv = 0
    if fdiv != 0 and not set(names) <= set(RT.F_DIVERGENCE_TYPES):
        raise ValueError(f"{op}: f_divergence_type {f_divergence_type!r} is only defined for the loss types "
                         f"{', '.join(RT.F_DIVERGENCE_TYPES)} (the others have no f-divergence form); got {names}")
    if not _is_real(discopop_tau) or not (math.isfinite(float(discopop_tau)) and float(discopop_tau) > 0):
        raise ValueError(f"{op}: discopop_tau must be a finite number > 0, got {discopop_tau!r}")
    if "exo_pair" in names and not float(label_smoothing) > 0:
        raise ValueError(f"{op}: loss_type 'exo_pair' needs label_smoothing > 0 (its log(label_smoothing) term; the "
                         f"EXO paper uses 1e-3), got {label_smoothing!r}")
    fused, batch, plugins = [], [], []
    for name, w in zip(names, weights):
        entry = DPO_LOSS_TYPES[name]
        if entry.kernel_id is not None:
            fused.append((entry.kernel_id, w))
        elif entry.batch:
            batch.append((name, w))
        else:
            plugins.append((name, w))
    legacy = (len(names) == 1 and weights[0] == 1.0 and fdiv == 0 and
              (not fused or fused[0][0] < 4))  # also a single plugin: its formula path as before
    return _Spec(tuple(k for k, _ in fused), tuple(w for _, w in fused), tuple(batch), tuple(plugins), float(beta),
                 float(label_smoothing), fdiv, f_alpha, float(discopop_tau), legacy and not batch)


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


def _plugin_losses(name, delta, beta, eps):
    losses = DPO_LOSS_TYPES[name].formula(delta, beta, eps)
    # a plugin's formula must give one loss per pair: a scalar (e.g. a .mean() inside) or a list
    # would otherwise come back as the "per-pair losses", a float64 one as a non-fp32 result
    if not isinstance(losses, torch.Tensor) or not losses.dtype.is_floating_point or losses.shape != delta.shape:
        got = f"{losses.dtype} {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise TypeError(f"dpo_loss: the formula of loss_type {name!r} must return a float tensor of per-pair "
                        f"losses of delta's shape {tuple(delta.shape)}, got {got}")
    return losses.float()


def _torch_dpo(c, r, rc, rr, beta, loss_type, eps):
    c, r, rc, rr = (t.float() for t in (c, r, rc, rr))
    delta = (c - rc) - (r - rr)
    losses = _plugin_losses(loss_type, delta, beta, eps)
    return losses, (beta * (c - rc)).detach(), (beta * (r - rr)).detach()


def _add(total, term):
    return term if total is None else total + term


def _torch_terms(spec, c, r, rc, rr, nc, nr, with_fused, sft_c=None):
    """Sum of the weighted types that run in torch (all of them with with_fused=True: the torch
    backend; else the batch types and plugins), fp32 [B], or None when there are none. sft_c:
    the chosen sums sft reads instead of c (LD-DPO weights c, TRL's sft does not)."""
    c, r, rc, rr = (t.float() for t in (c, r, rc, rr))
    pairs = spec.names_weights() if with_fused else list(spec.batch)
    total = None
    if sft_c is not None:
        for name, w in pairs:
            if name == "sft":
                term = RT.batch_type_losses("sft", sft_c.float(), r, rc, rr, nc, spec.beta, spec.eps)
                total = _add(total, term if w == 1.0 else w * term)
        pairs = [(n, w) for n, w in pairs if n != "sft"]
    if pairs:
        names, weights = zip(*pairs)
        part, _, _ = RT.dpo_type_losses(c, r, rc, rr, names, weights, spec.beta, spec.eps,
                                        RT.F_DIVERGENCES[spec.fdiv], spec.f_alpha, spec.tau, nc, nr)
        total = _add(total, part)
    for name, w in spec.plugins:
        term = _plugin_losses(name, (c - rc) - (r - rr), spec.beta, spec.eps)
        total = _add(total, term if w == 1.0 else w * term)
    return total


def _check_lengths(op, spec, chosen_lengths, rejected_lengths, like):
    """The token counts as one fp32 [2B] tensor [chosen; rejected], or None where no type reads them."""
    given = [(n, t) for n, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths))]
    for n, t in given:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{op}: {n} must be a real tensor of token counts [B], got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.shape != like.shape or t.device != like.device:
            raise ValueError(f"{op}: {n} must have the shape {tuple(like.shape)} and device {like.device} of "
                             f"chosen_logps, got {tuple(t.shape)} on {t.device}")
    if not spec.needs_lengths:
        return None
    if chosen_lengths is None or rejected_lengths is None:
        names = [n for n, _ in spec.names_weights() if n in RT.LENGTH_TYPES]
        raise ValueError(f"{op}: loss_type {names} needs chosen_lengths and rejected_lengths (the completions' "
                         f"token counts)")
    return torch.cat([chosen_lengths, rejected_lengths]).detach().float().contiguous()


def _check_pair_weights(op, pair_weights, like):
    if pair_weights is None:
        return None
    check_float_tensor(op, "pair_weights", pair_weights)
    if pair_weights.shape != like.shape or pair_weights.device != like.device:
        raise ValueError(f"{op}: pair_weights must have the shape {tuple(like.shape)} and device {like.device} of "
                         f"the per-pair losses, got {tuple(pair_weights.shape)} on {pair_weights.device}")
    return pair_weights.detach().float()


def _dpo_general(name, spec, tensors, lengths, pw, sft_c=None):
    """The general path of dpo_loss on sequence log-probs: fused per-pair types in one kernel
    (fused backends), batch types and plugins in torch, then the WPO pair weights."""
    c, r, rc, rr = tensors
    b = c.shape[0]
    nc, nr = (lengths[:b], lengths[b:]) if lengths is not None else (None, None)
    if name == "torch":
        losses = _torch_terms(spec, c, r, rc, rr, nc, nr, with_fused=True, sft_c=sft_c)
        cw, rw = (spec.beta * (c.float() - rc.float())).detach(), (spec.beta * (r.float() - rr.float())).detach()
    else:
        losses = None
        if spec.fused_ids:
            ins = tensors if len({t.dtype for t in tensors}) == 1 else tuple(t.float() for t in tensors)
            losses, cw, rw = DPO_MULTI.kernels(name)[0](*(t.contiguous() for t in ins), lengths, *spec.kernel_args())
            cw, rw = cw.detach(), rw.detach()
        else:
            cw, rw = (spec.beta * (c.float() - rc.float())).detach(), (spec.beta * (r.float() - rr.float())).detach()
        extra = _torch_terms(spec, c, r, rc, rr, nc, nr, with_fused=False, sft_c=sft_c)
        if extra is not None:
            losses = _add(losses, extra)
    if pw is not None:
        losses = losses * pw
    return losses, cw, rw


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type="sigmoid",
    label_smoothing: float = 0.0,
    loss_weights=None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths=None,
    rejected_lengths=None,
    pair_weights=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards: `(losses, chosen_rewards, rejected_rewards)`, fp32 [B].

    Inputs: per-sequence log-probs [B] (float32/bfloat16/float16; math in fp32). With
    delta = (c - ref_c) - (r - ref_r), x = beta * delta, eps = label_smoothing in [0, 0.5):
        sigmoid  -(1-eps) logsig(x) - eps logsig(-x)        (eps > 0: conservative DPO)
        ipo      (delta - 1/(2 beta))^2                      (pass length-averaged log-probs)
        hinge    relu(1 - x)
        robust   (-(1-eps) logsig(x) + eps logsig(-x)) / (1 - 2 eps)
    and exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop, sigmoid_norm,
    ipo_norm (fused), aot, aot_unpaired, sft (torch composites over the batch) -- each formula
    with its paper in fastalign/kernels/reference_dpo_types.py and docs/dpo_loss_types.md -- and
    any type added with `register_dpo_loss_type`. label_smoothing is accepted (and validated)
    for every type; only sigmoid, robust, exo_pair (which needs it > 0), sigmoid_norm, aot and
    aot_unpaired use it. logsig is evaluated as min(x, 0) - log1p(exp(-|x|)), finite for any
    finite x (|x| = 1e4 included). Rewards are beta * (logp - ref), detached.

    loss_type: a name or a list of names; loss_weights: one float per name (default 1 each): the
    loss is sum_k w_k L_k per pair, the fused types in one kernel pass. f_divergence_type
    (reverse_kl, forward_kl, js_divergence, alpha_divergence with f_alpha_divergence_coef) maps
    each log-ratio t to its f-DPO score before the score-based types (not defined for the others:
    refused). discopop_tau: DiscoPOP's temperature. chosen_lengths / rejected_lengths [B]: token
    counts, required by sigmoid_norm, ipo_norm and sft. pair_weights [B]: multiplies each pair's
    loss, detached (WPO: `wpo_pair_weights`).

    Gradients reach all four log-prob inputs that require grad (+dL/dcr to chosen, -dL/dcr to
    ref_chosen, and likewise for rejected); pass detached reference log-probs for the usual frozen
    reference. Fused backends: one kernel forward, one backward (plus the torch composites).

    Where peers differ: label_smoothing under "sigmoid" is conservative DPO here (as in OpenRLHF
    and older TRL; current TRL ignores it, i.e. use 0.0 to match it). "ipo" takes the log-probs
    as given: TRL averages them over tokens ("ipo_norm" here, or pass sequence_logps(...,
    reduce="mean"), or dpo_loss_from_tokens(..., average_log_prob=True)), OpenRLHF passes sums.
    """
    op = "dpo_loss"
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    tensors = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_pairs(op, names, tensors)
    spec = _resolve(op, beta, loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
                    discopop_tau)
    lengths = _check_lengths(op, spec, chosen_lengths, rejected_lengths, chosen_logps)
    pw = _check_pair_weights(op, pair_weights, chosen_logps)
    name = _backends.resolve(backend, chosen_logps.device, op=op)
    if not (spec.legacy and pw is None):
        return _dpo_general(name, spec, tensors, lengths, pw)
    beta, eps = spec.beta, spec.eps
    loss_type = loss_type if isinstance(loss_type, str) else loss_type[0]
    kernel_id = DPO_LOSS_TYPES[loss_type].kernel_id
    if name == "torch" or kernel_id is None:
        return _torch_dpo(*tensors, beta, loss_type, eps)
    if len({t.dtype for t in tensors}) > 1:  # the kernels take one dtype; fp32 loses nothing
        tensors = tuple(t.float() for t in tensors)
    losses, cw, rw = DPO_LOSS.kernels(name)[0](*(t.contiguous() for t in tensors), beta, kernel_id, eps)
    return losses, cw.detach(), rw.detach()


def wpo_pair_weights(policy_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor):
    """WPO pair weights [B] (fp32, no gradient) of a [chosen; rejected] batch [2B, T]: per row,
    exp(masked mean of (logp - log sum_v p_v^2)), chosen row times rejected row -- TRL 1.16's
    `use_weighting` (log_sum_sq_probs is the LM head's per-token log sum of squared probabilities).
    Pass them as dpo_loss(..., pair_weights=...) or use dpo_loss_from_tokens(use_weighting=True)."""
    op = "wpo_pair_weights"
    check_float_tensor(op, "policy_token_logps", policy_token_logps)
    check_float_tensor(op, "log_sum_sq_probs", log_sum_sq_probs)
    if policy_token_logps.dim() != 2 or policy_token_logps.shape[0] % 2:
        raise ValueError(f"{op}: policy_token_logps must be 2-D [2B, T] ([chosen; rejected]), got "
                         f"{tuple(policy_token_logps.shape)}")
    if log_sum_sq_probs.shape != policy_token_logps.shape or log_sum_sq_probs.device != policy_token_logps.device:
        raise ValueError(f"{op}: log_sum_sq_probs must have the shape {tuple(policy_token_logps.shape)} and device of "
                         f"policy_token_logps, got {tuple(log_sum_sq_probs.shape)} on {log_sum_sq_probs.device}")
    check_mask(op, mask, policy_token_logps, "policy_token_logps")
    return RT.wpo_pair_weights(policy_token_logps, log_sum_sq_probs, mask)


def dpo_loss_from_tokens(
    policy_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type="sigmoid",
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    return_sequence_logps: bool = False,
    loss_weights=None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    ld_alpha=None,
    use_weighting: bool = False,
    log_sum_sq_probs=None,
    backend: str = "auto",
):
    """The whole DPO head in one call: token log-probs of a [chosen; rejected] batch -> losses.

    policy_token_logps, ref_token_logps [2B, T] (rows 0..B-1 the chosen completions, rows B..2B-1
    the rejected ones of the same pairs, in order); mask [2B, T] as for `sequence_logps`. Each
    row is reduced to its sequence log-prob (masked sum, or with average_log_prob=True the masked
    mean, IPO-style), then `dpo_loss` applies. Returns `(losses, chosen_rewards, rejected_rewards)`
    and, with return_sequence_logps=True, also the fp32 per-sequence log-probs (policy [2B],
    reference [2B]); the policy ones carry gradient (e.g. for an added SFT term).

    loss_type (a name or a list), loss_weights, label_smoothing, f_divergence_type,
    f_alpha_divergence_coef, discopop_tau: as for `dpo_loss`; the token counts of sigmoid_norm,
    ipo_norm and sft come from the mask (sft needs the sums: average_log_prob=False). ld_alpha
    (LD-DPO, in [0, 1]): each row's valid tokens beyond the pair's shared length min(n_chosen,
    n_rejected) count ld_alpha times in both models' sequence log-probs (token weights applied in
    torch before the fused head; the returned sequence log-probs are the weighted ones).
    use_weighting=True (WPO) multiplies each pair's loss by `wpo_pair_weights(policy_token_logps,
    log_sum_sq_probs, mask)`, which needs log_sum_sq_probs [2B, T].

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
    spec = _resolve(op, beta, loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
                    discopop_tau)
    if not isinstance(average_log_prob, bool):
        raise TypeError(f"{op}: average_log_prob must be a bool, got {average_log_prob!r}")
    return_sequence_logps = check_flag(op, "return_sequence_logps", return_sequence_logps)
    use_weighting = check_flag(op, "use_weighting", use_weighting)
    if ld_alpha is not None and not (_is_real(ld_alpha) and 0.0 <= float(ld_alpha) <= 1.0):
        raise ValueError(f"{op}: ld_alpha must be None or a number in [0, 1], got {ld_alpha!r}")
    if use_weighting:
        if log_sum_sq_probs is None:
            raise ValueError(f"{op}: use_weighting=True (WPO) needs log_sum_sq_probs [2B, T]")
        pw = wpo_pair_weights(pol, log_sum_sq_probs, mask)
    elif log_sum_sq_probs is not None:
        raise ValueError(f"{op}: log_sum_sq_probs is only read with use_weighting=True")
    else:
        pw = None
    if average_log_prob and any(n == "sft" for n, _ in spec.batch):
        raise ValueError(f"{op}: loss_type 'sft' needs summed log-probs (a token mean over the batch): "
                         f"average_log_prob must be False")
    name = _backends.resolve(backend, pol.device, op=op)
    b = pol.shape[0] // 2
    reduce = "mean" if average_log_prob else "sum"
    if spec.legacy and ld_alpha is None and pw is None:
        beta, eps = spec.beta, spec.eps
        loss_type = loss_type if isinstance(loss_type, str) else loss_type[0]
        kernel_id = DPO_LOSS_TYPES[loss_type].kernel_id
        if name == "torch" or kernel_id is None:
            pseq = sequence_logps(pol, mask, reduce=reduce, backend=name)
            rseq = sequence_logps(ref, mask, reduce=reduce, backend=name)
            out = _torch_dpo(pseq[:b], pseq[b:], rseq[:b], rseq[b:], beta, loss_type, eps)
        else:
            if ref.dtype != pol.dtype:  # the kernels take one dtype; fp32 loses nothing
                pol, ref = pol.float(), ref.float()
            losses, cw, rw, pseq, rseq = DPO_TOKENS.kernels(name)[0](
                pol.contiguous(), ref.contiguous(), kernel_mask(mask, name), beta, kernel_id, eps, average_log_prob)
            out = (losses, cw.detach(), rw.detach())
    else:
        sft_c = None
        if ld_alpha is not None:  # LD-DPO: weighted token log-probs, the same weights for both models
            if any(n == "sft" for n, _ in spec.batch):  # TRL's sft reads the unweighted log-probs
                sft_c = sequence_logps(pol[:b], mask[:b], backend=name)
            w = RT.ld_token_weights(mask, ld_alpha)
            pol, ref = pol * w, ref * w
        # one reduction over the mask (count_nonzero: no bool temporary, no int64 sum of it)
        lengths = torch.count_nonzero(mask, dim=-1).float() if spec.needs_lengths else None
        if name == "torch" or not spec.fused_ids:
            pseq = sequence_logps(pol, mask, reduce=reduce, backend=name)
            rseq = sequence_logps(ref, mask, reduce=reduce, backend=name)
            out = _dpo_general(name, spec, (pseq[:b], pseq[b:], rseq[:b], rseq[b:]), lengths, pw, sft_c)
        else:
            if ref.dtype != pol.dtype:
                pol, ref = pol.float(), ref.float()
            losses, cw, rw, pseq, rseq = DPO_MULTI_TOKENS.kernels(name)[0](
                pol.contiguous(), ref.contiguous(), kernel_mask(mask, name), lengths, *spec.kernel_args(),
                average_log_prob)
            nc, nr = (lengths[:b], lengths[b:]) if lengths is not None else (None, None)
            extra = _torch_terms(spec, pseq[:b], pseq[b:], rseq[:b], rseq[b:], nc, nr, with_fused=False, sft_c=sft_c)
            if extra is not None:
                losses = losses + extra
            if pw is not None:
                losses = losses * pw
            out = (losses, cw.detach(), rw.detach())
    if return_sequence_logps:
        return (*out, pseq, rseq.detach())
    return out


def reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, margin=None,
                backend: str = "auto") -> torch.Tensor:
    """Bradley-Terry pairwise loss, mean over pairs: mean(-logsig(c - r - margin)), fp32 scalar.

    chosen_scores, rejected_scores: one shape (usually [B]), float32/bfloat16/float16; margin:
    None, a number, or a tensor of that shape. Gradients reach both scores (and a margin tensor
    that requires grad). The op is a handful of elementwise ops on B numbers, so every backend
    runs the same composed torch formula (fp32, logsigmoid stable for any finite argument);
    `backend` is validated and resolved like every op's.
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
    _backends.resolve(backend, chosen_scores.device, op=op)
    return reference.reward_loss(chosen_scores, rejected_scores, margin)
