"""policy_loss: the policy-gradient loss family behind one call, with a registry
(fastalign/ops/policy_loss_types.py) and rollout-mismatch correction (TIS / MIS) in the same call.

On the fused backends (cpp, cuda, triton): loss_type="ppo" runs the fused ppo_policy_loss kernels
(gspo_token too, on shifted inputs: _gspo_token), and reinforce / gpg, cispo, sapo, gspo and
geo_mean the fused pg_policy_loss kernel (policy_loss_fused.py); the rollout weights fold into
them exactly (_fold_correction), and every loss statistic comes from the kernel's own pass.
clip_cov / kl_cov (batch-level token selection), registered types and the torch backend run the
torch formula (fastalign/kernels/reference_policy_losses.py). Formulas, statistics per type and
the peers' differences: docs/policy_losses.md.
"""

from __future__ import annotations

import torch

from fastalign import _backends
from fastalign.kernels import reference_policy_losses as R
from fastalign.ops import policy_loss_fused as PF
from fastalign.ops import ppo as P
from fastalign.ops.policy_loss_types import POLICY_LOSS_TYPES

# the rollout-correction keywords, with their defaults (verl's rollout_correction names)
CORRECTION_DEFAULTS = {
    "rollout_is": None, "rollout_is_threshold": 2.0, "rollout_is_threshold_lower": None,
    "rollout_rs": None, "rollout_rs_threshold": None, "rollout_rs_threshold_lower": None,
}
_OP = "policy_loss"


def _check_correction(c, rollout_logprobs, like):
    """Normalised correction keywords; errors name the argument."""
    if c["rollout_is"] is not None and c["rollout_is"] not in R.ROLLOUT_IS_LEVELS:
        raise ValueError(f"{_OP}: rollout_is must be None or one of {R.ROLLOUT_IS_LEVELS}, got {c['rollout_is']!r}")
    if c["rollout_rs"] is not None and c["rollout_rs"] not in R.ROLLOUT_RS_LEVELS:
        raise ValueError(f"{_OP}: rollout_rs must be None or one of {R.ROLLOUT_RS_LEVELS}, got {c['rollout_rs']!r}")
    if (c["rollout_is"] is not None or c["rollout_rs"] is not None) and rollout_logprobs is None:
        raise ValueError(f"{_OP}: rollout_is / rollout_rs need rollout_logprobs "
                         f"([B, T], the rollout engine's log-probs)")
    out = dict(c)

    def num(name, *, low_open=True, optional=False):
        x = c[name]
        if x is None and optional:
            return None
        if not (P._is_number(x) and (x > 0 if low_open else x >= 0)):
            raise ValueError(f"{_OP}: {name} must be {'None or ' if optional else ''}a finite number "
                             f"{'> 0' if low_open else '>= 0'}, got {x!r}")
        return float(x)

    out["rollout_is_threshold"] = num("rollout_is_threshold")
    out["rollout_is_threshold_lower"] = num("rollout_is_threshold_lower", low_open=False, optional=True)
    if out["rollout_is_threshold_lower"] is not None \
            and out["rollout_is_threshold_lower"] >= out["rollout_is_threshold"]:
        raise ValueError(f"{_OP}: rollout_is_threshold_lower must be < rollout_is_threshold "
                         f"({out['rollout_is_threshold']}), got {out['rollout_is_threshold_lower']}")
    out["rollout_rs_threshold"] = num("rollout_rs_threshold", optional=True)
    out["rollout_rs_threshold_lower"] = num("rollout_rs_threshold_lower", low_open=False, optional=True)
    if c["rollout_rs"] is not None and out["rollout_rs_threshold"] is None:
        raise ValueError(f"{_OP}: rollout_rs={c['rollout_rs']!r} needs rollout_rs_threshold (the upper bound of the "
                         f"importance ratio; the lower bound defaults to its inverse)")
    if out["rollout_rs_threshold_lower"] is not None and out["rollout_rs_threshold"] is not None \
            and out["rollout_rs_threshold_lower"] >= out["rollout_rs_threshold"]:
        raise ValueError(f"{_OP}: rollout_rs_threshold_lower must be < rollout_rs_threshold "
                         f"({out['rollout_rs_threshold']}), got {out['rollout_rs_threshold_lower']}")
    if rollout_logprobs is not None:
        P._check_tensors(_OP, ("logprobs", "rollout_logprobs"), (like, rollout_logprobs), like)
    return out


