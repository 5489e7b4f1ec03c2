"""advantages: the advantage-estimator family behind one call, with a registry.

`advantages(kind, rewards, response_mask, *, index=None, **options) -> (advantages, returns)`,
both fp32 `[B, T]`, with verl's inputs and outputs (verl/trainer/ppo/core_algos.py, the
`compute_*_advantage` functions registered with `register_adv_est`). Group ids are an integer
tensor `index [B]` (any values, any order) and every group statistic is one vectorised
index_add over the batch, where verl and OpenRLHF loop over the samples in Python
(fastalign/ops/advantage_estimators.py). The formulas, s_i = sum_t r_{i,t} the outcome score of
response i, G(i) its group, n its size, m the response mask:

  grpo      A_i = (s_i - mean_G s) / (std_G s + epsilon), std unbiased, epsilon outside the root
            (GRPO, arXiv 2402.03300); norm_adv_by_std_in_grpo=False: A_i = s_i - mean_G s
            (Dr. GRPO, arXiv 2503.20783). verl: a group of one has mean 0, std 1 (A = s/(1+eps)).
            epsilon defaults to verl's 1e-6; TRL uses 1e-4 and OpenRLHF 1e-9, and both group
            contiguous blocks of a fixed size (no index tensor), so groups of one do not arise.
  rloo      A_i = s_i - (sum_G s - s_i) / (n - 1) = n/(n-1) (s_i - mean_G s)  (arXiv 2402.14740);
            verl leaves the score of a group of one unchanged (A = s_i).
  reinforce_plus_plus_baseline
            A = whiten_batch((s_i - mean_G s) m_t) m_t  (REINFORCE++, arXiv 2501.03262): the group
            mean (0 for a group of one) subtracted, then whitened over all response tokens of the
            batch (masked_whiten: unbiased variance, rsqrt(var + 1e-8)).
  reinforce_plus_plus
            R_t = r_t + gamma m_{t+1} R_{t+1} (verl's loop: the running return is reset after each
            masked step), A = whiten_batch(R) m; returns R (not masked, as in verl).
  remax     R_t = sum_{t'>=t} r_{t'} m_{t'}, A = R - b_i m  (arXiv 2310.10505), b = reward_baselines
            [B], the score of the greedy response; returns R.
  opo       A_i = s_i - sum_G(|y| s) / sum_G |y|, |y| = sum_t m_t  (length-weighted baseline,
            arXiv 2505.23585); verl: a group of one has baseline 0. Where a group's responses are
            all empty verl divides 0 / 0 (NaN); here the baseline is 0 (the advantage is masked
            to 0 there anyway).
  grpo_passk
            Pass@k (arXiv 2503.19595): only the best response of a group gets an advantage,
            (max_G s - second max_G s) / (std_G s + epsilon) (no division when
            norm_adv_by_std_in_grpo=False); needs groups of >= 2. Ties: verl gives it to whichever
            index torch.topk returns; here the first in batch order (the value is 0 on a tie).
  gpg       A_i = alpha (s_i - mean_G s) / f_norm, alpha = B / (number of nonzero s_i) (GPG,
            arXiv 2504.02546; verl compute_gpg_outcome_advantage: its `alpha` argument is replaced
            by this batch ratio, accepted and unused here too); a group of one has mean 0.
  gdpo      GDPO (arXiv 2601.05242): each reward component c (reward_components: [B] scores or
            [B, T] token rewards; default: rewards itself) normalised as grpo within its group,
            A = whiten_batch(sum_c w_c grpo_c) m, w = reward_weights (default 1). verl reads the
            components from its batch by configured keys; here they are passed in.
  optimal_token_baseline
            (verl compute_optimal_token_baseline_advantage) G_t = sum_{t'>=t} r_t' m_t',
            w_t = 1 - 2 exp(old_log_probs_t) + sum_pi_squared_t (times rollout_is_weights^2 if given),
            W_t = sum_{j<=t} w_j m_j, baseline B_t = sum_G(G_t W_t m_t) / (sum_G(W_t m_t) + epsilon)
            per group and time step (0 for a group of one), A = (G - B) m; with handle_zero_tail the
            unique longest response of a group gets B = 0 from the second-longest length on.
            Returns G. epsilon defaults to 1e-8.
  gae       fastalign.gae(rewards, values, mask, gamma, lam) then, with whiten=True (verl's
            default), masked_whiten of the advantages. Differs from verl at masked positions only:
            fastalign.gae writes 0 there, verl the carried advantage.

The outcome estimators return (A_i m_t, A_i m_t), as verl does. rewards may also be `[B]` outcome
scores: they are placed on the last response token (what verl's reward managers do) for the
token-level estimators, and summed identically for the outcome ones.

Backends (`backend=`, as the other ops): "torch" runs the vectorised torch compositions of
fastalign/ops/advantage_estimators.py (index_add over the dense group ids); "cpp", "cuda" and
"triton" run the fused ops of fastalign/ops/advantage_ops.py (one row pass, one per-group pass
with each group reduced in batch order, one broadcast pass: deterministic on every device) for
grpo, rloo, opo, grpo_passk, reinforce_plus_plus(_baseline) and remax, and fastalign.gae's own
kernels for gae; gpg, gdpo and optimal_token_baseline are torch only. "auto" picks cpp on the CPU and cuda (then triton) on a GPU. Plugin estimators
are torch code: they take "auto" or "torch" only. torch.compile(fullgraph=True) traces every
path (the fused ops are custom ops with fake implementations).
No gradient: the inputs are rollout data, so the inputs are detached and the fused ops have no
backward (forward only).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from fastalign import _backends
from fastalign.ops import advantage_estimators as est
from fastalign.ops import advantage_ops
from fastalign.ops._checks import check_flag, check_float_tensor, check_normal_fp32
from fastalign.ops.gae import gae as _gae
from fastalign.ops.kl import masked_whiten


@dataclass(frozen=True)
class AdvantageEstimator:
    """fn(rewards, mask, group, **options) -> (advantages, returns); needs_index: whether the
    call must pass `index` (then `group` is the dense group ids, else None)."""

    fn: Callable
    needs_index: bool


def _gae_estimator(rewards, mask, group, *, values, gamma=1.0, lam=1.0, whiten=True, backend="torch"):
    del group
    check_float_tensor("advantages", "values", values)
    if values.shape != rewards.shape:
        raise ValueError(f"advantages: values must have the shape of rewards {tuple(rewards.shape)}, "
                         f"got {tuple(values.shape)}")
    adv, returns = _gae(rewards, values.detach(), mask, gamma=gamma, lam=lam, backend=backend)
    if check_flag("advantages", "whiten", whiten):
        adv = masked_whiten(adv, mask)
    return adv, returns


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(_gae_estimator, False),
    "grpo": AdvantageEstimator(est.grpo, True),
    "rloo": AdvantageEstimator(est.rloo, True),
    "reinforce_plus_plus": AdvantageEstimator(est.reinforce_plus_plus, False),
    "reinforce_plus_plus_baseline": AdvantageEstimator(est.reinforce_plus_plus_baseline, True),
    "remax": AdvantageEstimator(est.remax, False),
    "opo": AdvantageEstimator(est.opo, True),
    "grpo_passk": AdvantageEstimator(est.grpo_passk, True),
    "gpg": AdvantageEstimator(est.gpg, True),
    "gdpo": AdvantageEstimator(est.gdpo, True),
    "optimal_token_baseline": AdvantageEstimator(est.optimal_token_baseline, True),
}
_BUILTIN = frozenset(ADVANTAGE_ESTIMATORS)


def register_advantage_estimator(name: str, fn: Callable, *, needs_index: bool = True,
                                 overwrite: bool = False) -> None:
    """Adds an estimator usable as `advantages(name, ...)`.

    fn(rewards, mask, group, **options) -> (advantages, returns): rewards fp32 `[B, T]`, mask bool
    `[B, T]`, group int64 `[B]` dense group ids in [0, B) (None when needs_index=False); options
    are the keyword arguments of the `advantages` call. Group statistics:
    `fastalign.ops.advantage_estimators.group_sum(x, group)` / `group_count(group)`. Both results
    must be `[B, T]`. Built-in kinds cannot be replaced; a plugin kind only with overwrite=True.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_advantage_estimator: name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_advantage_estimator: fn must be callable, got {type(fn).__name__}")
    if name in _BUILTIN:
        raise ValueError(f"register_advantage_estimator: the built-in estimator {name!r} cannot be replaced")
    if name in ADVANTAGE_ESTIMATORS and not overwrite:
        raise ValueError(f"register_advantage_estimator: estimator {name!r} exists; pass overwrite=True to replace it")
    needs_index = check_flag("register_advantage_estimator", "needs_index", needs_index)
    ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(fn, needs_index)


