"""group_advantages: GRPO's group-normalised outcome advantages.

A few tensor ops on a [N] vector of per-sequence scores (N = prompts x samples, a handful of
thousands at most), so there is no kernel: one composed torch implementation on every device,
under autograd and torch.compile. What it is for is the convention, which the field's
implementations spell slightly differently (the integrations pick theirs via the arguments):

    TRL       std over the group (unbiased), eps 1e-4; scale="batch": std over the whole batch
    verl      std over the group (unbiased), eps 1e-6; norm_adv_by_std_in_grpo=False: scale="none"
    OpenRLHF  std over the group (unbiased), eps 1e-9 ("group_norm"); "dr_grpo": scale="none"
"""

from __future__ import annotations

import numbers

import torch

from fastalign.ops._checks import check_normal_fp32

_SCALES = ("group", "batch", "none")


def group_advantages(
    scores: torch.Tensor, group_size: int, *, eps: float = 1e-6, scale: str = "group"
) -> torch.Tensor:
    """fp32 `(scores - group mean) / (std + eps)`, shape of scores.

    scores: `[N]` float (one outcome score per sampled sequence), or `[N, T]` token-level rewards,
    which are first summed over T (as verl does with token_level_rewards). Consecutive blocks
    of `group_size` entries are the samples of one prompt, so N must be a multiple of it.
    std is the unbiased (n - 1) standard deviation, added to eps *outside* the square root, as
    TRL, verl and OpenRLHF all do:
      scale="group": std of each group (needs group_size >= 2: one sample has no std)
      scale="batch": std over all N scores (TRL's scale_rewards="batch"); the mean stays per group
      scale="none":  no division (Dr. GRPO; also verl's norm_adv_by_std_in_grpo=False)
    Broadcast the result over tokens yourself (`adv[:, None] * response_mask`). Gradients flow to
    scores (normally rollout data, so there is none).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"group_advantages: scores must be a tensor, got {type(scores).__name__}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"group_advantages: scores must be a float tensor, got {scores.dtype}")
    if scores.dim() == 2:
        scores = scores.float().sum(-1)
    if scores.dim() != 1:
        raise ValueError(f"group_advantages: scores must be [N] or [N, T], got shape {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_advantages: group_size must be an integer >= 1, got {group_size!r}")
    n = scores.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"group_advantages: the number of scores ({n}) must be a multiple of group_size ({group_size})"
        )
    if scale not in _SCALES:
        raise ValueError(f"group_advantages: scale must be one of {_SCALES}, got {scale!r}")
    # eps = 0 would turn a group of equal scores (std 0) into 0 / 0 = NaN. The math is fp32, where
    # 1e-300 is 0 (NaN again) and 1e300 inf (every advantage silently 0); 2**70 (an int) raised
    # an OverflowError inside torch.
    eps = check_normal_fp32("group_advantages", "eps", eps)
    if scale == "group" and group_size < 2:
        raise ValueError("group_advantages: scale='group' needs group_size >= 2 (one sample has no std); "
                         "use scale='none' or 'batch'")
    if scale == "batch" and n < 2:
        raise ValueError("group_advantages: scale='batch' needs at least 2 scores (one has no std)")
    x = scores.float()
    if n == 0:
        return x.clone()
    groups = x.view(-1, group_size)
    adv = groups - groups.mean(-1, keepdim=True)
    if scale == "group":
        adv = adv / (groups.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (x.std() + eps)
    return adv.reshape(n)
