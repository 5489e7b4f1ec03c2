"""Unpaired preference losses: KTO (and TRL's "apo_zero_unpaired") and BCO, from per-sequence
log-probs (`kto_loss`, `bco_loss`) or fused from token log-probs (`kto_loss_from_tokens`,
`bco_loss_from_tokens`); the math is in fastalign/kernels/reference_unpaired.py.

Backends: torch (kernels/reference_unpaired.py), cpp and cuda (fastalign._C: fastalign::
unpaired_{loss,tokens}_{fwd,bwd}, csrc/cpu/unpaired.cpp, csrc/cuda/unpaired.cu), triton
(fastalign_triton::..., kernels/triton/unpaired.py), all from the descriptions UNPAIRED_LOSS and
UNPAIRED_TOKENS below (fastalign/ops/_fused.py). KTO and BCO share the kernels (`kind` 0 / 1):
each op is one launch forward and one backward. All math is fp32 and every result is fp32; token
gradients come back in the token log-probs' dtype.

The reference point z (KTO's KL estimate z0, BCO's running reward mean delta) is a constant: it
gets no gradient. For KTO from tokens it is computed inside the forward kernel from the token
log-probs of the KL batch (mismatched prompt/completion pairs), z0 = max(0, mean_j(policy_kl_j -
ref_kl_j)) over its rows, as TRL 1.16's KTOTrainer and the paper (Ethayarajh et al. 2024, eq. 7
and section 4.1) define it.
"""

from __future__ import annotations

import torch

from fastalign import _backends
from fastalign.kernels import reference_unpaired as R
from fastalign.ops._checks import check_flag, kernel_mask, same_device
from fastalign.ops._fused import FusedOp
from fastalign.ops._unpaired_checks import (KTO_LOSS_TYPES, _check_common, _check_labels, _check_loss_type,
                                            _check_point, _check_seq, _check_token_pair)

KTO, BCO = 0, 1


# ---- fused op descriptions: fakes and autograd, shared by every backend -----------------------


def _fake_loss_fwd(pol, ref, labels, point_t, point, beta, wd, wu, kind):
    same_device("unpaired_loss_fwd", policy=pol, ref=ref, labels=labels, point=point_t)
    return pol.new_empty(pol.shape, dtype=torch.float32), pol.new_empty(pol.shape, dtype=torch.float32)


def _fake_loss_bwd(grad, pol, ref, labels, point_t, point, beta, wd, wu, kind):
    same_device("unpaired_loss_bwd", policy=pol, grad_losses=grad, ref=ref, labels=labels, point=point_t)
    return pol.new_empty(pol.shape, dtype=torch.float32)


def _loss_setup(ctx, inputs, output):
    pol, ref, labels, point_t = inputs[:4]
    ctx.save_for_backward(pol, ref, labels, point_t)
    ctx.args = inputs[4:]


def _loss_backward(ctx, bwd, grad_losses, _grad_rewards):
    # rewards are detached in the public functions; the reference point is a constant
    pol, ref, labels, point_t = ctx.saved_tensors
    g = bwd(grad_losses, pol, ref, labels, point_t, *ctx.args)  # dL/d lr = dL/d policy = -dL/d ref
    return g.to(pol.dtype), (-g).to(ref.dtype), None, None, None, None, None, None, None


def _fake_tok_fwd(pol, ref, mask, labels, klp, klr, klm, point_t, point, beta, wd, wu, kind, mean):
    same_device("unpaired_tokens_fwd", policy=pol, ref=ref, mask=mask, labels=labels, kl_policy=klp, kl_ref=klr,
                kl_mask=klm, point=point_t)
    rows = pol.shape[0]
    f32 = dict(dtype=torch.float32)
    return (pol.new_empty((rows,), **f32), pol.new_empty((rows,), **f32), pol.new_empty((), **f32),
            pol.new_empty((rows,), **f32), pol.new_empty((rows,), **f32))


