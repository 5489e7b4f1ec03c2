"""fastalign.policy_loss (every loss type, the rollout correction, the stats), its registry and the
verl / TRL adapters, against the peers' formulas re-derived here from their source, the eager
references and hand-computed cases.

What each comparison is against:
  * loss_type="ppo" runs the fused ppo_policy_loss kernels: without correction it must be
    bit-identical to ppo_policy_loss (same kernels, same arguments) on every backend; with the
    rollout correction folded into it, it is compared with the eager reference
    (kernels/reference_policy_losses.policy_loss), which multiplies the token loss by the weight.
  * reinforce / gpg, cispo, sapo, gspo and geo_mean run the fused pg kernel on every fused
    backend: each is compared with the eager reference, forward, gradient and every statistic
    (test_fused_pg_kernel_matches_reference); gspo_token runs the ppo kernels on shifted inputs
    (test_gspo_token_on_the_ppo_kernels_matches_reference).
  * every type (on the default backend: the fused kernel where there is one, the formula
    otherwise) is compared with verl's formulas
    (verl/trainer/ppo/core_algos.py, compute_policy_loss_*, and agg_loss, volcengine/verl as of
    January 2026) and TRL's (trl/trainer/grpo_trainer.py GRPOTrainer._compute_loss, TRL 1.16),
    transcribed below into float64 torch, forward and gradient w.r.t. the log-probs.

Error bounds (tests/numerics.py's model), for one fp32 evaluation against float64 on the same
inputs (bf16 inputs are read exactly by both):
  * a token loss goes through <= 8 roundings (the subtraction, the clamp-free products, the gate)
    and one exp/sigmoid (EXP_ULPS); a sequence ratio adds the mean of <= T log-ratios (gamma(T)
    relative in the log, i.e. T u sum|d| / n absolutely); the aggregation's sums and <= 3
    divisions add gamma(T + B + 3). So |loss - loss64| <= (2 EXP_ULPS + 2T + B + 16) u L, where L
    is the same aggregation of |token loss| (plus, for the sequence types, of |A| s). verl's
    + 1e-8 in its divisors is below one rounding (n >= 1).
  * gradients: the same factor times max |g64| per element (a gradient element of a sequence
    type is a sum of <= T terms each bounded by it), plus one bf16 rounding of |g64| where the
    gradient is stored in bf16; tokens whose float64 ratio lies within 1e-5 (relative) of a clip
    bound (or whose row does, for the sequence types) are excluded from the gradient comparison,
    since there the two evaluations may take different branches (a whole gradient apart).
  * clip_cov / kl_cov select tokens; their re-derivations run in fp32 like the op (the same
    selection, the same torch.randperm draw) and the same bound applies.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fastalign
from fastalign.integrations import trl as TA
from fastalign.integrations import verl as VA
from fastalign.kernels import reference_policy_losses as R
from fastalign.ops import policy_loss_types as PT
from tests.conftest import backend_params
from tests.numerics import EXP_ULPS, assert_within, unit_roundoff

BACKENDS = backend_params()
AGGS = list(R.PPO_AGG_MODES)
DTYPES = [torch.float32, torch.bfloat16]
U = unit_roundoff(torch.float32)
BUILTIN = ["ppo", "gspo", "gspo_token", "cispo", "sapo", "geo_mean", "gpg", "reinforce", "clip_cov", "kl_cov"]


def _inputs(shape=(6, 11), dtype=torch.float32, spread=0.3, empty_row=True):
    """(logp, old, adv, mask): log-probs < 0, old within ~spread in log space, mask with an empty row."""
    b, t = shape
    logp = -torch.rand(b, t) * 2 - 0.05
    old = logp + torch.randn(b, t) * spread
    adv = torch.randn(b, t)
    mask = torch.rand(b, t) > 0.25
    mask[:, 0] = True
    if empty_row:
        mask[1] = False
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


def _factor(shape):
    b, t = shape
    return (2 * EXP_ULPS + 2 * t + b + 16) * U


# ---- verl's formulas, transcribed (verl/trainer/ppo/core_algos.py, verl/utils/torch_functional.py) ----


def _v_masked_mean(x, m, axis=None):
    m = m.to(x.dtype)
    s = (x * m).sum() if axis is None else (x * m).sum(axis)
    return s / ((m.sum() if axis is None else m.sum(axis)) + 1e-8)


def _v_agg(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's agg_loss."""
    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        n = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * mask).sum() / n * dp_size
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        seq = (loss_mat * mask).sum(-1)
        if mode == "seq-mean-token-mean":
            seq = seq / (mask.sum(-1) + 1e-8)
        seq_mask = (mask.sum(-1) > 0).to(loss_mat.dtype)
        n = seq_mask.sum() if global_batch_size is None else global_batch_size
        return (seq * seq_mask).sum() / n * dp_size
    seq = (loss_mat * mask).sum(-1)
    return seq.sum() / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)


def _v_vanilla(old, logp, adv, m, cl, ch, c=3.0):
    nakl = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(nakl)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - cl, 1 + ch)
    clip1 = torch.maximum(l1, l2)
    l3 = -adv * c
    return torch.where(adv < 0, torch.min(l3, clip1), clip1)


def _v_gspo(old, logp, adv, m, cl, ch):
    nakl = logp - old
    seq_len = m.sum(-1).clamp(min=1)
    nakl_seq = (nakl * m).sum(-1) / seq_len
    log_s = torch.clamp(logp - logp.detach() + nakl_seq.detach().unsqueeze(-1), max=10.0)
    s = torch.exp(log_s)
    return torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - cl, 1 + ch))


def _v_sapo(old, logp, adv, m, tau_pos, tau_neg):
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    taus = torch.where(adv > 0, torch.as_tensor(tau_pos, dtype=adv.dtype), torch.as_tensor(tau_neg, dtype=adv.dtype))
    gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    return -gates * adv


def _v_cispo(old, logp, adv, m, cl, ch):
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    return -torch.clamp(ratio, 1 - cl, 1 + ch).detach() * adv * logp


def _v_gpg(old, logp, adv, m):
    return -logp * adv


def _v_geo_mean_loss(old, logp, adv, m, cl, ch, rollout_is_weights=None):
    nakl = logp - old
    sgn = torch.sign(adv)
    nakl_clamp = torch.clamp(nakl, -cl, ch)
    nakl_min = sgn * torch.min(sgn * nakl, sgn * nakl_clamp)
    msum = m.sum(-1)
    ratio = torch.exp((nakl_min * m).sum(-1) / (msum + 1e-8))
    advantage = (adv * m).sum(-1) / (msum + 1e-8)
    pg = -advantage * ratio
    if rollout_is_weights is not None:
        pg = pg * torch.exp((torch.log(rollout_is_weights + 1e-10) * m).sum(-1) / (msum + 1e-8))
    return pg.mean()


def _v_clip_cov(old, logp, adv, m, cl, ch, ratio_, lb, ub):
    ratio = torch.exp(logp - old)
    l1 = -adv * ratio
    corr = torch.ones_like(adv)
    l2 = -adv * torch.clamp(ratio, 1 - cl, 1 + ch)
    clip_by_origin = (l2 > l1) & (m > 0)
    cov_all = (adv - _v_masked_mean(adv, m)) * (logp - _v_masked_mean(logp.detach(), m))
    cov_all = cov_all.detach().clone()
    cov_all[m == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(ratio_ * m.sum().item()), 1)
    idx = torch.nonzero((cov_all < ub) & (cov_all > lb) & (m > 0))
    if len(idx) > 0:
        idx = idx[torch.randperm(len(idx))[: min(clip_num, len(idx))]]
    corr[idx[:, 0], idx[:, 1]] = 0
    return torch.maximum(l1, l2) * corr