# ---- validation -------------------------------------------------------------------------------


def _check_tensor_like(name, t, shape, device):
    if t.shape != shape:
        raise ValueError(f"advantages: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"advantages: {name} is on {t.device} but response_mask on {device}")


def _token_rewards(rewards, mask, keep_dtype=False):
    """rewards as fp32 [B, T] (their own dtype with keep_dtype: the fused kernels read bf16/fp16);
    [B] scores go on each row's last response token."""
    check_float_tensor("advantages", "rewards", rewards)
    if rewards.dim() == 2:
        _check_tensor_like("rewards", rewards, mask.shape, mask.device)
        return rewards.detach() if keep_dtype else rewards.detach().float()
    if rewards.dim() != 1:
        raise ValueError(f"advantages: rewards must be [B, T] token-level rewards or [B] scores, "
                         f"got shape {tuple(rewards.shape)}")
    _check_tensor_like("rewards", rewards, mask.shape[:1], mask.device)
    steps = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, steps, torch.full_like(steps, -1)).amax(-1)  # -1: an empty response
    place = (steps == last.unsqueeze(-1)) & mask
    return torch.where(place, rewards.detach().float().unsqueeze(-1), torch.zeros((), device=mask.device))


def _check_options(kind, options):
    for name in ("epsilon",):
        if name in options:
            options[name] = check_normal_fp32("advantages", name, options[name])
    for name in ("gamma", "lam"):
        if name in options:
            x = options[name]
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0.0 <= float(x) <= 1.0:
                raise ValueError(f"advantages: {name} must be a number in [0, 1], got {x!r}")
    if "norm_adv_by_std_in_grpo" in options:
        options["norm_adv_by_std_in_grpo"] = check_flag("advantages", "norm_adv_by_std_in_grpo",
                                                        options["norm_adv_by_std_in_grpo"])
    if kind == "remax":
        if "reward_baselines" not in options:
            raise TypeError("advantages: kind='remax' needs reward_baselines=[B] (the greedy responses' scores)")
        check_float_tensor("advantages", "reward_baselines", options["reward_baselines"])
    if kind == "gae" and "values" not in options:
        raise TypeError("advantages: kind='gae' needs values=[B, T] (the critic's values)")
    if "f_norm" in options:
        options["f_norm"] = check_normal_fp32("advantages", "f_norm", options["f_norm"])
    if kind == "optimal_token_baseline":
        for name in ("old_log_probs", "sum_pi_squared"):
            if name not in options:
                raise TypeError(f"advantages: kind='optimal_token_baseline' needs {name}=[B, T]")
    if "handle_zero_tail" in options:
        options["handle_zero_tail"] = check_flag("advantages", "handle_zero_tail", options["handle_zero_tail"])


