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
