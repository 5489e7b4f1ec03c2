"""The fastalign ops the algorithms use, looked up at call time.

TEMPORARY: while dpo_loss / sequence_logps / reward_loss are being added to the public API by
other work, a local eager fallback (the DESIGN.md formulas) stands in; once `fastalign` exports
an op, the real one is used and its fallback here is dead code to delete.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sequence_logps(token_logps, mask, *, reduce="sum"):
    m = mask.to(token_logps.dtype)
    s = (token_logps * m).sum(-1)
    return s if reduce == "sum" else s / m.sum(-1).clamp(min=1)


def _dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
              loss_type="sigmoid", label_smoothing=0.0, backend="auto"):
    d = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    else:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}")
    cr = (beta * (chosen_logps - ref_chosen_logps)).detach()
    rr = (beta * (rejected_logps - ref_rejected_logps)).detach()
    return losses, cr, rr


def _reward_loss(chosen_scores, rejected_scores, *, margin=None):
    d = chosen_scores - rejected_scores
    if margin is not None:
        d = d - margin
    return -F.logsigmoid(d).mean()


_FALLBACK = {"sequence_logps": _sequence_logps, "dpo_loss": _dpo_loss, "reward_loss": _reward_loss}


def op(name: str):
    import fastalign

    fn = getattr(fastalign, name, None)
    return fn if fn is not None else _FALLBACK[name]