def _split_params(loss_type, entry, loss_params):
    unknown = sorted(set(loss_params) - set(entry.params))
    if unknown:
        raise TypeError(f"{_OP}: loss_type={loss_type!r} takes no parameter {', '.join(map(repr, unknown))}; "
                        f"its parameters are {sorted(entry.params) or 'none'} (rollout correction: "
                        f"rollout_logprobs, {', '.join(CORRECTION_DEFAULTS)})")
    params = {**entry.params, **loss_params}
    if entry.check is not None:
        checked = entry.check(params)
        if isinstance(checked, dict):  # a normalised dict; any other return value is ignored
            params = dict(checked)
    return params


def _fold_correction(old, adv, mask, rollout_logprobs, correction):
    """The rollout correction for the fused kernels: a TIS weight w > 0 (stop-gradient, per token
    or per row) scales the token loss, and every fused type's token loss l(A) has w l(A) = l(w A)
    (ppo and gspo: max/min commute with a positive factor; cispo, sapo, reinforce: linear in A,
    decisions on sign(A) only; geo_mean: for a per-row w only, see _pg_fusable), so the kernels
    get advantages w A; MIS drops tokens from the mask.
    Returns (advantages, mask, rollout stats)."""
    if rollout_logprobs is None:
        return adv, mask, {}
    valid = mask != 0
    zero = torch.zeros((), device=old.device)
    weight, keep, rstats = R.rollout_correction(
        torch.where(valid, old.detach().float(), zero), torch.where(valid, rollout_logprobs.detach().float(), zero),
        valid, **correction)
    if weight is not None:
        adv = adv.detach().float() * weight
    return adv, keep, rstats


def _kernel_stats(out, names):
    """The named POLICY_STATS of a fused policy kernel's out (fastalign/ops/ppo.py), fp32 0-dim."""
    return {n: out[1 + P.POLICY_STATS.index(n)] for n in names}


def _ppo(name, logprobs, old, adv, mask, params, agg, global_count, horizon, rollout_logprobs, correction):
    """ppo on the fused kernels (_fold_correction for the rollout correction), every statistic
    from the kernel's own pass. Without correction the call is ppo_policy_loss's, bit for bit."""
    adv, mask, rstats = _fold_correction(old, adv, mask, rollout_logprobs, correction)
    high = params["clip_low"] if params["clip_high"] is None else params["clip_high"]
    loss, out = P._policy_fused(name, logprobs, old, adv, mask, params["clip_low"], high, params["dual_clip"], agg,
                                global_count, horizon)
    return loss, {**_kernel_stats(out, P.POLICY_STATS), **rstats}


def _gspo_token(name, logprobs, old, adv, mask, params, agg, global_count, horizon, rollout_logprobs, correction):
    """gspo_token on the fused ppo kernels of any backend: its token ratio s_bt = exp(min(sg(L_b) +
    x_bt - sg(x_bt), 10)), L_b the row mean of the log-ratio over the kept tokens, is ppo's ratio
    exp(x_bt - o_bt) for o_bt = sg(x_bt) - min(L_b, 10): the same value (up to the rounding of
    x - o) and the same gradient s_bt. A row with L_b > 10 gets no gradient (its clamp blocks it):
    its logprobs enter detached. ppo without dual clip; the clip and ratio statistics are the
    kernel's (of s), approx_kl is -sum(d) / N from the row sums computed here (the kernel's would
    be of o)."""
    adv, mask, rstats = _fold_correction(old, adv, mask, rollout_logprobs, correction)
    keep = mask != 0
    zero = torch.zeros((), device=logprobs.device)
    with torch.no_grad():
        d = torch.where(keep, logprobs.detach().float() - old.detach().float(), zero)
        n = keep.sum(-1)
        row = d.sum(-1) / n.clamp(min=1)
        over = row > R.GSPO_LOG_RATIO_MAX
        log_s = torch.clamp(row, max=R.GSPO_LOG_RATIO_MAX).unsqueeze(-1)
        approx_kl = -d.sum() / n.sum().clamp(min=1)
    x = torch.where(over.unsqueeze(-1), logprobs.detach(), logprobs)
    shifted = x.detach().float() - log_s
    high = params["clip_low"] if params["clip_high"] is None else params["clip_high"]
    loss, out = P._policy_fused(name, x, shifted, adv, mask, params["clip_low"], high, None, agg, global_count,
                                horizon)
    stats = {**_kernel_stats(out, ("clipfrac", "clipfrac_low", "clipfrac_high", "ratio_mean", "ratio_max")),
             "approx_kl": approx_kl, **rstats}
    return loss, {k: v.detach().float() for k, v in stats.items()}


