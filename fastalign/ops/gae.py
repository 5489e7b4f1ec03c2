"""gae: Generalized Advantage Estimation as one fused reverse scan per sequence.

Backends: torch (the per-time-step Python loop in kernels/reference.py, as TRL and verl write it),
cpp and cuda (fastalign._C: fastalign::gae_fwd), triton (fastalign_triton::gae_fwd), both from the
description GAE below. The fused op takes rewards/values of one float dtype and a mask and returns
fp32 (advantages, returns).
GAE has no gradient (its inputs are rollout data), so the op has a fake implementation for
torch.compile and no autograd formula; the public function detaches its inputs.
"""

from __future__ import annotations

import numbers

import torch

from fastalign import _backends
from fastalign.kernels import reference
from fastalign.ops._checks import kernel_mask, same_device
from fastalign.ops._fused import FusedOp

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fake_gae_fwd(rewards, values, mask, gamma, lam):
    same_device("gae_fwd", rewards=rewards, values=values, mask=mask)
    out = rewards.new_empty(rewards.shape, dtype=torch.float32)
    return out, torch.empty_like(out)


# rewards, values [B, T] (one float dtype), mask [B, T] (nonzero = valid step). Returns fp32
# (advantages, returns) [B, T]; 0 at masked steps. A reverse scan per row; forward only.
GAE = FusedOp(
    name="gae",
    fwd_schema="(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)",
    fake_fwd=_fake_gae_fwd,
    triton="fastalign.kernels.triton.gae",
)
_OPS = {b: fwd for b, (fwd, _) in GAE.table().items()}  # backend -> fwd: the tests run the raw ops from it


def _triton_op():
    return GAE.kernels("triton")[0]


# ---- validation -------------------------------------------------------------------------------


def _check_unit_interval(name: str, x) -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not (0.0 <= float(x) <= 1.0):
        raise ValueError(f"gae: {name} must be a number in [0, 1], got {x!r}")


def _check_inputs(rewards, values, mask, gamma, lam) -> None:
    for name, t in (("rewards", rewards), ("values", values), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gae: {name} must be a tensor, got {type(t).__name__}")
    for name, t in (("rewards", rewards), ("values", values)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"gae: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if mask.dtype.is_complex:
        raise TypeError(f"gae: mask must be bool or a real numeric dtype (nonzero = valid), got {mask.dtype}")
    if rewards.dim() != 2:
        raise ValueError(f"gae: rewards must be 2-D [B, T], got shape {tuple(rewards.shape)}")
    for name, t in (("values", values), ("mask", mask)):
        if t.shape != rewards.shape:
            raise ValueError(f"gae: {name} must have the shape of rewards {tuple(rewards.shape)}, got {tuple(t.shape)}")
        if t.device != rewards.device:
            raise ValueError(f"gae: {name} is on {t.device} but rewards on {rewards.device}")
    _check_unit_interval("gamma", gamma)
    _check_unit_interval("lam", lam)


# ---- public op --------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation. Returns fp32 `(advantages, returns)`, each `[B, T]`.

    rewards, values `[B, T]` float32/bfloat16/float16; mask `[B, T]` bool or any real dtype
    (nonzero = a valid step, e.g. a generated token; 0 = padding or an observation/tool token).
    gamma and lam must lie in [0, 1].

    A reverse scan over each row with state (V = value of the next valid step, A = running
    advantage), both 0 after the last step (no bootstrap value). At a valid step t:

        delta_t = r_t + gamma * V - v_t
        A = delta_t + gamma * lam * A;  V = v_t
        advantages[t] = A;  returns[t] = A + v_t

    A masked step is skipped: V and A carry through it unchanged (verl's multi-turn semantics),
    and its rewards and values are never read into the result (NaN there is harmless). At masked
    steps both outputs are exactly 0 (verl leaves the carried advantage there; every consumer
    masks those positions, and 0 keeps sums over unmasked tensors clean). A row with no valid step
    gives zeros. With an all-ones mask this is TRL's unmasked loop. No whitening is applied (see
    `masked_whiten`).

    No gradient: GAE inputs are rollout data, so the result is computed under no_grad semantics
    and never requires grad, even if an input does. Accumulation is fp32 for every input dtype.
    Backends: "torch" is the per-time-step Python loop (the reference); "cpp" a C++ scan, one
    row per task; "cuda" a block per row, chunked parallel scan; "triton" a program per row,
    tl.associative_scan over the same affine maps.
    """
    _check_inputs(rewards, values, mask, gamma, lam)
    name = _backends.resolve(backend, rewards.device, op="gae")
    rewards, values, mask = rewards.detach(), values.detach(), mask.detach()
    if name == "torch":
        return reference.gae(rewards, values, mask, float(gamma), float(lam))
    if rewards.dtype != values.dtype:  # the kernels take one input dtype; fp32 loses nothing
        rewards, values = rewards.float(), values.float()
    fwd, _ = GAE.kernels(name)
    return fwd(rewards.contiguous(), values.contiguous(), kernel_mask(mask, name), float(gamma), float(lam))