def _fake_tok_bwd(grad, grad_seq, pseq, rseq, point, pol, mask, labels, beta, wd, wu, kind, mean):
    same_device("unpaired_tokens_bwd", policy=pol, grad_losses=grad, grad_policy_seq=grad_seq, policy_seq=pseq,
                ref_seq=rseq, point=point, mask=mask, labels=labels)
    return torch.empty_like(pol)


def _tok_setup(ctx, inputs, output):
    pol, _ref, mask, labels = inputs[:4]
    beta, wd, wu, kind, mean = inputs[9:]
    ctx.save_for_backward(pol, mask, labels, output[2], output[3], output[4])
    ctx.args = (beta, wd, wu, kind, mean)


def _tok_backward(ctx, bwd, grad_losses, _g_rewards, _g_point, grad_pseq, _g_rseq):
    # the reference and KL token log-probs are frozen (detached in the public functions)
    pol, mask, labels, point, pseq, rseq = ctx.saved_tensors
    g = bwd(grad_losses, grad_pseq, pseq, rseq, point, pol, mask, labels, *ctx.args)
    return (g,) + (None,) * 13


# Per-sequence log-probs policy, ref [N] (one float dtype), labels [N] bool, the reference point
# as a 1-element fp32 tensor point_t or (point_t None) the number `point`; kind 0 KTO, 1 BCO.
# (losses, rewards) [N] fp32; the backward returns grad_losses * dL/d(policy - ref) [N] fp32.
UNPAIRED_LOSS = FusedOp(
    name="unpaired_loss",
    fwd_schema="(Tensor policy, Tensor ref, Tensor labels, Tensor? point_t, float point, float beta, "
               "float desirable_weight, float undesirable_weight, int kind) -> (Tensor, Tensor)",
    bwd_schema="(Tensor grad_losses, Tensor policy, Tensor ref, Tensor labels, Tensor? point_t, float point, "
               "float beta, float desirable_weight, float undesirable_weight, int kind) -> Tensor",
    fake_fwd=_fake_loss_fwd, fake_bwd=_fake_loss_bwd, setup_context=_loss_setup, backward=_loss_backward,
    triton="fastalign.kernels.triton.unpaired",
)

# Token log-probs policy, ref [N, T] with mask, labels [N] bool; the KL batch kl_policy, kl_ref
# [M, T'] with kl_mask (all three or none): then the point is max(0, mean of the M row log-ratios),
# else point_t / point as above. (losses, rewards [N], point used [] , policy_seq, ref_seq [N]);
# the backward returns the gradient w.r.t. policy [N, T].
UNPAIRED_TOKENS = FusedOp(
    name="unpaired_tokens",
    fwd_schema="(Tensor policy, Tensor ref, Tensor mask, Tensor labels, Tensor? kl_policy, Tensor? kl_ref, "
               "Tensor? kl_mask, Tensor? point_t, float point, float beta, float desirable_weight, "
               "float undesirable_weight, int kind, bool mean) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor grad_losses, Tensor? grad_policy_seq, Tensor policy_seq, Tensor ref_seq, Tensor point, "
               "Tensor policy, Tensor mask, Tensor labels, float beta, float desirable_weight, "
               "float undesirable_weight, int kind, bool mean) -> Tensor",
    fake_fwd=_fake_tok_fwd, fake_bwd=_fake_tok_bwd, setup_context=_tok_setup, backward=_tok_backward,
    triton="fastalign.kernels.triton.unpaired",
)

# backend -> (fwd, bwd) per op: the tests run the raw ops from them
_LOSS, _TOK = (op.table() for op in (UNPAIRED_LOSS, UNPAIRED_TOKENS))


# ---- sequence-level ops -----------------------------------------------------------------------