def _v_kl_cov(old, logp, adv, m, ratio_, coef):
    nakl = logp - old
    ratio = torch.exp(nakl)
    l1 = -adv * ratio
    lkl = -adv * ratio + coef * nakl.abs()
    pg = l1.clone()
    valid = m > 0
    valid_idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
    va = adv[valid].detach().reshape(-1)
    vl = logp[valid].detach().reshape(-1)
    if len(va) > 0:
        cov = (va - va.mean()) * (vl - vl.mean())
        k = max(1, int(len(cov) * ratio_))
        top = valid_idx[torch.topk(cov, k, largest=True).indices]
        t = adv.shape[1]
        pg[top // t, top % t] = lkl[top // t, top % t]
    return pg


def _trl_gspo_tok(old, logp, adv, m, cl, ch):
    """TRL's GRPO loss at importance_sampling_level="sequence" (GSPO, sequence form): coef_1 =
    exp(sum(d m) / max(sum m, 1)) per row, -min(coef_1 A, clamp(coef_1, 1-cl, 1+ch) A) per token."""
    coef_1 = torch.exp(((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_2 = torch.clamp(coef_1, 1 - cl, 1 + ch)
    return -torch.min(coef_1 * adv, coef_2 * adv)


def _geo_mean_tok(old, logp, adv, m, cl, ch):
    """verl's compute_policy_loss_geo_mean row loss -Abar_b R_b, on every token of the row (the
    per-token form policy_loss aggregates)."""
    nakl = logp - old
    sgn = torch.sign(adv)
    nakl_min = sgn * torch.min(sgn * nakl, sgn * torch.clamp(nakl, -cl, ch))
    msum = m.sum(-1)
    ratio = torch.exp((nakl_min * m).sum(-1) / (msum + 1e-8))
    advantage = (adv * m).sum(-1) / (msum + 1e-8)
    return (-advantage * ratio).unsqueeze(-1).expand_as(adv)


# the op's parameters for each type and the peer's token-loss function with the same parameters
VERL_CASES = {
    "ppo": (dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0), lambda o, lp, a, m: _v_vanilla(o, lp, a, m, 0.2, 0.28)),
    "gspo_token": (dict(clip_low=0.05, clip_high=0.08), lambda o, lp, a, m: _v_gspo(o, lp, a, m, 0.05, 0.08)),
    "cispo": (dict(clip_low=0.2, clip_high=0.28), lambda o, lp, a, m: _v_cispo(o, lp, a, m, 0.2, 0.28)),
    "sapo": (dict(tau_pos=1.0, tau_neg=1.05), lambda o, lp, a, m: _v_sapo(o, lp, a, m, 1.0, 1.05)),
    "gpg": ({}, _v_gpg),
    "reinforce": ({}, _v_gpg),  # verl's compute_policy_loss_reinforce without weights: -A logp
    "gspo": (dict(clip_low=0.05, clip_high=0.08), lambda o, lp, a, m: _trl_gspo_tok(o, lp, a, m, 0.05, 0.08)),
    "geo_mean": (dict(clip_low=0.1, clip_high=0.15), lambda o, lp, a, m: _geo_mean_tok(o, lp, a, m, 0.1, 0.15)),
}


def _agg_kwargs(agg, t, use_global, mask):
    """(policy_loss kwargs, verl agg_loss kwargs) for the same aggregation."""
    if agg == "seq-mean-token-sum-norm":  # verl: sum / loss_scale_factor, no mean over rows
        h = 7.0 if use_global else float(t)
        return dict(global_count=1.0, horizon=h), dict(loss_scale_factor=h)
    if not use_global:
        return {}, {}
    if agg == "token-mean":
        g = float(mask.sum()) * 2.5  # e.g. this micro-batch is 40% of the batch
        return dict(global_count=g), dict(batch_num_tokens=g)
    g = 9.0
    return dict(global_count=g), dict(global_batch_size=g)


def _near_bounds(loss_type, logp, old, adv, mask, params):
    """Tokens (whole rows for the sequence types) within 1e-5 of a clip decision, in float64."""
    d = (logp.double() - old.double())
    r = torch.exp(d.clamp(-20, 20))
    near = torch.zeros_like(mask)

    def close(x, b):
        return (x - b).abs() <= 1e-5 * max(abs(b), 1.0)

    if loss_type in ("ppo", "cispo", "clip_cov"):
        cl = params.get("clip_low") or 0.0
        ch = params.get("clip_high", cl) or cl
        near = close(r, 1 - cl) | close(r, 1 + ch)
        if params.get("dual_clip"):
            near = near | close(r, params["dual_clip"])
    if loss_type in ("gspo", "gspo_token"):
        n = mask.sum(-1).clamp(min=1)
        s = torch.exp(torch.where(mask, d, 0.0).sum(-1) / n)
        row = close(s, 1 - params["clip_low"]) | close(s, 1 + params["clip_high"])
        near = row.unsqueeze(-1).expand_as(mask)
    if loss_type == "geo_mean":
        row = (mask & (close(d, -params["clip_low"]) | close(d, params["clip_high"]))).any(-1)
        near = row.unsqueeze(-1).expand_as(mask)
    return near


def _run(loss_type, logp, old, adv, mask, **kw):
    x = logp.clone().requires_grad_()
    loss, stats = fastalign.policy_loss(x, old, adv, mask, loss_type=loss_type, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss, stats, g


def _run64(fn, logp, old, adv, mask):
    x = logp.double().requires_grad_()
    out = fn(old.double(), x, adv.double(), mask)
    (g,) = torch.autograd.grad(out, x)
    return out, g


def _check(loss, g, ref, ref_g, abs_size, shape, dtype, near, what):
    f = _factor(shape)
    assert_within(loss, ref, f * abs_size + 1e-30, f"{what} loss")
    gb = f * ref_g.abs().max() + (unit_roundoff(dtype) * ref_g.abs() if dtype != torch.float32 else 0)
    gb = torch.as_tensor(gb, dtype=torch.float64).expand_as(ref_g)
    gb = torch.where(near, torch.full_like(ref_g, float("inf")), gb)
    assert_within(g, ref_g, gb, f"{what} gradient")


# ---- ppo: the fused kernels -----------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ppo_bit_identical_to_ppo_policy_loss(backend, device, agg, dtype):
    logp, old, adv, mask = (t.to(device) for t in _inputs(dtype=dtype))
    for kw in (dict(), dict(clip_low=0.1, clip_high=0.28, dual_clip=2.0, global_count=13.0, horizon=20.0)):
        a = logp.clone().requires_grad_()
        b = logp.clone().requires_grad_()
        la, sa = fastalign.ppo_policy_loss(a, old, adv, mask, agg=agg, backend=backend, **kw)
        lb, sb = fastalign.policy_loss(b, old, adv, mask, loss_type="ppo", agg=agg, backend=backend, **kw)
        la.backward()
        lb.backward()
        assert torch.equal(la, lb), (la, lb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("correction", [
    dict(rollout_is="token", rollout_is_threshold=1.5),
    dict(rollout_is="sequence", rollout_is_threshold=3.0, rollout_is_threshold_lower=0.5),
    dict(rollout_rs="token", rollout_rs_threshold=1.3),
    dict(rollout_is="token", rollout_rs="geometric", rollout_rs_threshold=1.1),
])
def test_ppo_with_rollout_correction_matches_reference(backend, device, agg, correction):
    """The fused path folds the TIS weight into the advantages (w l(A) = l(w A)); the reference
    multiplies the token loss. Bound as above (+1 rounding for w A against w l)."""
    torch.manual_seed(3)
    shape = (6, 11)
    logp, old, adv, mask = _inputs(shape)
    rollout = old + torch.randn(shape) * 0.3
    params = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    dev = [t.to(device) for t in (logp, old, adv, mask, rollout)]
    loss, stats, g = _run("ppo", *dev[:4], agg=agg, rollout_logprobs=dev[4], backend=backend, **correction, **params)
    x = logp.clone().requires_grad_()
    ref, rstats = R.policy_loss(R.ppo, x, old, adv, mask, params, agg, rollout_logprobs=rollout, correction={
        **{k: v for k, v in fastalign.ops.policy_loss.CORRECTION_DEFAULTS.items()}, **correction})
    (rg,) = torch.autograd.grad(ref, x)
    weight, keep, _ = R.rollout_correction(old, rollout, mask, **correction)
    w = torch.ones(shape) if weight is None else weight
    tok, _ = R.ppo(logp.double(), old.double(), adv.double() * w.double(), keep, **params)
    size = R.ppo_agg(tok.abs(), keep, agg)
    near = _near_bounds("ppo", logp, old, adv, mask, params)
    f = 2 * _factor(shape)  # two fp32 evaluations
    assert_within(loss.cpu(), ref, f * size, "loss")
    assert_within(g.cpu(), rg, torch.where(near, torch.inf, f * rg.abs().max()), "gradient")
    for k in rstats:
        # the rollout stats are the same torch code; the loss stats are decisions on the same values
        # up to the clip-bound ties excluded above (none with these inputs) and one division
        assert_within(stats[k].cpu(), rstats[k], 4 * U * (1 + rstats[k].abs()) + (1e-6 if "kl" in k else 0), k)


# ---- every other type against verl's and TRL's formulas -------------------------------------------


@pytest.mark.parametrize("loss_type", list(VERL_CASES))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_global", [False, True])
def test_matches_verl_formula(loss_type, agg, dtype, use_global):
    """policy_loss(loss_type) against the peer's token loss (verl's compute_policy_loss_*; TRL's
    sequence-level GRPO for gspo) + verl's agg_loss, float64."""
    shape = (6, 11)
    logp, old, adv, mask = _inputs(shape, dtype)
    params, verl_tok = VERL_CASES[loss_type]
    ours_kw, verl_kw = _agg_kwargs(agg, shape[1], use_global, mask)
    loss, _, g = _run(loss_type, logp, old, adv, mask, agg=agg, **ours_kw, **params)
    m = mask.double()
    ref, ref_g = _run64(lambda o, lp, a, mm: _v_agg(verl_tok(o, lp, a, m), m, agg, **verl_kw), logp, old, adv, mask)
    with torch.no_grad():
        tok = verl_tok(old.double(), logp.double(), adv.double(), m).abs()
        if loss_type in ("gspo", "gspo_token", "geo_mean"):  # the sequence ratio's error scales with |A| s
            tok = tok + adv.double().abs() * torch.exp((torch.where(mask, logp.double() - old.double(), 0.0)).sum(-1)
                                                       .clamp(max=10) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
        size = _v_agg(tok, m, agg, **verl_kw)
    _check(loss, g, ref, ref_g, size, shape, dtype, _near_bounds(loss_type, logp, old, adv, mask, params),
           f"{loss_type} {agg}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_geo_mean_matches_verl(dtype):
    """verl's compute_policy_loss_geo_mean: the mean over all rows (empty ones count, with 0)."""
    shape = (6, 11)
    logp, old, adv, mask = _inputs(shape, dtype)
    params = dict(clip_low=0.4, clip_high=0.4)
    loss, _, g = _run("geo_mean", logp, old, adv, mask, agg="seq-mean-token-mean", global_count=float(shape[0]),
                      **params)
    m = mask.double()
    ref, ref_g = _run64(lambda o, lp, a, mm: _v_geo_mean_loss(o, lp, a, m, 0.4, 0.4), logp, old, adv, mask)
    with torch.no_grad():
        n = m.sum(-1).clamp(min=1)
        size = ((adv.double().abs() * m).sum(-1) / n * math.exp(0.4)).mean()
    _check(loss, g, ref, ref_g, size, shape, dtype, _near_bounds("geo_mean", logp, old, adv, mask, params), "geo_mean")


def test_gspo_sequence_and_token_forms():
    """gspo and gspo_token have the same value; with A constant along each row and
    seq-mean-token-mean, the same gradient (GSPO paper, eq. 10 vs 13); with per-token A not."""
    shape = (5, 9)
    logp, old, _, mask = _inputs(shape)
    adv_row = torch.randn(shape[0], 1).expand(shape).contiguous()
    kw = dict(agg="seq-mean-token-mean", clip_low=0.05, clip_high=0.05)
    l1, _, g1 = _run("gspo", logp, old, adv_row, mask, **kw)
    l2, _, g2 = _run("gspo_token", logp, old, adv_row, mask, **kw)
    f = 2 * _factor(shape)
    assert_within(l1, l2, f * (l1.abs() + 1), "value")
    assert_within(g1, g2, f * g1.abs().max(), "gradient")
    adv_tok = torch.randn(shape)
    _, _, g3 = _run("gspo", logp, old, adv_tok, mask, **kw)
    _, _, g4 = _run("gspo_token", logp, old, adv_tok, mask, **kw)
    assert (g3 - g4).abs().max() > 1e-3  # the forms differ when A varies along the row


@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("agg", AGGS)
def test_cov_losses_match_verl(loss_type, agg):
    """verl's compute_policy_loss_clip_cov / _kl_cov in fp32 (the same selection; clip_cov's random
    choice from the same torch.randperm draw), ratios large enough to select several tokens."""
    shape = (8, 16)
    logp, old, adv, mask = _inputs(shape, spread=0.3)  # some tokens clipped: excluded from clip_cov's choice
    adv = adv * 3
    if loss_type == "clip_cov":
        params = dict(clip_low=0.2, clip_high=0.28, clip_cov_ratio=0.05, clip_cov_lb=0.5, clip_cov_ub=3.0)
        fn = lambda o, lp, a, m: _v_clip_cov(o, lp, a, m, 0.2, 0.28, 0.05, 0.5, 3.0)  # noqa: E731
    else:
        params = dict(kl_cov_ratio=0.1, ppo_kl_coef=0.5)
        fn = lambda o, lp, a, m: _v_kl_cov(o, lp, a, m, 0.1, 0.5)  # noqa: E731
    torch.manual_seed(11)
    ours_kw, verl_kw = _agg_kwargs(agg, shape[1], False, mask)
    loss, stats, g = _run(loss_type, logp, old, adv, mask, agg=agg, **ours_kw, **params)
    torch.manual_seed(11)
    x = logp.clone().requires_grad_()
    m = mask.float()
    tok = fn(old, x, adv, m)
    ref = _v_agg(tok, m, agg, **verl_kw)
    (rg,) = torch.autograd.grad(ref, x)
    assert stats["covfrac"] > 0
    size = _v_agg(tok.detach().abs(), m, agg, **verl_kw)
    f = 2 * _factor(shape)
    assert_within(loss, ref, f * size, "loss")
    near = _near_bounds("clip_cov" if loss_type == "clip_cov" else "gpg", logp, old, adv, mask, params)
    assert_within(g, rg, torch.where(near, torch.inf, f * rg.abs().max()), "gradient")


def _trl_loss(per_token_logps, old, adv, mask, loss_type, epsilon=0.2, epsilon_high=None, level="token",
              tau_pos=1.0, tau_neg=1.05, max_completion_length=None, sampling=None, mode="sequence_mask",
              clip_min=None, clip_max=3.0):
    """GRPOTrainer._compute_loss (TRL 1.16) for one training step, beta = 0, one process, no
    gradient accumulation; the vLLM importance-sampling ratio as _generate_and_score_completions
    computes it."""
    eh = epsilon if epsilon_high is None else epsilon_high
    advantages = adv.unsqueeze(1) if adv.dim() == 1 else adv
    log_ratio = per_token_logps - old
    if level == "token":
        liw = log_ratio
    else:
        liw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(liw)
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eh).detach() * advantages * per_token_logps
    elif loss_type == "sapo":
        temps = torch.where(advantages > 0, tau_pos, tau_neg)
        per_token_loss = -torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps * advantages
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + eh)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if sampling is not None:
        diff = (old - sampling) * mask
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        isr = torch.exp(diff)
        if mode.endswith("truncate"):
            isr = torch.clamp(isr, min=clip_min, max=clip_max)
        else:
            lo = clip_min if clip_min is not None else -math.inf
            hi = clip_max if clip_max is not None else math.inf
            isr = isr.masked_fill((isr < lo) | (isr > hi), 0.0)
        per_token_loss = per_token_loss * isr
    if loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # dapo / cispo: num_items_in_batch


TRL_CASES = [
    ("grpo", "token", None), ("grpo", "sequence", None), ("bnpo", "token", None), ("dr_grpo", "token", None),
    ("dapo", "token", None), ("dapo", "sequence", None), ("cispo", "token", None), ("sapo", "token", None),
    ("dapo", "token", "token_truncate"), ("dapo", "token", "token_mask"), ("grpo", "token", "sequence_mask"),
    ("bnpo", "token", "sequence_truncate"), ("cispo", "token", "sequence_mask"), ("dr_grpo", "token", "token_mask"),
]


@pytest.mark.parametrize("loss_type,level,mode", TRL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_trl_grpo_loss_matches_trl(loss_type, level, mode, dtype):
    shape = (6, 11)
    logp, old, adv, mask = _inputs(shape, dtype)
    adv_seq = adv[:, 0]
    sampling = (old.float() + torch.randn(shape) * 0.3).to(dtype) if mode else None
    eh = 5.0 if loss_type == "cispo" else 0.28
    kw = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=eh, importance_sampling_level=level,
              max_completion_length=16, sampling_per_token_logps=sampling,
              vllm_importance_sampling_mode=mode or "sequence_mask", vllm_importance_sampling_clip_min=0.5,
              vllm_importance_sampling_clip_max=2.0)
    x = logp.clone().requires_grad_()
    loss, _ = TA.grpo_loss(x, old, adv_seq, mask, **kw)
    (g,) = torch.autograd.grad(loss, x)
    m = mask.double()
    samp64 = None if sampling is None else sampling.double()

    def trl(o, lp, a, mm):
        return _trl_loss(lp, o, a, m, loss_type, 0.2, eh, level, max_completion_length=16, sampling=samp64,
                         mode=mode or "sequence_mask", clip_min=0.5, clip_max=2.0)

    ref, ref_g = _run64(trl, logp, old, adv_seq, mask)
    with torch.no_grad():
        size = trl(old.double(), logp.double(), adv_seq.double().abs() * 3.0, m).abs() + \
            _trl_loss(logp.double(), old.double(), adv_seq.double().abs(), m, "bnpo") .abs()
    params = dict(clip_low=0.2, clip_high=eh - 1 if loss_type == "cispo" else eh)
    near = _near_bounds("gspo" if level == "sequence" else ("cispo" if loss_type == "cispo" else "ppo"),
                        logp, old, adv, mask, params)
    if loss_type == "cispo":
        near = near | ((torch.exp(logp.double() - old.double()) - eh).abs() < 1e-5 * eh)
    _check(loss, g, ref, ref_g, size + ref.abs(), shape, dtype, near, f"TRL {loss_type} {level} {mode}")


def test_trl_token_mask_with_row_means_is_refused():
    logp, old, adv, mask = _inputs()
    with pytest.raises(NotImplementedError, match="token_mask"):
        TA.grpo_loss(logp, old, adv[:, 0], mask, loss_type="grpo", sampling_per_token_logps=old,
                     vllm_importance_sampling_mode="token_mask")


# ---- verl adapters (the full functions: forced aggregation, config, metrics, weights) ----------------


class _Cfg(dict):
    """A dict config with verl's ActorConfig field names (the adapters read it with .get)."""


def _cfg(**kw):
    base = dict(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=1.0,
                tau_neg=1.05, policy_loss=dict(clip_cov_ratio=0.05, clip_cov_lb=0.5, clip_cov_ub=3.0,
                                               kl_cov_ratio=0.1, ppo_kl_coef=0.5), global_batch_info={})
    base.update(kw)
    return _Cfg(base)


@pytest.mark.parametrize("name", ["vanilla", "gspo", "sapo", "cispo", "gpg", "geo_mean"])
@pytest.mark.parametrize("weights", [False, True])
def test_verl_adapters_match_verl(name, weights):
    shape = (6, 11)
    logp, old, adv, mask = _inputs(shape)
    m = mask.float()
    w = (torch.rand(shape) + 0.5) * m if weights else None
    cfg = _cfg()
    fn = getattr(VA, f"compute_policy_loss_{name}")
    x = logp.clone().requires_grad_()
    loss, metrics = fn(old, x, adv, m, "seq-mean-token-sum", cfg, w)
    (g,) = torch.autograd.grad(loss, x)
    tok = {"vanilla": lambda o, lp, a, mm: _v_vanilla(o, lp, a, mm, 0.2, 0.28),
           "gspo": lambda o, lp, a, mm: _v_gspo(o, lp, a, mm, 0.2, 0.28),
           "sapo": lambda o, lp, a, mm: _v_sapo(o, lp, a, mm, 1.0, 1.05),
           "cispo": lambda o, lp, a, mm: _v_cispo(o, lp, a, mm, 0.2, 0.28),
           "gpg": _v_gpg}.get(name)
    md, wd = m.double(), None if w is None else w.double()
    if name == "geo_mean":
        def verl(o, lp, a, mm):
            return _v_geo_mean_loss(o, lp, a, md, 0.2, 0.28, wd)
    else:
        mode = "seq-mean-token-mean" if name in ("gspo", "sapo") else "seq-mean-token-sum"  # verl forces it

        def verl(o, lp, a, mm):
            t = tok(o, lp, a, md)
            return _v_agg(t if wd is None else t * wd, md, mode)
    ref, ref_g = _run64(verl, logp, old, adv, mask)
    with torch.no_grad():
        size = verl(old.double(), logp.double(), adv.double().abs() * 2, md).abs() + 1.0
    params = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    kind = {"vanilla": "ppo", "gspo": "gspo_token", "geo_mean": "geo_mean", "cispo": "cispo"}.get(name, "sapo")
    _check(loss, g, ref, ref_g, size, shape, torch.float32, _near_bounds(kind, logp, old, adv, mask, params), name)
    assert all(isinstance(v, float) for v in metrics.values())
    if name in ("vanilla", "gspo", "cispo", "sapo", "geo_mean"):
        d = logp.double() - old.double()
        assert math.isclose(metrics["actor/ppo_kl"], float(_v_masked_mean(-d, md)), rel_tol=1e-5, abs_tol=1e-7)


def test_verl_cov_adapters_refuse_weights():
    logp, old, adv, mask = _inputs()
    for name in ("clip_cov", "kl_cov"):
        with pytest.raises(NotImplementedError, match=name):
            getattr(VA, f"compute_policy_loss_{name}")(old, logp, adv, mask.float(), "token-mean", _cfg(),
                                                       torch.ones(mask.shape))


# ---- rollout correction by hand --------------------------------------------------------------------


def test_rollout_weights_and_masks_by_hand():
    """Two rows; lw = old - rollout chosen so the weights are known numbers."""
    lw = torch.tensor([[math.log(3.0), math.log(0.5), 0.0, math.log(1.2)],
                       [math.log(1.5), math.log(1.5), math.log(0.9), 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    old = torch.full((2, 4), -1.0)
    rollout = old - lw
    logp = torch.full((2, 4), -0.5)
    adv = torch.tensor([[1.0, -2.0, 0.5, 1.0], [2.0, 1.0, -1.0, 7.0]])
    common = dict(loss_type="reinforce", agg="token-mean", rollout_logprobs=rollout)

    # token TIS at C = 2: weights (2, 0.5, 1, 1.2 | 1.5, 1.5, 0.9); loss = -sum w A logp / 7
    loss, st, g = _run("reinforce", logp, old, adv, mask, agg="token-mean", rollout_logprobs=rollout,
                       rollout_is="token", rollout_is_threshold=2.0)
    w = torch.tensor([[2.0, 0.5, 1.0, 1.2], [1.5, 1.5, 0.9, 0.0]])
    expect = float((-(w * adv * -0.5)).sum() / 7)
    assert math.isclose(loss.item(), expect, rel_tol=1e-6)
    assert_within(g, torch.where(mask, -w * adv / 7, 0.0), 1e-6 * (w * adv).abs().max(), "TIS gradient")
    assert math.isclose(st["rollout_is_truncated_frac"].item(), 1 / 7, rel_tol=1e-6)  # only the 3
    assert math.isclose(st["rollout_is_weight_mean"].item(), float(w.sum() / 7), rel_tol=1e-6)
    lwv = lw[mask]
    assert math.isclose(st["rollout_kl_k1"].item(), float(-lwv.mean()), rel_tol=1e-5)
    assert math.isclose(st["rollout_kl_k3"].item(), float((lwv.exp() - lwv - 1).mean()), rel_tol=1e-5)

    # sequence TIS at C = 2 with floor 0.5: row products 3*0.5*1*1.2 = 1.8, 1.5*1.5*0.9 = 2.025 -> 2
    loss, st, _ = _run("reinforce", logp, old, adv, mask, agg="token-mean", rollout_logprobs=rollout,
                       rollout_is="sequence", rollout_is_threshold=2.0, rollout_is_threshold_lower=0.5)
    ws = torch.tensor([[1.8] * 4, [2.0] * 4])
    assert math.isclose(loss.item(), float((-(ws * adv * -0.5) * mask).sum() / 7), rel_tol=1e-5)
    assert math.isclose(st["rollout_is_truncated_frac"].item(), 3 / 7, rel_tol=1e-6)

    # token MIS in [1/1.6, 1.6]: drops the 3 and the 0.5; they leave the count (5 left)
    loss, st, _ = _run("reinforce", logp, old, adv, mask, agg="token-mean", rollout_logprobs=rollout,
                       rollout_rs="token", rollout_rs_threshold=1.6)
    keep = mask.clone()
    keep[0, 0] = keep[0, 1] = False
    assert math.isclose(loss.item(), float((-(adv * -0.5) * keep).sum() / 5), rel_tol=1e-6)
    assert math.isclose(st["rollout_rs_masked_frac"].item(), 2 / 7, rel_tol=1e-6)

    # sequence MIS (product) in [0.5, 1.9]: row 1 (2.025) dropped; geometric mean in [1/1.3, 1.3]:
    # row 0 (1.8^(1/4) = 1.158) and row 1 (2.025^(1/3) = 1.265) both kept
    loss, st, _ = _run("reinforce", logp, old, adv, mask, agg="token-mean", rollout_logprobs=rollout,
                       rollout_rs="sequence", rollout_rs_threshold=1.9, rollout_rs_threshold_lower=0.5)
    assert math.isclose(loss.item(), float((-(adv[0] * -0.5)).sum() / 4), rel_tol=1e-6)
    assert math.isclose(st["rollout_rs_masked_frac"].item(), 3 / 7, rel_tol=1e-6)
    _, st, _ = _run("reinforce", logp, old, adv, mask, agg="token-mean", rollout_logprobs=rollout,
                    rollout_rs="geometric", rollout_rs_threshold=1.3)
    assert st["rollout_rs_masked_frac"].item() == 0.0
    del common


def test_rollout_correction_matches_verl_helper():
    """verl's compute_rollout_correction_weights (token / sequence, threshold 2) and its
    rejection mask with token_k1 / seq_sum_k1 / seq_mean_k1 at symmetric bounds [1/C, C]
    (rollout_corr_helper.py) against rollout_correction's weight and keep."""
    shape = (6, 11)
    _, old, _, mask = _inputs(shape)
    rollout = old + torch.randn(shape) * 0.4
    m = mask.float()
    log_ratio = old - rollout
    for level in ("token", "sequence"):
        if level == "token":
            w = torch.exp(torch.clamp(log_ratio, -20, 20))
        else:
            w = torch.exp(torch.clamp((log_ratio * m).sum(-1, keepdim=True), -20, 20)).expand_as(log_ratio)
        verl_w = (w * m).clamp(max=2.0)
        ours, _, _ = R.rollout_correction(old, rollout, mask, rollout_is=level, rollout_is_threshold=2.0)
        assert_within(torch.where(mask, ours, 0.0), verl_w, 4 * U * verl_w + 1e-30, f"TIS {level}")
    for option, level in (("token_k1", "token"), ("seq_sum_k1", "sequence"), ("seq_mean_k1", "geometric")):
        c = 1.5
        lo, hi = math.log(1 / c), math.log(c)
        lr = torch.clamp(log_ratio, -20, 20)
        k1 = -lr
        if option == "token_k1":
            stat = k1
        elif option == "seq_sum_k1":
            stat = (k1 * m).sum(-1, keepdim=True).expand_as(k1)
        else:
            stat = ((k1 * m).sum(-1) / (m.sum(-1) + 1e-8)).unsqueeze(-1).expand_as(k1)
        verl_keep = ((stat >= lo) & (stat <= hi)) & mask
        _, keep, _ = R.rollout_correction(old, rollout, mask, rollout_rs=level, rollout_rs_threshold=c)
        assert torch.equal(keep, verl_keep), option


# ---- properties of every type ----------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", BUILTIN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_tokens_never_leak_and_empty_batch(loss_type, dtype):
    logp, old, adv, mask = _inputs(dtype=dtype)
    nan = torch.tensor(float("nan"), dtype=dtype)
    loss, stats, g = _run(loss_type, logp, old, adv, mask)
    loss2, stats2, g2 = _run(loss_type, torch.where(mask, logp, nan), torch.where(mask, old, nan),
                             torch.where(mask, adv, nan), mask)
    assert torch.isfinite(loss2) and torch.equal(loss, loss2)
    assert torch.equal(g, g2) and not g[~mask].any()
    assert g.dtype == dtype
    for k, v in stats.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad
        assert torch.equal(v, stats2[k]), k
    none = torch.zeros_like(mask)
    loss, stats, g = _run(loss_type, logp, old, adv, none)
    assert loss.item() == 0.0 and not g.any() and all(v.item() == 0.0 for v in stats.values())


@pytest.mark.parametrize("loss_type", BUILTIN)
def test_stats_keys_per_type(loss_type):
    logp, old, adv, mask = _inputs()
    _, stats, _ = _run(loss_type, logp, old, adv, mask)
    keys = {"approx_kl"}
    if loss_type not in ("gpg", "reinforce"):
        keys |= {"ratio_mean", "ratio_max"}
    if loss_type in ("ppo", "gspo", "gspo_token", "cispo", "geo_mean", "clip_cov"):
        keys |= {"clipfrac", "clipfrac_low", "clipfrac_high"}
    if loss_type == "ppo":
        keys.add("clipfrac_lower")
    if loss_type in ("clip_cov", "kl_cov"):
        keys.add("covfrac")
    assert set(stats) == keys
    if "clipfrac" in stats and loss_type != "geo_mean":
        assert math.isclose(stats["clipfrac"].item(), (stats["clipfrac_low"] + stats["clipfrac_high"]).item(),
                            abs_tol=1e-6)
    d = torch.where(mask, old.double() - logp.double(), 0.0)
    assert math.isclose(stats["approx_kl"].item(), float(d.sum() / mask.sum()), rel_tol=1e-5, abs_tol=1e-7)
    _, stats, _ = _run(loss_type, logp, old, adv, mask, rollout_logprobs=old)
    assert {"rollout_kl_k1", "rollout_kl_k3", "rollout_is_weight_mean", "rollout_is_truncated_frac",
            "rollout_rs_masked_frac"} <= set(stats)
    assert stats["rollout_kl_k1"].item() == 0.0 and stats["rollout_is_weight_mean"].item() == 1.0


def test_ppo_ratio_stats_and_asymmetric_clip_fractions():
    logp, old, adv, mask = _inputs((8, 30), spread=0.4)
    _, st, _ = _run("ppo", logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    r = torch.exp(logp.double() - old.double())
    n = mask.sum()
    low = ((r < 0.8) & (adv < 0) & mask).sum() / n
    high = ((r > 1.28) & (adv > 0) & mask).sum() / n
    assert math.isclose(st["clipfrac_low"].item(), float(low), abs_tol=1e-6) and low > 0
    assert math.isclose(st["clipfrac_high"].item(), float(high), abs_tol=1e-6) and high > 0
    assert math.isclose(st["ratio_mean"].item(), float(r[mask].mean()), rel_tol=1e-5)
    assert math.isclose(st["ratio_max"].item(), float(r[mask].max()), rel_tol=1e-5)


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors():
    logp, old, adv, mask = _inputs()
    call = fastalign.policy_loss
    with pytest.raises(ValueError, match="unknown loss_type 'nope'"):
        call(logp, old, adv, mask, loss_type="nope")
    with pytest.raises(TypeError, match=r"loss_type='sapo' takes no parameter 'clip_low'.*tau_neg"):
        call(logp, old, adv, mask, loss_type="sapo", clip_low=0.2)
    with pytest.raises(TypeError, match=r"loss_type='gpg' takes no parameter 'foo'"):
        call(logp, old, adv, mask, loss_type="gpg", foo=1.0)
    for loss_type, kw, name in [("ppo", dict(clip_low=1.5), "clip_low"), ("ppo", dict(dual_clip=0.5), "dual_clip"),
                                ("ppo", dict(clip_high=-0.1), "clip_high"), ("sapo", dict(tau_pos=0.0), "tau_pos"),
                                ("gspo", dict(clip_low=float("nan")), "clip_low"),
                                ("cispo", dict(clip_high=-2.0), "clip_high"),
                                ("clip_cov", dict(clip_cov_lb=2.0, clip_cov_ub=1.0), "clip_cov_ub"),
                                ("kl_cov", dict(kl_cov_ratio=0.0), "kl_cov_ratio"),
                                ("ppo", dict(clip_low="0.2"), "clip_low")]:
        with pytest.raises(ValueError, match=f"loss_type={loss_type!r}: {name}"):
            call(logp, old, adv, mask, loss_type=loss_type, **kw)
    with pytest.raises(ValueError, match="old_logprobs must have the shape"):
        call(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="logprobs must be 2-D"):
        call(logp[0], old[0], adv[0], mask[0])
    with pytest.raises(TypeError, match="advantages must be float32"):
        call(logp, old, adv.long(), mask)
    with pytest.raises(TypeError, match="logprobs must be a tensor"):
        call(logp.tolist(), old, adv, mask)
    with pytest.raises(ValueError, match="agg must be one of"):
        call(logp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="rollout_is must be None or one of"):
        call(logp, old, adv, mask, rollout_logprobs=old, rollout_is="tok")
    with pytest.raises(ValueError, match="rollout_rs must be None or one of"):
        call(logp, old, adv, mask, rollout_logprobs=old, rollout_rs="seq_sum_k1", rollout_rs_threshold=2.0)
    with pytest.raises(ValueError, match="need rollout_logprobs"):
        call(logp, old, adv, mask, rollout_is="token")
    with pytest.raises(ValueError, match="needs rollout_rs_threshold"):
        call(logp, old, adv, mask, rollout_logprobs=old, rollout_rs="token")
    with pytest.raises(ValueError, match="rollout_is_threshold must be a finite number > 0"):
        call(logp, old, adv, mask, rollout_logprobs=old, rollout_is="token", rollout_is_threshold=0.0)
    with pytest.raises(ValueError, match="rollout_rs_threshold_lower must be < rollout_rs_threshold"):
        call(logp, old, adv, mask, rollout_logprobs=old, rollout_rs="token", rollout_rs_threshold=2.0,
             rollout_rs_threshold_lower=3.0)
    with pytest.raises(ValueError, match="rollout_logprobs must have the shape"):
        call(logp, old, adv, mask, rollout_logprobs=old[:2], rollout_is="token")
    with pytest.raises(ValueError, match="backend must be one of"):
        call(logp, old, adv, mask, loss_type="sapo", backend="gpu")


# ---- torch.compile, registry -------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", [t for t in BUILTIN if PT.POLICY_LOSS_TYPES[t].compilable])
def test_torch_compile_fullgraph_torch_backend(loss_type):
    def step(logp, old, adv, mask, rollout):
        loss, stats = fastalign.policy_loss(logp, old, adv, mask, loss_type=loss_type, agg="seq-mean-token-mean",
                                            rollout_logprobs=rollout, rollout_is="token", rollout_rs="sequence",
                                            rollout_rs_threshold=5.0, backend="torch")
        return loss, stats["approx_kl"]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    shape = (4, 9)
    logp, old, adv, mask = _inputs(shape)
    rollout = old + 0.1 * torch.randn(shape)
    a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss, kl = compiled(a, old, adv, mask, rollout)
    loss.backward()
    ref, ref_kl = step(b, old, adv, mask, rollout)
    ref.backward()
    f = 2 * _factor(shape)
    assert_within(loss, ref, f * (ref.abs() + 1), "compiled loss")
    assert_within(kl, ref_kl, f * (ref_kl.abs() + 1), "compiled approx_kl")
    assert_within(a.grad, b.grad, f * b.grad.abs().max(), "compiled gradient")


def test_register_user_loss():
    def capped_reinforce(logp, old, adv, mask, cap=1.0):
        return -torch.clamp(adv, -cap, cap) * logp, {"capped": adv.abs() > cap}

    def check(p):
        PT.number("capped_reinforce", "cap", p["cap"], low=0)

    name = "test_capped_reinforce"
    fastalign.register_policy_loss(name, capped_reinforce, params={"cap": 1.0}, check=check)
    try:
        logp, old, adv, mask = _inputs()
        loss, stats, g = _run(name, logp, old, adv, mask, cap=0.5)
        expect = torch.where(mask, -adv.clamp(-0.5, 0.5) * logp, 0.0).sum() / mask.sum()
        assert math.isclose(loss.item(), expect.item(), rel_tol=1e-5)
        assert_within(g, torch.where(mask, -adv.clamp(-0.5, 0.5) / mask.sum(), 0.0), 1e-7, "user gradient")
        assert math.isclose(stats["capped"].item(), float(((adv.abs() > 0.5) & mask).sum() / mask.sum()), rel_tol=1e-6)
        with pytest.raises(ValueError, match="cap must be a number"):
            fastalign.policy_loss(logp, old, adv, mask, loss_type=name, cap=-1.0)
        with pytest.raises(TypeError, match=f"loss_type={name!r} takes no parameter 'clip_low'.*cap"):
            fastalign.policy_loss(logp, old, adv, mask, loss_type=name, clip_low=0.2)
        with pytest.raises(ValueError, match="exists; pass overwrite=True"):
            fastalign.register_policy_loss(name, capped_reinforce, params={"cap": 1.0})
        fastalign.register_policy_loss(name, capped_reinforce, params={"cap": 2.0}, overwrite=True)
        with pytest.raises(ValueError, match="built-in loss_type 'ppo' cannot be replaced"):
            fastalign.register_policy_loss("ppo", capped_reinforce, overwrite=True)
        with pytest.raises(TypeError, match="formula must be callable"):
            fastalign.register_policy_loss("x", 3)
        with pytest.raises(TypeError, match="must be a float, str or None"):
            fastalign.register_policy_loss("x", capped_reinforce, params={"cap": [1]})
    finally:
        PT.POLICY_LOSS_TYPES.pop(name, None)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])
@pytest.mark.parametrize("loss_type", ["ppo", "gspo_token", "cispo", "sapo", "gspo", "geo_mean"])
def test_torch_compile_fullgraph_fused(backend, device, loss_type):
    """The fused paths (ppo and gspo_token on the ppo kernels, the others on the pg kernel; geo_mean
    with token TIS on its formula), with TIS folded into the advantages."""
    params = {"ppo": dict(clip_high=0.28), "gspo_token": dict(clip_low=0.05), "gspo": dict(clip_low=0.05)}.get(
        loss_type, {})

    def step(logp, old, adv, mask, rollout):
        loss, stats = fastalign.policy_loss(logp, old, adv, mask, loss_type=loss_type, rollout_logprobs=rollout,
                                            rollout_is="token", backend=backend, **params)
        return loss, stats["ratio_mean"] + stats["approx_kl"]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    shape = (4, 9)
    logp, old, adv, mask = (t.to(device) for t in _inputs(shape))
    rollout = old + 0.1 * torch.randn(shape, device=device)
    a, b = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss, s = compiled(a, old, adv, mask, rollout)
    loss.backward()
    ref, ref_s = step(b, old, adv, mask, rollout)
    ref.backward()
    f = 2 * _factor(shape)
    assert_within(loss, ref, f * (ref.abs() + 1), "compiled loss")
    assert_within(s, ref_s, f * (ref_s.abs() + 1), "compiled stats")
    assert_within(a.grad, b.grad, f * b.grad.abs().max(), "compiled gradient")


# ---- the fused pg kernel: reinforce / gpg, cispo, sapo, gspo, geo_mean (fastalign/ops/policy_loss_fused.py) ----

from fastalign.ops import policy_loss_fused as PF  # noqa: E402

FUSED = [p for p in BACKENDS if p.values[0] != "torch"]
PG_CASES = [("reinforce", {}), ("gpg", {}), ("cispo", {}), ("cispo", dict(clip_low=0.2, clip_high=0.28)),
            ("sapo", {}), ("sapo", dict(tau_pos=2.0, tau_neg=0.5)), ("gspo", dict(clip_low=0.05, clip_high=0.08)),
            ("geo_mean", {}), ("geo_mean", dict(clip_low=0.1, clip_high=0.15))]
PG_CORRECTIONS = [{}, dict(rollout_is="sequence", rollout_rs="token", rollout_rs_threshold=1.4),
                  dict(rollout_is="token", rollout_is_threshold=1.5)]


def _pg_size(loss_type, logp, old, adv, keep, w, full):
    """An upper bound, per token, of the magnitudes the fp32 evaluation of the loss goes through:
    |w A| (|logp| r + 4 / tau) for the token types (r <= 5 here), |w A| max(s, 1 + clip_high) for
    gspo (s the row's ratio), R_b mean_t |w A| for geo_mean (its Abar may cancel: the error is of
    the terms, not of the mean)."""
    a64 = torch.where(keep, adv.double(), 0.0).abs() * w.double()
    ratio = torch.exp((logp.double() - old.double()).clamp(-20, 20))
    n = keep.sum(-1, keepdim=True).clamp(min=1)
    d = torch.where(keep, logp.double() - old.double(), 0.0)
    s = torch.exp((d.sum(-1, keepdim=True) / n).clamp(max=10))
    if loss_type == "gspo":
        return a64 * torch.maximum(s, torch.tensor(1.0 + full["clip_high"], dtype=torch.float64))
    if loss_type == "geo_mean":
        r = torch.exp(d.abs().sum(-1, keepdim=True) / n)  # >= R_b
        return (r * a64.sum(-1, keepdim=True) / n).expand_as(a64)
    return a64 * (logp.double().abs() * ratio.clamp(max=5.0) + 4.0 / 0.5)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("loss_type,params", PG_CASES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("correction", PG_CORRECTIONS)
def test_fused_pg_kernel_matches_reference(backend, device, loss_type, params, agg, dtype, correction):
    """The fused pg kernel of every backend against the eager reference, loss, gradient and every
    statistic (the kernel's own pass): two fp32 evaluations, each within the module's bound of
    _pg_size; sapo's sigmoid clamps z to [-20, 20] (< 2.1e-9 off, times 4/tau |A| per token).
    geo_mean with token TIS runs its torch formula (the weight does not fold into A): the same
    comparison holds trivially there. Under Triton's interpreter two aggregations only (the
    kernel's math does not depend on agg; its finalize is shared with ppo's, tested on all four)."""
    if not PF.available(backend):
        pytest.skip(f"the loaded kernels of {backend} have no pg_policy_loss")
    if backend == "triton" and device == "cpu" and agg not in ("token-mean", "seq-mean-token-mean"):
        pytest.skip("the interpreter is slow: two aggregations suffice (see the docstring)")
    shape = (6, 37)  # rows longer than 16 lanes, with a tail
    logp, old, adv, mask = _inputs(shape, dtype, spread=0.5)
    rollout = (old.float() + torch.randn(shape) * 0.2).to(dtype)
    rk = dict(rollout_logprobs=rollout.to(device), **correction) if correction else {}
    dev = [t.to(device) for t in (logp, old, adv, mask)]
    loss, stats, g = _run(loss_type, *dev, agg=agg, backend=backend, **rk, **params)
    entry = PT.POLICY_LOSS_TYPES[loss_type]
    full = {**entry.params, **params}
    x = logp.clone().requires_grad_()
    corr = {**fastalign.ops.policy_loss.CORRECTION_DEFAULTS, **correction}
    ref, rstats = R.policy_loss(entry.formula, x, old, adv, mask, full, agg,
                                rollout_logprobs=rollout if correction else None, correction=corr)
    (rg,) = torch.autograd.grad(ref, x)
    weight, keep = None, mask
    if correction:
        weight, keep, _ = R.rollout_correction(torch.where(mask, old.float(), 0.0),
                                               torch.where(mask, rollout.float(), 0.0), mask, **correction)
    w = torch.ones(shape) if weight is None else weight
    size = R.ppo_agg(_pg_size(loss_type, logp, old, adv, keep, w, full), keep, agg)
    f = 2 * _factor(shape)
    a64 = torch.where(keep, adv.double(), 0.0).abs() * w.double()
    loss, g = loss.cpu(), g.cpu()
    assert_within(loss, ref, f * size + 1e-8 * R.ppo_agg(a64 * 8.0, keep, agg), f"{loss_type} loss")
    ratio = torch.exp((logp.double() - old.double()).clamp(-20, 20))
    if loss_type == "cispo":
        lo = 0.0 if full["clip_low"] is None else 1 - full["clip_low"]
        near = ((ratio - lo).abs() <= 1e-5) | ((ratio - 1 - full["clip_high"]).abs() <= 1e-5 * (1 + full["clip_high"]))
    else:
        near = _near_bounds(loss_type, logp, old, adv, keep, full)
    gb = f * rg.abs().max() + 1e-8 * rg.abs().max() + (unit_roundoff(dtype) * 2 * rg.abs() if dtype != torch.float32 else 0)
    assert_within(g, rg, torch.where(near, torch.inf, gb), f"{loss_type} gradient")
    assert set(stats) == set(rstats)
    for k in stats:
        # the same decisions on the same fp32 values (ratio within its exp error of a clip bound
        # excluded above), sums in another order: a few roundings of the mean
        assert_within(stats[k].cpu(), rstats[k], f * (rstats[k].abs() + 1e-6) + (1e-6 if k == "approx_kl" else 0), k)


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_pg_kernel_opcheck_and_dispatch(backend, device):
    if not PF.available(backend):
        pytest.skip(f"the loaded kernels of {backend} have no pg_policy_loss")
    shape = (3, 21)
    logp, old, adv, mask = (t.to(device) for t in _inputs(shape))
    fwd, bwd = PF.PG_POLICY_LOSS.kernels(backend)
    x = logp.clone().requires_grad_()
    for kind, a, b in ((0, 0.0, 0.0), (1, 0.0, 5.0), (2, 1.0, 1.05), (3, 0.95, 1.08), (4, 0.4, 0.4)):
        torch.library.opcheck(fwd, (x, old, adv, mask, kind, a, b, 0, -1.0, 0.0))
        torch.library.opcheck(bwd, (torch.randn(8, device=device), x.detach(), old, adv, mask,
                                    torch.rand(shape[0], device=device), kind, a, b))
    with pytest.raises((RuntimeError, ValueError), match="kind must be"):
        fwd(logp, old, adv, mask, 7, 0.0, 0.0, 0, -1.0, 0.0)
    if backend != "triton":  # the C++ ops check the parameters; the Triton launchers trust policy_loss
        with pytest.raises(RuntimeError, match="sapo needs"):
            fwd(logp, old, adv, mask, 2, 0.0, 1.0, 0, -1.0, 0.0)
        with pytest.raises(RuntimeError, match="geo_mean needs"):
            fwd(logp, old, adv, mask, 4, -0.1, 1.0, 0, -1.0, 0.0)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_fused_pg_kernel_narrower_isa_paths(capability):
    """The pg kernel's row driver as 8-lane AVX2 and 4-lane baseline clones (the tests above run
    the widest the CPU has): test_fused_pg_kernel_matches_reference in a fresh process under
    FASTALIGN_CPU_CAPABILITY, every type, two aggregations, both dtypes, with and without the
    rollout correction."""
    if not PF.available("cpp"):
        pytest.skip("the loaded fastalign._C has no pg_policy_loss kernel")
    code = """
import torch
from tests.test_policy_losses import AGGS, DTYPES, PG_CASES, PG_CORRECTIONS, test_fused_pg_kernel_matches_reference
for loss_type, params in PG_CASES:
    for agg in (AGGS[0], AGGS[2]):
        for dtype in DTYPES:
            for correction in PG_CORRECTIONS[:2]:
                torch.manual_seed(0)
                test_fused_pg_kernel_matches_reference("cpp", "cpu", loss_type, params, agg, dtype, correction)
print("ok")
"""
    env = dict(os.environ, FASTALIGN_CPU_CAPABILITY=capability)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=root)
    if out.returncode != 0 and "this CPU lacks" in out.stderr:
        pytest.skip(f"this CPU cannot run the {capability} kernels")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_fused_pg_dispatch_and_fallbacks():
    """Which calls run the fused pg kernel: the built-in per-token and sequence types on a fused
    backend; geo_mean with token TIS and gspo / geo_mean with clip_high None run the formula."""
    corr = dict(fastalign.ops.policy_loss.CORRECTION_DEFAULTS)
    fusable = fastalign.ops.policy_loss._pg_fusable
    if not PF.available("cpp"):
        pytest.skip("the loaded fastalign._C has no pg_policy_loss kernel")
    for t in ("reinforce", "gpg", "cispo", "sapo", "gspo", "geo_mean"):
        e = PT.POLICY_LOSS_TYPES[t]
        assert fusable("cpp", t, e, dict(e.params), corr), t
        assert not fusable("torch", t, e, dict(e.params), corr), t
    e = PT.POLICY_LOSS_TYPES["geo_mean"]
    assert not fusable("cpp", "geo_mean", e, dict(e.params), {**corr, "rollout_is": "token"})
    assert fusable("cpp", "geo_mean", e, dict(e.params), {**corr, "rollout_is": "sequence"})
    assert not fusable("cpp", "geo_mean", e, {**e.params, "clip_high": None}, corr)
    for t in ("ppo", "gspo_token", "clip_cov", "kl_cov"):
        e = PT.POLICY_LOSS_TYPES[t]
        assert not fusable("cpp", t, e, dict(e.params), corr), t


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("correction", [{}, dict(rollout_is="token", rollout_rs="token", rollout_rs_threshold=1.4)])
def test_gspo_token_on_the_ppo_kernels_matches_reference(backend, device, agg, dtype, correction):
    """gspo_token through the ppo kernels (ratio exp(x - o) with o = sg(x) - log s) against its
    eager formula: two evaluations, each within the module's bound, plus the rounding of x - o
    (u (|x| + |log s|) in the log of the ratio). A row whose mean log-ratio exceeds 10 (row 0)
    gets no gradient on both."""
    shape = (6, 37)
    logp, old, adv, mask = _inputs(shape, dtype)
    old[0] = (logp[0].float() - 11.0).to(dtype)  # s = exp(min(11, 10)): clamped, no gradient
    rollout = (old.float() + torch.randn(shape) * 0.2).to(dtype)
    params = dict(clip_low=0.05, clip_high=0.08)
    rk = dict(rollout_logprobs=rollout.to(device), **correction) if correction else {}
    dev = [t.to(device) for t in (logp, old, adv, mask)]
    loss, stats, g = _run("gspo_token", *dev, agg=agg, backend=backend, **rk, **params)
    x = logp.clone().requires_grad_()
    corr = {**fastalign.ops.policy_loss.CORRECTION_DEFAULTS, **correction}
    ref, rstats = R.policy_loss(R.gspo_token, x, old, adv, mask, params, agg,
                                rollout_logprobs=rollout if correction else None, correction=corr)
    (rg,) = torch.autograd.grad(ref, x)
    assert not g[0].any() and not rg[0].any()
    keep = mask
    if correction:
        keep = R.rollout_correction(torch.where(mask, old.float(), 0.0), torch.where(mask, rollout.float(), 0.0), mask,
                                    **correction)[1]
    d = torch.where(keep, logp.double() - old.double(), 0.0)
    log_s = (d.sum(-1) / keep.sum(-1).clamp(min=1)).clamp(max=10).unsqueeze(-1)
    s = torch.exp(log_s)
    w = 2.0 if correction else 1.0  # the token TIS weight is at most its threshold, 2
    tok = w * torch.where(keep, adv.double(), 0.0).abs() * s
    extra = U * (logp.double().abs() + log_s.abs())  # the rounding of x - o, relative in the ratio
    f = 2 * _factor(shape)
    assert_within(loss.cpu(), ref, R.ppo_agg(tok * (f + 2 * extra), keep, agg), "loss")
    near = _near_bounds("gspo_token", logp, old, adv, keep, params)
    gb = (f + 2 * extra.max()) * rg.abs().max() + (unit_roundoff(dtype) * 2 * rg.abs() if dtype != torch.float32 else 0)
    assert_within(g.cpu(), rg, torch.where(near, torch.inf, gb), "gradient")
    assert set(stats) == set(rstats)
    for k in stats:
        assert_within(stats[k].cpu(), rstats[k], f * (rstats[k].abs() + 1e-6) + 1e-6, k)