def _check_extra_tensors(kind, options, mask):
    """The per-token inputs of optimal_token_baseline and the reward components of gdpo: float
    tensors of the mask's shape (components: [B] or [B, T]) on its device, detached."""
    for name in ("old_log_probs", "sum_pi_squared", "rollout_is_weights"):
        if options.get(name) is not None:
            check_float_tensor("advantages", name, options[name])
            _check_tensor_like(name, options[name], mask.shape, mask.device)
            options[name] = options[name].detach()
    if kind != "gdpo":
        return
    comps, weights = options.get("reward_components"), options.get("reward_weights")
    if comps is not None:
        if isinstance(comps, torch.Tensor) and comps.dim() == 2 and comps.shape[1:] != mask.shape[:1]:
            raise ValueError(f"advantages: reward_components as one tensor must be [C, B] = [C, {mask.shape[0]}], "
                             f"got {tuple(comps.shape)}")
        if not isinstance(comps, (list, tuple, torch.Tensor)) or len(comps) == 0:
            raise TypeError("advantages: reward_components must be a non-empty sequence of [B] or [B, T] tensors "
                            "or a [C, B] tensor")
        checked = []
        for k, c in enumerate(comps):
            check_float_tensor("advantages", f"reward_components[{k}]", c)
            if c.shape not in (mask.shape[:1], mask.shape) or c.device != mask.device:
                raise ValueError(f"advantages: reward_components[{k}] must be [B] or [B, T] "
                                 f"{tuple(mask.shape)} on {mask.device}, got {tuple(c.shape)} on {c.device}")
            checked.append(c.detach())
        options["reward_components"] = checked
    if weights is not None:
        n = 1 if comps is None else len(options["reward_components"])
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != n or any(
                isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) for w in weights):
            raise ValueError(f"advantages: reward_weights must be {n} finite numbers (one per reward component), "
                             f"got {weights!r}")
        options["reward_weights"] = [float(w) for w in weights]


# ---- public op --------------------------------------------------------------------------------