def _seq_op(op, policy_logps, ref_logps, labels, point_value, point_name, beta, wd, wu, kind, backend):
    _check_seq(op, ("policy_logps", "ref_logps"), (policy_logps, ref_logps))
    labels = _check_labels(op, labels, policy_logps.shape[0], policy_logps.device)
    beta, wd, wu = _check_common(op, beta, wd, wu)
    point_t, point = _check_point(op, point_name, point_value, policy_logps.device)
    name = _backends.resolve(backend, policy_logps.device, op=op)
    if name == "torch":
        z = point_t.reshape(()) if point_t is not None else point
        return R.unpaired_losses(policy_logps.float() - ref_logps.float(), labels, z, beta, wd, wu, R.KINDS[kind])
    pol, ref = policy_logps, ref_logps
    if pol.dtype != ref.dtype:  # the kernels take one dtype; fp32 loses nothing
        pol, ref = pol.float(), ref.float()
    losses, rewards = UNPAIRED_LOSS.kernels(name)[0](pol.contiguous(), ref.contiguous(), labels, point_t, point, beta,
                                                     wd, wu, kind)
    return losses, rewards.detach()


def kto_kl_reference(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's KL reference point z0 = max(0, mean_j(policy_kl_logps_j - ref_kl_logps_j)), a detached
    fp32 0-d tensor, from the per-sequence log-probs [M] of the KL batch: the batch's completions
    paired with mismatched prompts (TRL: the completions rotated by one within the batch). A few
    elementwise ops on M numbers (every backend runs this torch formula)."""
    op = "kto_kl_reference"
    _check_seq(op, ("policy_kl_logps", "ref_kl_logps"), (policy_kl_logps, ref_kl_logps))
    if policy_kl_logps.numel() == 0:
        raise ValueError(f"{op}: policy_kl_logps is empty (the mean over no KL pairs is undefined)")
    return R.kto_kl_reference(policy_kl_logps, ref_kl_logps)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl_ref=None, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             loss_type: str = "kto", backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses and implicit rewards: `(losses, rewards)`, fp32 [N].

    policy_logps, ref_logps [N]: per-sequence log-probs (float32/bfloat16/float16; math in fp32);
    labels [N]: bool, or 0/1 (1 = desirable); kl_ref: the reference point z0 (a number, or a
    one-element tensor, e.g. `kto_kl_reference(...)`; used as given and as a constant). With
    lr = policy - ref, s = +1 for desirable and -1 for undesirable examples:
        kto                 L = w (1 - sigmoid(s beta (lr - z0)))     (Ethayarajh et al. 2024, eq. 7)
        apo_zero_unpaired   L = w (1 - sigmoid(s beta lr))            (D'Oosterlinck et al. 2024; kl_ref None)
    w = desirable_weight or undesirable_weight (lambda_D, lambda_U). 1 - sigmoid(x) is evaluated as
    sigmoid(-x), finite for any finite x (|beta lr| = 1e4 included). rewards = beta lr, detached.
    The batch loss of TRL is losses.mean(). Gradients reach both log-prob inputs (+g policy, -g
    ref); pass a detached ref for the usual frozen reference; kl_ref gets none.

    Where TRL differs: it returns the losses reordered (desirable first, then undesirable); here
    they stay in input order (the mean is the same). It computes 1 - sigmoid(x), which rounds to 0
    above x ~ 17 where sigmoid(-x) keeps the tiny value (a difference below 1e-7 absolute).
    """
    op = "kto_loss"
    _check_loss_type(op, loss_type)
    if loss_type == "apo_zero_unpaired":
        if kl_ref is not None:
            raise ValueError(f"{op}: loss_type 'apo_zero_unpaired' uses no KL reference point; pass kl_ref=None")
        kl_ref = 0.0
    elif kl_ref is None:
        raise ValueError(f"{op}: loss_type 'kto' needs kl_ref, the KL reference point z0 (a number or a one-element "
                         "tensor, e.g. fastalign.kto_kl_reference(policy_kl_logps, ref_kl_logps))")
    return _seq_op(op, policy_logps, ref_logps, labels, kl_ref, "kl_ref", beta, desirable_weight, undesirable_weight,
                   KTO, backend)


def bco_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, delta: float = 0.0, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example BCO losses and implicit rewards: `(losses, rewards)`, fp32 [N].

    As `kto_loss`, with delta the reward shift (TRL's running mean of the implicit rewards, kept by
    the caller: the `bco` algorithm keeps it in its state), a number or a one-element tensor:
        L = w (-logsigmoid(s (beta lr - delta)))        (Jung et al. 2024, eq. 8; TRL's bco_loss)
    logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)), finite for any finite x. The weights default to
    1 (TRL's BCO has none; its UDM density-ratio weighting of undesirable examples is not here).
    """
    return _seq_op("bco_loss", policy_logps, ref_logps, labels, delta, "delta", beta, desirable_weight,
                   undesirable_weight, BCO, backend)


# ---- fused from token log-probs ---------------------------------------------------------------


def _tokens_op(op, pol, ref, mask, labels, kl, point_value, point_name, beta, wd, wu, kind, average_log_prob,
               return_sequence_logps, backend):
    _check_token_pair(op, "policy_token_logps", pol, "ref_token_logps", ref, "mask", mask)
    ref = ref.detach()
    labels = _check_labels(op, labels, pol.shape[0], pol.device)
    beta, wd, wu = _check_common(op, beta, wd, wu)
    if not isinstance(average_log_prob, bool):
        raise TypeError(f"{op}: average_log_prob must be a bool, got {average_log_prob!r}")
    return_sequence_logps = check_flag(op, "return_sequence_logps", return_sequence_logps)
    point_t, point = (None, 0.0) if point_value is None else _check_point(op, point_name, point_value, pol.device)
    if kl is not None:
        klp, klr, klm = kl
        _check_token_pair(op, "kl_policy_token_logps", klp, "kl_ref_token_logps", klr, "kl_mask", klm)
        if klp.device != pol.device:
            raise ValueError(f"{op}: kl_policy_token_logps is on {klp.device} but policy_token_logps on {pol.device}")
        if klp.shape[0] == 0:
            raise ValueError(f"{op}: kl_policy_token_logps has no rows (the KL estimate needs at least one pair)")
        kl = (klp.detach(), klr.detach(), klm)
    name = _backends.resolve(backend, pol.device, op=op)
    if name == "torch":
        z = point_t.reshape(()) if point_t is not None else point
        out = R.unpaired_tokens(pol, ref, mask, labels, *(kl or (None, None, None)), z, beta, wd, wu, R.KINDS[kind],
                                average_log_prob)
        losses, rewards, z, pseq, rseq = out
    else:
        tensors = [pol, ref] + (list(kl[:2]) if kl is not None else [])
        if len({t.dtype for t in tensors}) > 1:  # the kernels take one dtype; fp32 loses nothing
            tensors = [t.float() for t in tensors]
        pol, ref = tensors[0], tensors[1]
        klp, klr, klm = (tensors[2].contiguous(), tensors[3].contiguous(), kernel_mask(kl[2], name)) \
            if kl is not None else (None, None, None)
        losses, rewards, z, pseq, rseq = UNPAIRED_TOKENS.kernels(name)[0](
            pol.contiguous(), ref.contiguous(), kernel_mask(mask, name), labels, klp, klr, klm, point_t, point, beta,
            wd, wu, kind, average_log_prob)
    out = (losses, rewards.detach(), z.detach())
    if return_sequence_logps:
        return (*out, pseq, rseq.detach())
    return out


def kto_loss_from_tokens(
    policy_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    kl_policy_token_logps: torch.Tensor | None = None,
    kl_ref_token_logps: torch.Tensor | None = None,
    kl_mask: torch.Tensor | None = None,
    kl_ref=None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    average_log_prob: bool = False,
    return_sequence_logps: bool = False,
    backend: str = "auto",
):
    """The whole KTO head in one call: token log-probs -> `(losses, rewards, kl)`.

    policy_token_logps, ref_token_logps [N, T] with mask [N, T] (as `sequence_logps`), labels [N]
    (bool or 0/1, 1 = desirable). Each row is reduced to its sequence log-prob (masked sum, or
    the masked mean with average_log_prob=True), then `kto_loss` applies. The KL reference point
    for loss_type "kto" comes from either
      * the KL batch: kl_policy_token_logps, kl_ref_token_logps, kl_mask [M, T'] -- the token
        log-probs of the completions under mismatched prompts (the `kto` algorithm builds them as
        TRL does: completions rotated by one within the batch); then
        z0 = max(0, mean_j(policy_kl_j - ref_kl_j)) over their rows, computed in the same kernel;
      * or kl_ref: z0 given (a number or a one-element tensor).
    "apo_zero_unpaired" takes neither. Returns losses [N] and rewards = beta lr [N] (detached),
    kl: the z0 used (fp32 0-d, detached); with return_sequence_logps=True also the fp32 sequence
    log-probs (policy [N], with gradient; reference [N]).

    Equal to `kto_loss(sequence_logps(policy), sequence_logps(ref), labels, kto_kl_reference(...))`
    on the same backend, in one kernel launch forward and one backward on the fused backends. The
    reference and KL token log-probs are treated as frozen (no gradient: z0 is a constant in the
    paper and in TRL, whose KL forward runs under no_grad); gradient flows to policy_token_logps,
    in its dtype. Where TRL differs: see `kto_loss`; TRL also averages z0 over ranks before the
    clamp (here: over the KL rows given).
    """
    op = "kto_loss_from_tokens"
    _check_loss_type(op, loss_type)
    kl_given = [t is not None for t in (kl_policy_token_logps, kl_ref_token_logps, kl_mask)]
    if any(kl_given) and not all(kl_given):
        raise ValueError(f"{op}: kl_policy_token_logps, kl_ref_token_logps and kl_mask go together (the KL batch)")
    kl = (kl_policy_token_logps, kl_ref_token_logps, kl_mask) if all(kl_given) else None
    if loss_type == "apo_zero_unpaired":
        if kl is not None or kl_ref is not None:
            raise ValueError(f"{op}: loss_type 'apo_zero_unpaired' uses no KL reference point; pass neither the KL "
                             "batch nor kl_ref")
        kl_ref = 0.0
    elif (kl is None) == (kl_ref is None):
        raise ValueError(f"{op}: loss_type 'kto' needs exactly one KL reference: the KL batch "
                         "(kl_policy_token_logps, kl_ref_token_logps, kl_mask) or kl_ref (z0 as a number or tensor)")
    return _tokens_op(op, policy_token_logps, ref_token_logps, mask, labels, kl, kl_ref, "kl_ref", beta,
                      desirable_weight, undesirable_weight, KTO, average_log_prob, return_sequence_logps, backend)


def bco_loss_from_tokens(
    policy_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    delta: float = 0.0,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    average_log_prob: bool = False,
    return_sequence_logps: bool = False,
    backend: str = "auto",
):
    """The whole BCO head in one call: token log-probs -> `(losses, rewards)` (see `bco_loss`;
    arguments as `kto_loss_from_tokens`, delta the reward shift as a number or one-element tensor).
    One kernel launch forward and one backward on the fused backends; gradient flows to
    policy_token_logps only."""
    out = _tokens_op("bco_loss_from_tokens", policy_token_logps, ref_token_logps, mask, labels, None, delta, "delta",
                     beta, desirable_weight, undesirable_weight, BCO, average_log_prob, return_sequence_logps, backend)
    return (out[0], out[1], *out[3:])
