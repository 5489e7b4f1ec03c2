"""kl_penalty and masked_whiten: composed torch implementations on every backend.

Both are a handful of elementwise ops (plus two global reductions for whitening) that
torch.compile/inductor already fuses into one or two kernels, so no hand-written kernel is used:
every backend runs the same composed torch code (kernels/reference.py), which works on every
device, under autograd and under torch.compile. The `backend` argument is still accepted and
validated like every op's (an unusable backend raises), for a uniform API.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastalign import _backends
from fastalign.kernels import reference
from fastalign.ops._checks import FLOAT_DTYPES, check_flag, check_float_tensor, check_mask

KL_KINDS = ("k1", "abs", "k2", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, kind: str = "k1", backend: str = "auto"):
    """Per-token KL penalty estimates, fp32, shape of the inputs. With d = logprobs - ref_logprobs:

        k1  = d                                   (unbiased estimator of KL(pi || ref))
        abs = |d|
        k2  = d^2 / 2
        k3  = clamp(e^x - x - 1, -10, 10), x = clamp(-d, -20, 20)   (low-variance estimator)

    The k3 clamps are verl's/OpenRLHF's (TRL does not clamp). logprobs and ref_logprobs:
    same shape and device, float32/bfloat16/float16 (math in fp32). Gradients flow to both
    inputs, in their dtypes (zero where a clamp is active; abs at d = 0 has gradient 0).
    A composed torch implementation on every backend (see the module docstring).
    """
    for name, t in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kl_penalty: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"kl_penalty: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"kl_penalty: ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, "
            f"got {tuple(ref_logprobs.shape)}"
        )
    if ref_logprobs.device != logprobs.device:
        raise ValueError(f"kl_penalty: ref_logprobs are on {ref_logprobs.device} but logprobs on {logprobs.device}")
    if kind not in KL_KINDS:
        raise ValueError(f"kl_penalty: kind must be one of {KL_KINDS}, got {kind!r}")
    _backends.resolve(backend, logprobs.device, op="kl_penalty")
    return reference.kl_penalty(logprobs, ref_logprobs, kind)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8, backend: str = "auto"
) -> torch.Tensor:
    """fp32 `(x - mean) * rsqrt(var + eps)`, shape of x, as TRL and verl whiten advantages.

    mean and the unbiased (Bessel-corrected, n - 1) variance are taken over the entries where
    `mask` is nonzero, across the whole tensor (one mean and variance per call, not per row).
    The formula is applied to every entry, masked-out ones included (as in TRL and verl; mask the
    result yourself if those entries matter). With `shift_mean=False` the mean is added back
    (only the scale changes). Entries outside the mask never affect the statistics: NaN/inf
    there stays local to its entry in the forward result (the gradient is the formula's, so a
    NaN entry still reaches d(out)/d(scale) when any gradient flows).

    Fewer than 2 masked entries (variance undefined; TRL and verl raise here): the scale is 1,
    so the result is `x - mean` (or `x` with shift_mean=False), mean = 0 when no entry is in the
    mask. Finite, with no host synchronisation, and traceable by torch.compile.

    x float32/bfloat16/float16 (math in fp32); mask bool or any real dtype of x's shape.
    Gradients flow to x (through the mean and variance too). A composed torch implementation on
    every backend (see the module docstring).
    """
    check_float_tensor("masked_whiten", "x", x)
    check_mask("masked_whiten", mask, x, "x")
    shift_mean = check_flag("masked_whiten", "shift_mean", shift_mean)
    # eps = 0 would turn a zero variance (all masked entries equal) into 0 * inf = NaN. The math is
    # fp32, so eps must also be > 0 and finite *as fp32*: 1e-300 rounds to 0 (NaN again) and
    # 1e300 to inf (every output silently 0).
    if (
        isinstance(eps, bool)
        or not isinstance(eps, numbers.Real)
        or not (math.isfinite(eps) and 0 < float(torch.tensor(float(eps), dtype=torch.float32)) < math.inf)
    ):
        raise ValueError(f"masked_whiten: eps must be a finite number > 0 (also in fp32), got {eps!r}")
    _backends.resolve(backend, x.device, op="masked_whiten")
    return reference.masked_whiten(x, mask, bool(shift_mean), float(eps))
