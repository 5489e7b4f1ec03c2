"""The policy-loss registry of `fastalign.policy_loss`: `POLICY_LOSS_TYPES` (name ->
PolicyLossType) and `register_policy_loss`.

A loss type is its per-token math and its parameters: `formula(logp, old, adv, mask, **params)`
(the convention of fastalign/kernels/reference_policy_losses.py: fp32 [B, T] inputs zeroed
outside `mask`, returns the per-token loss or (loss, extras)), the parameters' defaults and a
check of their values. Masking, rollout-mismatch correction, aggregation, statistics and input
checks are policy_loss's, the same for every type. "ppo" also has fused kernels (the
ppo_policy_loss ops); the others run their torch formula on every backend.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from fastalign.kernels import reference_policy_losses as R
from fastalign.ops._checks import FP32_MAX


@dataclass(frozen=True)
class PolicyLossType:
    """formula(logp, old, adv, mask, **params) -> loss_tok or (loss_tok, extras); params: the
    accepted parameters with their defaults; check(params) raises ValueError for a bad value
    (it gets every parameter, defaults filled in, and may return a normalised dict);
    compilable: whether torch.compile(fullgraph=True) can trace the formula."""

    formula: Callable
    params: Mapping[str, object] = field(default_factory=dict)
    check: Optional[Callable] = None
    compilable: bool = True


# ---- parameter checks ---------------------------------------------------------------------------


def number(loss_type: str, name: str, x, *, low=None, high=None, low_open=True, high_open=True,
           optional=False):
    """x as a float: a real number (not a bool), finite in fp32, in the given interval (open ends
    by default); None passes when optional. The error names the loss type and the parameter."""
    if x is None and optional:
        return None
    ok = isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and abs(float(x)) <= FP32_MAX
    if ok and low is not None:
        ok = x > low if low_open else x >= low
    if ok and high is not None:
        ok = x < high if high_open else x <= high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low is None or low_open else '['}{lo}, {hi}{')' if high is None or high_open else ']'}"
        none = "None or " if optional else ""
        raise ValueError(f"policy_loss: loss_type={loss_type!r}: {name} must be {none}a number in {interval}, "
                         f"got {x!r}")
    return float(x)


def _clip_params(loss_type, p, *, low_optional=False):
    out = dict(p)
    out["clip_low"] = number(loss_type, "clip_low", p["clip_low"], low=0, high=1, optional=low_optional)
    out["clip_high"] = number(loss_type, "clip_high", p["clip_high"], low=0, optional=True)
    return out


def _check_ppo(p):
    out = _clip_params("ppo", p)
    out["dual_clip"] = number("ppo", "dual_clip", p["dual_clip"], low=1, optional=True)
    return out


def _check_cispo(p):
    # the weight's cap is 1 + clip_high > 0: TRL's cispo caps at epsilon_high itself (clip_high =
    # epsilon_high - 1), and TRL's default epsilon_high = epsilon = 0.2 is a cap below 1
    out = dict(p)
    out["clip_low"] = number("cispo", "clip_low", p["clip_low"], low=0, high=1, optional=True)
    out["clip_high"] = number("cispo", "clip_high", p["clip_high"], low=-1)
    return out


def _check_sapo(p):
    return {k: number("sapo", k, p[k], low=0) for k in ("tau_pos", "tau_neg")}


def _check_clip_cov(p):
    out = _clip_params("clip_cov", p)
    out["clip_cov_ratio"] = number("clip_cov", "clip_cov_ratio", p["clip_cov_ratio"], low=0, high=1, high_open=False)
    out["clip_cov_lb"] = number("clip_cov", "clip_cov_lb", p["clip_cov_lb"])
    out["clip_cov_ub"] = number("clip_cov", "clip_cov_ub", p["clip_cov_ub"], low=out["clip_cov_lb"])
    return out


def _check_kl_cov(p):
    return {"kl_cov_ratio": number("kl_cov", "kl_cov_ratio", p["kl_cov_ratio"], low=0, high=1, high_open=False),
            "ppo_kl_coef": number("kl_cov", "ppo_kl_coef", p["ppo_kl_coef"], low=0, low_open=False)}


def _check_clip(name):
    return lambda p: _clip_params(name, p)


_CLIP = {"clip_low": 0.2, "clip_high": None}
POLICY_LOSS_TYPES: dict[str, PolicyLossType] = {
    "ppo": PolicyLossType(R.ppo, {**_CLIP, "dual_clip": None}, _check_ppo),
    "gspo": PolicyLossType(R.gspo, {"clip_low": 3e-4, "clip_high": 4e-4}, _check_clip("gspo")),
    "gspo_token": PolicyLossType(R.gspo_token, {"clip_low": 3e-4, "clip_high": 4e-4}, _check_clip("gspo_token")),
    "cispo": PolicyLossType(R.cispo, {"clip_low": None, "clip_high": 4.0}, _check_cispo),
    "sapo": PolicyLossType(R.sapo, {"tau_pos": 1.0, "tau_neg": 1.05}, _check_sapo),
    "geo_mean": PolicyLossType(R.geo_mean, {"clip_low": 0.4, "clip_high": 0.4}, _check_clip("geo_mean")),
    "gpg": PolicyLossType(R.gpg),
    "reinforce": PolicyLossType(R.reinforce),
    "clip_cov": PolicyLossType(R.clip_cov, {**_CLIP, "clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0},
                               _check_clip_cov, compilable=False),
    "kl_cov": PolicyLossType(R.kl_cov, {"kl_cov_ratio": 2e-4, "ppo_kl_coef": 0.1}, _check_kl_cov, compilable=False),
}
_BUILTIN = frozenset(POLICY_LOSS_TYPES)


def register_policy_loss(name: str, formula: Callable, *, params: Optional[Mapping[str, object]] = None,
                         check: Optional[Callable] = None, compilable: bool = True, overwrite: bool = False) -> None:
    """Adds a loss type usable as `policy_loss(..., loss_type=name, **params)` on every backend.

    formula(logp, old, adv, mask, **params): logp, old, adv fp32 `[B, T]` (zero outside mask; only
      logp has a gradient), mask bool `[B, T]` (the tokens in the loss, after any rollout-mismatch
      masking). Returns the per-token loss `[B, T]`, or (loss, extras) with extras a dict of `[B,
      T]` tensors reported in the stats: "ratio" as ratio_mean / ratio_max, every other entry as
      its mean over the masked tokens (e.g. a bool "clipfrac"). Written in torch; autograd gives
      the gradient. policy_loss does the masking, the rollout correction, the aggregation and the
      stats (approx_kl always).
    params: {name: default} of the parameters the type accepts (float, str or None values);
      any other keyword is refused by policy_loss, naming the type and these.
    check(params): raise ValueError for a bad value; a dict it returns replaces the parameters
      (normalised values), any other return value is ignored (the helper
      fastalign.ops.policy_loss_types.number checks a number against an interval).
    compilable: False when the formula cannot be traced by torch.compile(fullgraph=True).
    The built-in types cannot be replaced; a registered one only with overwrite=True.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_policy_loss: name must be a non-empty string, got {name!r}")
    if not callable(formula):
        raise TypeError(f"register_policy_loss: formula must be callable, got {type(formula).__name__}")
    if check is not None and not callable(check):
        raise TypeError(f"register_policy_loss: check must be callable or None, got {type(check).__name__}")
    params = dict(params or {})
    for key, value in params.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise TypeError(f"register_policy_loss: parameter names must be identifiers, got {key!r}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (numbers.Real, str))):
            raise TypeError(f"register_policy_loss: the default of {key!r} must be a float, str or None, got {value!r}")
    if name in _BUILTIN:
        raise ValueError(f"register_policy_loss: the built-in loss_type {name!r} cannot be replaced")
    if name in POLICY_LOSS_TYPES and not overwrite:
        raise ValueError(f"register_policy_loss: loss_type {name!r} exists; pass overwrite=True to replace it")
    POLICY_LOSS_TYPES[name] = PolicyLossType(formula, params, check, bool(compilable))