def advantages(kind: str, rewards: torch.Tensor, response_mask: torch.Tensor, *, index=None,
               backend: str = "auto", **options) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `(advantages, returns)`, each `[B, T]`, of the estimator `kind` (formulas: module doc).

    rewards: `[B, T]` token-level rewards or `[B]` outcome scores, float32/bfloat16/float16.
    response_mask: `[B, T]`, bool or any real dtype (nonzero = a response token).
    index: integer tensor `[B]` of group (prompt) ids, required by grpo, rloo,
      reinforce_plus_plus_baseline, opo, grpo_passk (and plugins registered with needs_index);
      any values in any order (map string uids to integers first); checked whenever given.
    options, per kind: epsilon (grpo, grpo_passk; default 1e-6), norm_adv_by_std_in_grpo (grpo,
      grpo_passk; default True), gamma (reinforce_plus_plus, gae; default 1.0), lam, values and
      whiten (gae), reward_baselines `[B]` (remax), f_norm (gpg), reward_components and
      reward_weights (gdpo), old_log_probs, sum_pi_squared `[B, T]`, rollout_is_weights,
      handle_zero_tail (optimal_token_baseline). An option a kind does not take is refused.
    backend: "auto", "torch", "cpp", "cuda" or "triton" (module doc); plugin kinds run as torch.
    """
    if kind not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantages: unknown kind {kind!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}")
    entry = ADVANTAGE_ESTIMATORS[kind]
    if not isinstance(response_mask, torch.Tensor):
        raise TypeError(f"advantages: response_mask must be a tensor, got {type(response_mask).__name__}")
    if response_mask.dtype.is_complex or response_mask.dim() != 2:
        raise ValueError(f"advantages: response_mask must be a 2-D [B, T] bool or real tensor, "
                         f"got {response_mask.dtype} of shape {tuple(response_mask.shape)}")
    mask = response_mask.detach()
    if mask.dtype != torch.bool:  # a bool mask is used as it is (no [B, T] pass)
        mask = mask != 0
    fused = advantage_ops.FUSED.get(kind) if kind in _BUILTIN else None
    name = _backends.resolve(backend, mask.device, op=f"advantages(kind={kind!r})",
                             supported=_backends.BACKENDS if fused is not None or kind == "gae" else ("torch",))
    if fused is not None and name != "torch" and fused[1] and isinstance(rewards, torch.Tensor) \
            and rewards.dim() == 1:
        check_float_tensor("advantages", "rewards", rewards)  # [B] scores go to the kernel as they are
        _check_tensor_like("rewards", rewards, mask.shape[:1], mask.device)
        token_rewards = rewards.detach()
    else:
        token_rewards = _token_rewards(rewards, mask, keep_dtype=fused is not None and name != "torch")
    group = None
    if entry.needs_index and index is None:
        raise TypeError(f"advantages: kind={kind!r} needs index=[B] (the group id of each response)")
    if index is not None:  # checked even where unused: a wrong index is a mistake worth naming
        if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dtype.is_complex \
                or index.dtype == torch.bool:
            what = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
            raise TypeError(f"advantages: index must be an integer tensor [B] of group ids, got {what}")
        _check_tensor_like("index", index, mask.shape[:1], mask.device)
    if entry.needs_index:
        group = est.dense_group_ids(index.detach())
    options = dict(options)
    _check_options(kind, options)
    _check_extra_tensors(kind, options, mask)
    if kind == "remax":
        _check_tensor_like("reward_baselines", options["reward_baselines"], mask.shape[:1], mask.device)
        options["reward_baselines"] = options["reward_baselines"].detach()
    if kind == "grpo_passk" and not torch.compiler.is_compiling() and group.numel() \
            and int(est.group_count(group).min()) < 2:
        raise ValueError("advantages: kind='grpo_passk' needs at least 2 responses per index value")
    if kind == "gae":
        options["backend"] = name
    try:
        if fused is not None and name != "torch":
            adv, returns = fused[0](token_rewards, mask, group, name, **options)
        else:
            adv, returns = entry.fn(token_rewards, mask, group, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise TypeError(f"advantages: kind={kind!r} does not take that option ({e})") from None
        raise
    for name, t in (("advantages", adv), ("returns", returns)):
        if not isinstance(t, torch.Tensor) or t.shape != mask.shape:
            raise RuntimeError(f"advantages: estimator {kind!r} returned {name} of shape "
                               f"{tuple(getattr(t, 'shape', ()))}, expected {tuple(mask.shape)}")
    return adv.float(), returns.float()
