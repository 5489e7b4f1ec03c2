"""The DPO loss-type registry: `DPO_LOSS_TYPES` (name -> DPOLossType) and `register_dpo_loss_type`.

Built-in types (formulas and papers: fastalign/kernels/reference_dpo_types.py):
- per-pair, fused (kernel_id = the fused kernels' type id): sigmoid, ipo, hinge, robust (ids 0..3,
  the fused dpo ops' loss_type argument), exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero,
  apo_down, discopop, sigmoid_norm, ipo_norm (ids 4..12, the dpo_multi ops' loss_types);
- batch types (kernel_id None, batch=True): aot, aot_unpaired (sort the batch) and sft (a token
  mean over the batch), torch composites on the sequence log-probs on every backend.
A plugin adds a type with `register_dpo_loss_type(name, formula)`, where `formula(delta, beta,
label_smoothing)` maps the fp32 margin delta = (c - ref_c) - (r - ref_r) [B] to per-pair losses
[B] in torch, and runs on every backend (fastalign/ops/preference.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from fastalign.kernels import reference
from fastalign.kernels.reference_dpo_types import BATCH_TYPES, FUSED_TYPES


@dataclass(frozen=True)
class DPOLossType:
    """formula(delta, beta, label_smoothing) -> per-pair losses (torch, differentiable in delta),
    None for the built-in types that are not functions of delta alone; kernel_id: the fused
    kernels' id for this type, or None (then every backend runs `formula`, or for a batch type
    the composite of reference_dpo_types.batch_type_losses)."""

    formula: Optional[Callable]
    kernel_id: Optional[int] = None
    batch: bool = False


def _builtin(name):
    return lambda delta, beta, eps: reference.dpo_pair_losses(delta, beta, name, eps)


DPO_LOSS_TYPES: dict[str, DPOLossType] = {
    name: DPOLossType(_builtin(name) if kernel_id < 4 else None, kernel_id) for kernel_id, name in enumerate(FUSED_TYPES)
}
DPO_LOSS_TYPES.update({name: DPOLossType(None, None, batch=True) for name in BATCH_TYPES})


def register_dpo_loss_type(name: str, formula: Callable, *, overwrite: bool = False) -> None:
    """Adds a DPO loss type usable as dpo_loss(..., loss_type=name) on every backend.

    formula(delta, beta, label_smoothing) gets the fp32 margin delta [B] and returns per-pair
    losses [B]. It runs in torch (autograd gives its gradient) on every backend, including the
    fused ones, which have kernels only for the built-in types. E.g. SimPO (length-averaged
    log-probs, no reference: pass zeros as the reference log-probs):
        register_dpo_loss_type("simpo", lambda d, beta, eps: -F.logsigmoid(beta * d - gamma))
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_dpo_loss_type: name must be a non-empty string, got {name!r}")
    if not callable(formula):
        raise TypeError(f"register_dpo_loss_type: formula must be callable, got {type(formula).__name__}")
    if name in DPO_LOSS_TYPES and not overwrite:
        raise ValueError(f"register_dpo_loss_type: loss_type {name!r} exists; pass overwrite=True to replace it")
    if name in DPO_LOSS_TYPES and (DPO_LOSS_TYPES[name].kernel_id is not None or DPO_LOSS_TYPES[name].batch):
        raise ValueError(f"register_dpo_loss_type: the built-in loss_type {name!r} cannot be replaced")
    DPO_LOSS_TYPES[name] = DPOLossType(formula, None)