def _pg_fusable(name, loss_type, entry, params, correction):
    """Whether `loss_type` runs the fused pg kernel of backend `name` (else its torch formula)."""
    if name == "torch" or PF.KINDS.get(loss_type) is None or entry.formula is not getattr(R, loss_type) \
            or not PF.available(name):
        return False
    if loss_type in ("gspo", "geo_mean") and params["clip_high"] is None:
        return False  # the formulas read None as no upper bound (geo_mean) or refuse it (gspo)
    # geo_mean's token loss is -Abar R on every token of the row: a per-token TIS weight does not
    # fold into A (sum_t w_t (-Abar R) != -(sum_t w_t A_t) R); a per-row one does
    return not (loss_type == "geo_mean" and correction["rollout_is"] == "token")


def _pg(name, loss_type, logprobs, old, adv, mask, params, agg, global_count, horizon, rollout_logprobs, correction):
    """reinforce / gpg, cispo, sapo, gspo, geo_mean on the fused pg kernel
    (fastalign/ops/policy_loss_fused.py), every statistic from the kernel's own pass."""
    adv, mask, rstats = _fold_correction(old, adv, mask, rollout_logprobs, correction)
    (x, o, a), valid = P._prepare((logprobs, old.detach(), adv.detach()), mask, name)
    fwd, _ = PF.PG_POLICY_LOSS.kernels(name)
    out, _ = fwd(x, o, a, valid, *PF.kernel_args(loss_type, params), *P._agg_args(agg, global_count, horizon))
    return out[0], {**_kernel_stats(out.detach(), PF.STATS[loss_type]), **rstats}


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "ppo",
    agg: str = "token-mean",
    global_count: float | None = None,
    horizon: float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    rollout_is: str | None = None,
    rollout_is_threshold: float = 2.0,
    rollout_is_threshold_lower: float | None = None,
    rollout_rs: str | None = None,
    rollout_rs_threshold: float | None = None,
    rollout_rs_threshold_lower: float | None = None,
    backend: str = "auto",
    **loss_params,
) -> tuple[torch.Tensor, dict]:
    """A policy-gradient loss of the registered `loss_type`. Returns `(loss, stats)`: a fp32
    0-dim loss and a dict of detached fp32 0-dim tensors.

    Inputs `[B, T]`: logprobs (the policy being trained; the only input that gets a gradient, in
    its dtype), old_logprobs (the policy that the PPO ratio is taken against), advantages
    (float32/bfloat16/float16; math in fp32), mask (bool or real, nonzero = a response token).

    loss_type and its parameters (**loss_params; defaults in brackets; formulas in
    docs/policy_losses.md and fastalign/kernels/reference_policy_losses.py):
      ppo        clip_low [0.2], clip_high [= clip_low], dual_clip [None]   (fused kernels)
      gspo       clip_low [3e-4], clip_high [4e-4]   sequence ratio, gradient through every token
      gspo_token clip_low [3e-4], clip_high [4e-4]   verl's "gspo": stop-gradient token form
      cispo      clip_low [None: no lower bound], clip_high [4.0]: weight sg(clamp(r, 1-lo, 1+hi))
      sapo       tau_pos [1.0], tau_neg [1.05]
      geo_mean   clip_low [0.4], clip_high [0.4] (log-space bounds, GMPO)
      gpg, reinforce   no parameters: -A logp
      clip_cov   clip_low, clip_high, clip_cov_ratio [2e-4], clip_cov_lb [1.0], clip_cov_ub [5.0]
      kl_cov     kl_cov_ratio [2e-4], ppo_kl_coef [0.1]
    plus any type added with fastalign.register_policy_loss. An unknown keyword is a TypeError
    naming the type and its parameters.

    Rollout-mismatch correction (verl's rollout_correction names; TRL's vllm_importance_sampling_*
    in brackets), from rollout_logprobs `[B, T]` (the inference engine's log-probs of the same
    tokens) and w = exp(old_logprobs - rollout_logprobs):
      rollout_is "token" | "sequence" [token_truncate | sequence_truncate]: TIS, the per-token
        loss times the stop-gradient weight min(w, rollout_is_threshold [2.0; TRL clip_max 3.0]),
        floored at rollout_is_threshold_lower [clip_min] when given; "sequence" uses the row's
        product of w.
      rollout_rs "token" | "sequence" | "geometric" [token_mask | sequence_mask | -]: MIS, tokens
        (rows) whose ratio (token w, the row's product, the row's geometric mean) lies outside
        [rollout_rs_threshold_lower (default 1 / rollout_rs_threshold), rollout_rs_threshold]
        leave the loss and its counts (verl's semantics; TRL keeps them in the count at weight 0).
    Stats with rollout_logprobs: rollout_kl_k1, rollout_kl_k3 (KL(rollout || old) estimates),
    rollout_is_weight_mean, rollout_is_truncated_frac, rollout_rs_masked_frac (over the valid
    tokens).

    stats of the loss (means over the tokens in the loss): approx_kl (old - logp) for every type;
    ratio_mean, ratio_max (the ratio the loss uses: token ratio, or sequence ratio for gspo,
    gspo_token, geo_mean) for all but gpg/reinforce; clipfrac, clipfrac_low (A < 0, low bound),
    clipfrac_high (A > 0, high bound) for ppo, gspo, gspo_token, cispo, geo_mean, clip_cov;
    clipfrac_lower (the dual-clip cap binding) for ppo; covfrac for clip_cov / kl_cov.

    backend: "ppo" and "gspo_token" run the fused ppo kernels of that backend ("auto": the
    fastest here; "torch": the eager formula); reinforce, gpg, cispo, sapo, gspo and geo_mean
    the fused pg kernel (geo_mean with rollout_is="token", and gspo / geo_mean with clip_high
    None, their torch formula); clip_cov, kl_cov and registered types run their torch formula on
    every backend (the backend is checked all the same).
    """
    if not isinstance(loss_type, str) or loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"{_OP}: unknown loss_type {loss_type!r}; known: {sorted(POLICY_LOSS_TYPES)}")
    entry = POLICY_LOSS_TYPES[loss_type]
    P._check_tensors(_OP, ("logprobs", "old_logprobs", "advantages"), (logprobs, old_logprobs, advantages), mask)
    correction = _check_correction(
        {"rollout_is": rollout_is, "rollout_is_threshold": rollout_is_threshold,
         "rollout_is_threshold_lower": rollout_is_threshold_lower, "rollout_rs": rollout_rs,
         "rollout_rs_threshold": rollout_rs_threshold, "rollout_rs_threshold_lower": rollout_rs_threshold_lower},
        rollout_logprobs, logprobs)
    params = _split_params(loss_type, entry, loss_params)
    P._check_agg(_OP, agg, global_count, horizon)
    name = _backends.resolve(backend, logprobs.device, op=_OP)
    args = (logprobs, old_logprobs, advantages, mask, params, agg, global_count, horizon, rollout_logprobs, correction)
    if _pg_fusable(name, loss_type, entry, params, correction):
        return _pg(name, loss_type, *args)
    if name != "torch" and loss_type == "gspo_token" and entry.formula is R.gspo_token:
        return _gspo_token(name, *args)
    if name != "torch" and loss_type == "ppo" and entry.formula is R.ppo:
        return _ppo(name, *args)
    return R.policy_loss(entry.formula, *args)
