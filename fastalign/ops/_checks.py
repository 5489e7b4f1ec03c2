"""Argument checks shared by the public ops: each error names the op, the argument and what
was expected."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The kernels take scalar parameters in fp32: the range where a positive number stays normal there.
FP32_TINY, FP32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max


def is_real(x) -> bool:
    """A real number that is not a bool (True is an int to Python, not a parameter value)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_float_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_mask(op: str, mask, like: torch.Tensor, like_name: str) -> None:
    """mask: bool or any real dtype (nonzero = valid), of `like`'s shape and device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"{op}: mask must be bool or a real numeric dtype (nonzero = valid), got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"{op}: mask must have the shape of {like_name} {tuple(like.shape)}, got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{op}: mask is on {mask.device} but {like_name} on {like.device}")


def check_normal_fp32(op: str, name: str, x) -> float:
    """x as a float: a real number (not a bool) with FP32_TINY <= x <= FP32_MAX, so that it is
    neither 0 nor inf once the kernels take it in fp32."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not (
            math.isfinite(x) and FP32_TINY <= float(x) <= FP32_MAX):
        raise ValueError(f"{op}: {name} must be a finite number > 0 (and a normal fp32 number: "
                         f"{FP32_TINY} <= {name} <= {FP32_MAX:.4g}), got {x!r}")
    return float(x)


def check_flag(op: str, name: str, x) -> bool:
    """x as a bool: a bool, numpy bool or the int 0/1. Anything else is refused rather than taken
    for its truth value (the string "False" is truthy; None would silently mean False)."""
    if isinstance(x, bool) or type(x).__name__ == "bool_" or (isinstance(x, numbers.Integral) and x in (0, 1)):
        return bool(x)
    raise TypeError(f"{op}: {name} must be a bool, got {x!r}")


def same_device(op: str, **tensors) -> None:
    """RuntimeError unless every given tensor (None skipped) is on the first one's device. For the
    fake (meta) implementations of the fused ops: a raw torch.ops call with one meta tensor among
    CPU tensors dispatches to them, not to the kernel's own device check, and would return
    uninitialised tensors on the first argument's device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {first_name} on {first.device}")


# Mask dtypes the cpp kernels of GAE, the PPO losses and the DPO head read as they are (csrc/checks.h
# mask_dtype): a float or attention mask costs no conversion pass on the CPU.
_CPP_MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32)


def kernel_mask(mask: torch.Tensor, backend: str) -> torch.Tensor:
    """The mask as the fused kernels take it (nonzero = valid): as it is for cpp when its dtype is
    one they read, else bool. Contiguous, detached."""
    keep = mask.dtype == torch.bool or (backend == "cpp" and mask.dtype in _CPP_MASK_DTYPES)
    return (mask if keep else mask != 0).detach().contiguous()
