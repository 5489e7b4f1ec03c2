"""The general DPO ops: every per-pair loss type of fastalign/kernels/reference_dpo_types.py in a
weighted list, an f-divergence and token counts, in one fused kernel per direction (DPO_MULTI on
sequence log-probs, DPO_MULTI_TOKENS the whole head from token log-probs; kernels csrc/cpu/
dpo_multi.cpp, csrc/cuda/dpo_multi.cu, fastalign/kernels/triton/dpo_multi.py), the validation of
the loss options (_resolve), and the torch composites around them (batch types, plugins, WPO,
LD-DPO). The public functions are fastalign.dpo_loss / dpo_loss_from_tokens (ops/preference.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastalign.kernels import reference_dpo_types as RT
from fastalign.ops._checks import is_real as _is_real  # noqa: F401
from fastalign.ops._checks import check_float_tensor, check_mask, check_normal_fp32, kernel_mask, same_device
from fastalign.ops._fused import FusedOp
from fastalign.ops.dpo_loss_types import DPO_LOSS_TYPES

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
    triton="fastalign.kernels.triton.dpo_multi",
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
    backward=_multi_tok_backward, triton="fastalign.kernels.triton.dpo_multi",
)

# backend -> (fwd, bwd) per op: the tests run the raw ops from them
_MULTI, _MULTI_TOK = (op.table() for op in (DPO_MULTI, DPO_MULTI_TOKENS))


# ---- validation of the loss options ----------------------------------------------------------------

# ---- validation -------------------------------------------------------------------------------


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



# ---- the torch parts and the general paths ----------------------------------------------------------


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



def dpo_tokens_general(name, spec, pol, ref, mask, reduce, average_log_prob, ld_alpha, pw, seq_fn):
    """The general path of dpo_loss_from_tokens (anything but one original type alone): LD-DPO token
    weights in torch, the fused general head (or seq_fn = sequence_logps and the torch terms on the
    torch backend / without a fused type), the batch types, the WPO pair weights. Returns
    ((losses, chosen_rewards, rejected_rewards), policy_seq, ref_seq)."""
    b = pol.shape[0] // 2
    sequence_logps = seq_fn
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
    return out, pseq, rseq
