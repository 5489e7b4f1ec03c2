"""Small helpers shared by the Triton modules: launch geometry and the device guard."""

from __future__ import annotations

import contextlib
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def row_block(n: int, cap: int) -> int:
    """Power-of-2 tile length for a row of n elements: next_power_of_2(n), at most cap."""
    return max(1, min(triton.next_power_of_2(max(n, 1)), cap))


def warps_for(block: int) -> int:
    """num_warps for a 1-D tile of `block` elements: ~16 elements per thread (four 16-byte fp32
    loads, or two for 16-bit types), between 1 and 16 warps."""
    return max(1, min(16, block // 512))


def device_guard(t: torch.Tensor):
    """Makes t's GPU the current one while launching (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def check_rows(op: str, tensors, mask: torch.Tensor) -> None:
    """Checks the raw-op contract of the [B, T] kernels (gae, PPO losses), as the C++ ops do:
    2-D float inputs of one shape, dtype and device, and a bool mask. The kernels index every
    input as b * T + t, so a smaller input would be read out of bounds (a crash under the
    interpreter, an illegal address on a GPU) instead of failing."""
    first = tensors[0]
    if first.dim() != 2:
        raise ValueError(f"{op}: inputs must be 2-D [B, T], got shape {tuple(first.shape)}")
    if first.dtype not in _FLOATS:
        raise TypeError(f"{op}: inputs must be float32, bfloat16 or float16, got {first.dtype}")
    for t in tuple(tensors[1:]) + (mask,):
        if t.shape != first.shape or t.device != first.device:
            raise ValueError(
                f"{op}: all inputs must have one shape and device {tuple(first.shape)} on {first.device}, "
                f"got {tuple(t.shape)} on {t.device}"
            )
    if any(t.dtype != first.dtype for t in tensors):
        raise TypeError(f"{op}: the float inputs must have one dtype, got {[t.dtype for t in tensors]}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be bool here, got {mask.dtype}")


def check_row_vectors(op: str, batch: int, device: torch.device, grad_out: torch.Tensor, row_weight: torch.Tensor):
    """The PPO backward's extra inputs: grad_out with the loss gradient first, row_weight [B]."""
    for name, t, n in (("grad_out", grad_out, None), ("row_weight", row_weight, batch)):
        if t.device != device or not t.dtype.is_floating_point:
            raise ValueError(f"{op}: {name} must be a float tensor on {device}, got {t.dtype} on {t.device}")
        if (n is None and t.numel() < 1) or (n is not None and t.numel() != n):
            raise ValueError(f"{op}: {name} must have {'>= 1' if n is None else n} elements, got {t.numel()}")
