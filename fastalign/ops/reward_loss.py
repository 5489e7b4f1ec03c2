"""reward_loss: the Bradley-Terry pairwise loss of reward models, with a per-pair margin and TRL's
centring regulariser (a few elementwise ops on B numbers: the same torch formula on every backend)."""

from __future__ import annotations

import math

import torch

from fastalign import _backends
from fastalign.kernels import reference
from fastalign.ops._checks import is_real as _is_real  # noqa: F401
from fastalign.ops._checks import check_float_tensor


def reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *, margin=None,
                center_rewards_coefficient=None, backend: str = "auto") -> torch.Tensor:
    """Bradley-Terry pairwise loss, mean over pairs: mean(-logsig(c - r - margin)), fp32 scalar,
    plus center_rewards_coefficient * mean((c + r)^2) when that is given.

    chosen_scores, rejected_scores: one shape (usually [B]), float32/bfloat16/float16; margin:
    None, a number, or a tensor of that shape (a per-pair margin, TRL's `margin` column: the
    chosen score must beat the rejected one by m before the loss lets go). The centring term
    (Eisenstein et al. 2023, "Helping or Herding?", eq. 2; TRL's RewardConfig
    center_rewards_coefficient, 0.01 recommended) pulls the scores towards mean zero: BT only
    sees c - r, so without it the scores drift by any common offset. Both equal TRL 1.16's
    RewardTrainer.compute_loss. Gradients reach both scores (and a margin tensor that requires
    grad). The op is a handful of elementwise ops on B numbers, so every backend runs the same
    composed torch formula (fp32, logsigmoid stable for any finite argument); `backend` is
    validated and resolved like every op's.
    """
    op = "reward_loss"
    check_float_tensor(op, "chosen_scores", chosen_scores)
    check_float_tensor(op, "rejected_scores", rejected_scores)
    if rejected_scores.shape != chosen_scores.shape:
        raise ValueError(f"{op}: rejected_scores must have the shape of chosen_scores {tuple(chosen_scores.shape)}, "
                         f"got {tuple(rejected_scores.shape)}")
    if rejected_scores.device != chosen_scores.device:
        raise ValueError(f"{op}: rejected_scores is on {rejected_scores.device} but chosen_scores on "
                         f"{chosen_scores.device}")
    if chosen_scores.numel() == 0:
        raise ValueError(f"{op}: chosen_scores is empty (the mean over no pairs is undefined)")
    if isinstance(margin, torch.Tensor):
        check_float_tensor(op, "margin", margin)
        if margin.shape != chosen_scores.shape:
            raise ValueError(f"{op}: margin must have the shape of chosen_scores {tuple(chosen_scores.shape)}, got "
                             f"{tuple(margin.shape)}")
        if margin.device != chosen_scores.device:
            raise ValueError(f"{op}: margin is on {margin.device} but chosen_scores on {chosen_scores.device}")
    elif margin is not None and not (_is_real(margin) and math.isfinite(float(margin))):
        raise TypeError(f"{op}: margin must be None, a finite number or a tensor, got {margin!r}")
    coef = center_rewards_coefficient
    if coef is not None and not (_is_real(coef) and math.isfinite(float(coef)) and float(coef) >= 0):
        raise ValueError(f"{op}: center_rewards_coefficient must be None or a finite number >= 0, got {coef!r}")
    _backends.resolve(backend, chosen_scores.device, op=op)
    return reference.reward_loss(chosen_scores, rejected_scores, margin, coef)
