"""The device and the autocast precision of a single-process run (torchrun runs take theirs from
fastalign.trainer.distributed)."""

from __future__ import annotations

import torch


def resolve_device(spec: str) -> torch.device:
    """"auto": CUDA when available, else the CPU; otherwise the named device, which must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available")
    return dev


def autocast_dtype(precision: str, device: torch.device):
    """The autocast dtype of trainer.precision on `device` (None: fp32, no autocast)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPU: fp32 (bf16 autocast on CPUs is slower than fp32 on most of them)
