"""Argument checks of the unpaired preference ops (fastalign/ops/unpaired.py): each error names
the op, the argument and what was expected."""

from __future__ import annotations

import math

import torch

from fastalign.ops._checks import is_real as _is_real  # noqa: F401
from fastalign.ops._checks import check_float_tensor, check_normal_fp32

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _check_weights(op, desirable_weight, undesirable_weight):
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not _is_real(w) or not math.isfinite(float(w)) or float(w) < 0:
            raise ValueError(f"{op}: {name} must be a finite number >= 0, got {w!r}")
    return float(desirable_weight), float(undesirable_weight)


def _check_labels(op, labels, rows: int, device) -> torch.Tensor:
    """labels [N] as the kernels take them: bool, contiguous, detached. bool, or an integer / float
    tensor of 0s and 1s (1 = desirable); other values are refused (checked on the device: a sync,
    which bool labels skip; under torch.compile the value check is skipped and nonzero = True)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a tensor (bool, or 0/1: 1 = desirable), got {type(labels).__name__}")
    if labels.dtype.is_complex:
        raise TypeError(f"{op}: labels must be bool or 0/1 integers or floats, got {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"{op}: labels must be 1-D [N] with one label per example (N = {rows}), got shape "
                         f"{tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{op}: labels are on {labels.device} but the log-probs on {device}")
    if labels.dtype == torch.bool:
        return labels.detach().contiguous()
    if labels.device.type != "meta" and not torch.compiler.is_compiling():
        if bool(((labels != 0) & (labels != 1)).any()):
            bad = labels[(labels != 0) & (labels != 1)][0].item()
            raise ValueError(f"{op}: labels must be bool or 0/1 (1 = desirable), got the value {bad!r}")
    return (labels != 0).detach().contiguous()


def _check_point(op, name, value, device):
    """A reference point: a finite number, or a float tensor of one element on `device` (used as a
    constant). Returns (tensor [1] fp32 or None, number)."""
    if isinstance(value, torch.Tensor):
        check_float_tensor(op, name, value)
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number or a tensor of one element, got shape "
                             f"{tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{op}: {name} is on {value.device} but the log-probs on {device}")
        return value.detach().float().reshape(1).contiguous(), 0.0
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{op}: {name} must be a finite number or a one-element tensor, got {value!r}")
    return None, float(value)


def _check_seq(op, names, tensors):
    for n, t in zip(names, tensors):
        check_float_tensor(op, n, t)
    first = tensors[0]
    if first.dim() != 1:
        raise ValueError(f"{op}: {names[0]} must be 1-D [N], got shape {tuple(first.shape)}")
    for n, t in zip(names[1:], tensors[1:]):
        if t.shape != first.shape:
            raise ValueError(f"{op}: {n} must have the shape of {names[0]} {tuple(first.shape)}, got {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{op}: {n} is on {t.device} but {names[0]} on {first.device}")


def _check_token_pair(op, pol_name, pol, ref_name, ref, mask_name, mask):
    check_float_tensor(op, pol_name, pol)
    check_float_tensor(op, ref_name, ref)
    if pol.dim() != 2:
        raise ValueError(f"{op}: {pol_name} must be 2-D [N, T], got shape {tuple(pol.shape)}")
    if ref.shape != pol.shape:
        raise ValueError(f"{op}: {ref_name} must have the shape of {pol_name} {tuple(pol.shape)}, got "
                         f"{tuple(ref.shape)}")
    if ref.device != pol.device:
        raise ValueError(f"{op}: {ref_name} is on {ref.device} but {pol_name} on {pol.device}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: {mask_name} must be a tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"{op}: {mask_name} must be bool or a real numeric dtype (nonzero = valid), got {mask.dtype}")
    if mask.shape != pol.shape:
        raise ValueError(f"{op}: {mask_name} must have the shape of {pol_name} {tuple(pol.shape)}, got "
                         f"{tuple(mask.shape)}")
    if mask.device != pol.device:
        raise ValueError(f"{op}: {mask_name} is on {mask.device} but {pol_name} on {pol.device}")


def _check_common(op, beta, desirable_weight, undesirable_weight):
    beta = check_normal_fp32(op, "beta", beta)
    return (beta, *_check_weights(op, desirable_weight, undesirable_weight))


def _check_loss_type(op, loss_type):
    if not isinstance(loss_type, str) or loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"{op}: unknown loss_type {loss_type!r}; valid choices: {', '.join(KTO_LOSS_TYPES)}")
