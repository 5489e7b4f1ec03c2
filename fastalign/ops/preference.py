"""Preference ops: sequence_logps, dpo_loss (every loss type), dpo_loss_from_tokens, reward_loss.

Backends: torch (kernels/reference.py, the eager ground truth), cpp and cuda (fastalign._C:
fastalign::{sequence_logps,dpo_loss,dpo_tokens}_{fwd,bwd}), triton (fastalign_triton::...), all from
the descriptions SEQUENCE_LOGPS, DPO_LOSS and DPO_TOKENS below (fastalign/ops/_fused.py).
Each fused op is one kernel launch forward and one backward; all math is fp32 for every input
dtype and every result is fp32; token gradients come back in the token log-probs' dtype.

DPO loss types live in a registry, `DPO_LOSS_TYPES` (fastalign/ops/dpo_loss_types.py; formulas in
fastalign/kernels/reference_dpo_types.py). One of sigmoid, ipo, hinge, robust alone (weight 1,
reverse KL) runs DPO_LOSS / DPO_TOKENS below; a weighted list, the other types or an f-divergence
run the general ops of fastalign/ops/dpo_multi.py. A plugin (`register_dpo_loss_type(name,
formula)`, formula(delta, beta, label_smoothing) -> per-pair losses of the fp32 margin delta =
(c - ref_c) - (r - ref_r)) runs its torch formula on every backend (the fused sequence_logps kernel
still sums the tokens of dpo_loss_from_tokens).
"""

from __future__ import annotations

import math

import torch

from fastalign import _backends
from fastalign.kernels import reference
from fastalign.ops._checks import check_flag, check_float_tensor, check_mask, kernel_mask, same_device
from fastalign.ops._fused import FusedOp
from fastalign.ops.dpo_loss_types import DPO_LOSS_TYPES, DPOLossType, register_dpo_loss_type  # noqa: F401
from fastalign.ops.dpo_multi import (_MULTI, _MULTI_TOK, DPO_MULTI, DPO_MULTI_TOKENS, _check_lengths,  # noqa: F401
                                     _check_pair_weights, _dpo_general, _is_real, _plugin_losses, _resolve,
                                     _torch_dpo, dpo_tokens_general, wpo_pair_weights)


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

    loss_type (a name or a list), loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
    discopop_tau: as for `dpo_loss`; token counts come from the mask (sft: average_log_prob=False). ld_alpha
    (LD-DPO, [0, 1]): tokens beyond the pair's shared length min(n_chosen, n_rejected) count ld_alpha times in
    both models' sequence log-probs (weights applied in torch; the returned sequence log-probs are weighted).
    use_weighting=True (WPO): each pair's loss times wpo_pair_weights(policy, log_sum_sq_probs [2B, T], mask).

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
        out, pseq, rseq = dpo_tokens_general(name, spec, pol, ref, mask, reduce, average_log_prob, ld_alpha, pw,
                                             sequence_logps)
    if return_sequence_logps:
        return (*out, pseq, rseq.detach())
    return out


from fastalign.ops.reward_loss import reward_loss  # noqa: E402,F401  (its own file; importable from here too)
