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
    if precision in ("fp32", "bf16-weights"):  # bf16-weights: the weights themselves are bf16, no autocast
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32, bf16 or bf16-weights, got {precision!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPU: fp32 (bf16 autocast on CPUs is slower than fp32 on most of them)


def check_bf16_weights(device: torch.device) -> None:
    """trainer.precision=bf16-weights needs a device that computes in bf16: the CPU (every x86-64
    and Arm CPU torch runs on, natively with AVX512-BF16/AMX, else converting to fp32 per op)
    or a CUDA GPU with bf16 (compute capability 8.0 and later)."""
    from fastalign.errors import ConfigError

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"trainer.precision=bf16-weights: {torch.cuda.get_device_name(device)} cannot compute in "
                          "bf16 (needs compute capability >= 8.0); use precision fp32")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.precision=bf16-weights runs on cpu or cuda devices, not {device.type!r}")
