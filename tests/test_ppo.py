"""ppo_policy_loss and ppo_value_loss on every backend against kernels/reference.py, forward and
backward, plus the published formula on hand-computed cases, ties, edge cases and bad input.

Error bounds (tests/numerics.py's model), derived per token in float64 from each test's inputs by
_policy_bounds / _value_bounds, for ONE fp32 evaluation against exact arithmetic on the same fp32
inputs; comparing two evaluations (a backend against the reference) adds two such bounds:
  * per token: d = logp - old is one IEEE subtraction of the same fp32 operands on every backend
    (so it is shared, and so is the decision of the clamp to [-20, 20]); r = exp(d) is within
    EXP_ULPS ulps (the cpp/cuda/triton kernels and torch use different exps) and u |d| r (the fast
    GPU exps round d log2(e) first); each product with A
    one rounding. max/min/clamp are 1-Lipschitz, so the token loss errs by at most the larger of
    its branches' errors. Value loss: v - R one rounding, the clip bounds v_old -+ c one, the
    square one (a relative (1 + u)^3);
  * aggregation: loss = sum_b w_b sum_t l_bt with the exact row weights w_b (1/N, 1/S, 1/(S n_b),
    1/(S H)); any order of the sums and divisions is within gamma(k) sum_b w_b sum_t |l_bt|, k the
    most roundings on a term's path (N + 3 for token-mean's flat sum over N valid tokens, else
    max n_b + B + 3 over B rows: additions plus <= 3 divisions), plus the token errors weighted
    by w_b;
  * clip decisions: where a token's exact ratio lies within its exp error of a clip bound (or the
    token loss within its error of the dual-clip cap, or v within a rounding of v_old -+ c, or the
    two value terms within their errors), two implementations may decide differently: each such
    token may move a clip fraction by 1/N and its gradient by its whole size; elsewhere the
    decisions (and the tie splits) are the same and clip fractions are exact up to one division;
  * gradients: g w_b (-A) r per token through <= 6 roundings (g / count, / n_b, / H, * A, the
    branches' sum, * r) plus the exp error; bf16/fp16 gradients are rounded once more at the
    store, u_dtype |gradient| on each side;
  * the hand-computed cases add the representation error of their inputs (logp = fp32(log 1.5)
    is not log 1.5): |A| |r - ratio| per token; dyadic hand cases (the value loss) are exact, as are
    the mask-dtype, bf16-store, determinism and zero-token comparisons (the same code on the same
    inputs, or exact zeros).
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import fastalign
from fastalign.kernels import reference
from fastalign.ops import ppo as P
from tests.conftest import backend_params
from tests.numerics import assert_within, fn_error, gamma, unit_roundoff

BACKENDS = backend_params()

AGGS = list(P.AGG_MODES)
DTYPES = [torch.float32, torch.bfloat16]
POLICY_CLIPS = [  # (clip_low, clip_high, dual_clip)
    (0.2, None, None),
    (0.2, 0.28, None),  # asymmetric (DAPO clip-higher)
    (0.1, 0.3, 3.0),  # asymmetric + dual clip
    (0.2, None, 1.5),
]
U = unit_roundoff(torch.float32)
GRAD_ROUNDINGS = 6  # g / count, / n_b, / H, * A, the two branches' sum, * r (the 0.5 tie shares are exact)


# ---- derived error bounds ---------------------------------------------------------------------


def _f32(x):
    """A Python constant as every backend uses it: rounded to fp32."""
    return float(torch.tensor(x, dtype=torch.float32))


def _read(t, valid):
    """The fp32 values the implementations read, in fp64 (where() first: NaN/inf at masked
    tokens are never read)."""
    return torch.where(valid, t.detach().float().cpu(), 0.0).double()


def _agg_bound(loss_tok, err_tok, valid, agg, global_count, horizon, extra_adds=0):
    """(bound, w, size): one fp32 evaluation of ppo_agg on token losses within err_tok of loss_tok is
    within sum_b w_b sum_t err_bt + gamma(k) sum_b w_b sum_t |l_bt| of the exact sum_b w_b sum_t l_bt,
    k = the most roundings on a term's path, in any order and any blocking: <= N - 1 additions in
    token-mean's flat sum over all tokens (the reference sums the [B, T] tensor at once), else
    <= n_b - 1 in its row and <= B - 1 over rows; then <= 3 divisions (/ count, / n_b, / H) and
    extra_adds more. The counts are exact integers. w_b = d loss / d l_bt, exact (fp64); size =
    sum_b w_b sum_t (|l_bt| + err_bt) bounds |loss|."""
    n_b = valid.sum(-1).double()
    count = n_b.sum() if agg == "token-mean" else (n_b > 0).sum().double()
    if global_count is not None:
        count = torch.tensor(float(global_count), dtype=torch.float64)
    w = torch.where(n_b > 0, 1 / count.clamp(min=1e-300), 0.0) if count > 0 else torch.zeros_like(n_b)
    if agg == "seq-mean-token-mean":
        w = w / n_b.clamp(min=1)
    elif agg == "seq-mean-token-sum-norm":
        w = w / float(max(valid.shape[-1], 1) if horizon is None else horizon)
    if agg == "token-mean" or n_b.numel() == 0:
        adds = int(n_b.sum())
    else:
        adds = int(n_b.max()) + valid.shape[0]
    size = float((w[:, None] * (loss_tok.abs() + err_tok)).sum())
    bound = (w[:, None] * err_tok).sum() + gamma(adds + 3 + extra_adds) * size
    return float(bound), w, size


def _fraction_bound(n_ambiguous, frac, n):
    """A clip fraction: every ambiguous token may count on one side and not on the other (1/N
    each); the count itself is exact and the division rounds once."""
    return n_ambiguous / max(n, 1) + U * (frac + n_ambiguous / max(n, 1))


def _policy_bounds(x, y, z, mask, clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean",
                   global_count=None, horizon=None, extra_adds=0):
    """One fp32 evaluation of ppo_policy_loss against exact arithmetic on the same fp32 inputs:
    bounds on the loss, each stat, and per token the gradient for an upstream gradient of 1
    ("grad"), with "gmax" bounding the gradient's size (for a store in bf16/fp16).
      R = exp(clamp(d, -20, 20)) with the shared fp32 d; r^ within e_r of R: EXP_ULPS ulps, plus
      u |d| R for the exps that compute 2^(d log2 e) (Triton's and CUDA's fast exp: the product
      rounds, and its error becomes a relative error of ln 2 |d log2 e| u = |d| u).
      l1 = -A r, l2 = -A clamp(r, lo, hi), one rounding each: |A| (e_r + gamma(1) (R or clamp(R) + e_r)).
      l = max(l1, l2), and min(l, -A c) for A < 0 with dual clip (-A c one rounding): the larger
      of the branches' errors (max, min and clamp are 1-Lipschitz).
      Ambiguous clip decision: A != 0 and R within e_r + gamma(4) max(R, bound) of lo or hi (r^ may
      land on either side, or round l1 and l2 to a tie); ambiguous dual cap: A < 0 and l within its
      error plus -A c's rounding of -A c.
      Gradient g w_b (-A) r^ s (s the tie/clip share): |g w_b A| (e_r + gamma(6) (R + e_r)); at
      ambiguous tokens the whole 2 |g w_b A| (R + e_r) (1 + gamma(6)) more.
      approx_kl = mean of -d: gamma(N + 1) sum|d| / N."""
    valid = (mask != 0).cpu()
    d = torch.where(valid, x.detach().float().cpu() - y.detach().float().cpu(), 0.0).double()  # shared
    a = _read(z, valid)
    lo, hi = _f32(1.0 - clip_low), _f32(1.0 + (clip_low if clip_high is None else clip_high))
    r = d.clamp(-20, 20).exp()
    e_r = fn_error(r) + gamma(1) * d.clamp(-20, 20).abs() * r
    l1, l2 = -a * r, -a * r.clamp(lo, hi)
    err = a.abs() * (e_r + gamma(1) * (torch.maximum(r, r.clamp(lo, hi)) + e_r))
    loss = torch.maximum(l1, l2)
    near = lambda bound: (r - bound).abs() <= e_r + gamma(4) * r.clamp(min=bound)  # noqa: E731
    ambiguous = valid & (a != 0) & (near(lo) | near(hi))
    n_clip, n_lower = int(ambiguous.sum()), 0
    if dual_clip is not None:
        l3 = -a * _f32(dual_clip)
        neg = valid & (a < 0)
        near_cap = neg & ((loss - l3).abs() <= err + gamma(1) * l3.abs())
        n_lower = int(near_cap.sum())
        ambiguous = ambiguous | near_cap
        loss = torch.where(neg, torch.minimum(loss, l3), loss)
        err = torch.where(neg, torch.maximum(err, gamma(1) * l3.abs()), err)
    loss, err = torch.where(valid, loss, 0.0), torch.where(valid, err, 0.0)
    e_loss, w, loss_size = _agg_bound(loss, err, valid, agg, global_count, horizon, extra_adds)
    n = int(valid.sum())
    size = w[:, None] * a.abs() * (r + e_r) * (1 + gamma(GRAD_ROUNDINGS))
    grad = w[:, None] * a.abs() * (e_r + gamma(GRAD_ROUNDINGS) * (r + e_r)) + torch.where(ambiguous, 2 * size, 0.0)
    clipped = (valid & (l2 > l1)).sum().item() / max(n, 1)
    return {
        "loss": e_loss,
        "loss_size": loss_size,
        "clipfrac": _fraction_bound(n_clip, clipped, n),
        "clipfrac_lower": _fraction_bound(n_lower, 1.0, n),
        "approx_kl": gamma(n + 1) * float(d.abs().sum()) / max(n, 1),
        "grad": torch.where(valid, grad, 0.0),
        "gmax": torch.where(valid, size, 0.0),
        "r": r,
        "a": a,
        "w": w,
    }


def _value_bounds(v, vo, ret, mask, clip=None, agg="token-mean", global_count=None, horizon=None, extra_adds=0):
    """One fp32 evaluation of ppo_value_loss against exact arithmetic on the same fp32 inputs
    (the keys of _policy_bounds).
      e1 = v - R, one rounding: e_e1 = u |E1|; s1 = e1^2: (|E1| + e_e1)^2 (1 + u) - E1^2.
      clip c: lo, hi = v_old -+ c, one rounding each (e_b = gamma(1) (|v_old| + c)), clamp 1-Lipschitz
      in its bounds too: e2 = clamp(v, lo, hi) - R within e_e2 = e_b + gamma(1) (|E2| + e_b); s2 like s1.
      Decisions: a token within e_b of lo or hi may be inside for one implementation and outside
      for the other; outside, s2 > s1 is ambiguous when |S2 - S1| <= e_s1 + e_s2. Strictly
      inside, clamp(v) = v on both, s2 == s1: a tie, split the same way.
      loss = 0.5 agg(max(s1, s2)); gradient 0.5 g w_b 2 (s1 share e1 + s2 share e2):
      |g w_b| (e_e1 + e_e2 + gamma(6) (|E1| + |E2|)), at ambiguous tokens 2 |g w_b| (|E1| + |E2| + ...) more.
      vpred_mean: gamma(N + 1) sum|v| / N; value_mse: (sum e_s1 + gamma(N + 1) sum S1) / N."""
    valid = (mask != 0).cpu()
    vv, rr = _read(v, valid), _read(ret, valid)
    e1 = vv - rr
    e_e1 = U * e1.abs()
    s1 = e1 * e1
    e_s1 = (e1.abs() + e_e1) ** 2 * (1 + U) - s1
    e2, e_e2 = torch.zeros_like(e1), torch.zeros_like(e1)
    loss, err, ambiguous, clipped = s1, e_s1, torch.zeros_like(valid), 0
    if clip is not None:
        c = _f32(clip)
        old = _read(vo, valid)
        e_b = gamma(1) * (old.abs() + c)
        lo, hi = old - c, old + c
        e2 = vv.clamp(lo, hi) - rr
        e_e2 = e_b + gamma(1) * (e2.abs() + e_b)
        s2 = e2 * e2
        e_s2 = (e2.abs() + e_e2) ** 2 * (1 + U) - s2
        near = ((vv - lo).abs() <= e_b) | ((vv - hi).abs() <= e_b)
        outside = ~near & ((vv < lo) | (vv > hi))
        ambiguous = valid & (near | (outside & ((s2 - s1).abs() <= e_s1 + e_s2)))
        loss, err = torch.maximum(s1, s2), torch.maximum(e_s1, e_s2)
        clipped = (valid & (s2 > s1)).sum().item()
    loss, err = torch.where(valid, loss, 0.0), torch.where(valid, err, 0.0)
    e_loss, w, loss_size = _agg_bound(loss, err, valid, agg, global_count, horizon, extra_adds)
    n = int(valid.sum())
    w = 0.5 * w  # the 0.5 of the loss rides on the row weights (exact)
    size = w[:, None] * 2 * (e1.abs() + e_e1 + e2.abs() + e_e2) * (1 + gamma(GRAD_ROUNDINGS))
    grad = w[:, None] * 2 * (e_e1 + e_e2 + gamma(GRAD_ROUNDINGS) * (e1.abs() + e2.abs())) + torch.where(
        ambiguous, 2 * size, 0.0)
    return {
        "loss": 0.5 * e_loss,
        "loss_size": 0.5 * loss_size,
        "vf_clipfrac": _fraction_bound(int(ambiguous.sum()), clipped / max(n, 1), n),
        "vpred_mean": gamma(n + 1) * float(vv.abs().sum()) / max(n, 1),
        "value_mse": float(e_s1.sum() + gamma(n + 1) * s1.sum()) / max(n, 1),
        "grad": torch.where(valid, grad, 0.0),
        "gmax": torch.where(valid, size, 0.0),
        "w": w,
    }


def _stored(size, dtype):
    """Each side rounds its fp32 gradient once to a narrower dtype: u_dtype |gradient| each."""
    return 0.0 if dtype == torch.float32 else 2 * unit_roundoff(dtype) * size


def _skip_interpreted(backend, device, dtype=torch.float32):
    if backend == "triton" and device == "cpu" and dtype != torch.float32:
        pytest.skip("Triton interpreter on the CPU: fp32 only")


def _inputs(shape, device, dtype, scale=1.0, seed_mask=True):
    """(x, y, z, mask) with holes in the middle of rows, one empty row when B > 2."""
    b, t = shape
    x = (torch.randn(b, t, device=device) * scale).to(dtype)
    y = (x.float() + torch.randn(b, t, device=device) * scale).to(dtype)
    z = torch.randn(b, t, device=device).to(dtype)
    mask = torch.rand(b, t, device=device) > 0.3
    if seed_mask and b > 2:
        mask[1] = False  # a row of length 0
        mask[0, t // 3 : t // 2] = False  # a hole inside a row
    return x, y, z, mask


def _compare(backend, op, ref_op, ref_args, bounds, x, *others, **kw):
    """op(x, *others, backend=backend, **kw) against ref_op(x, *others, *ref_args): loss, stats
    and the gradient of x for a random upstream gradient, each within twice the derived bound of
    one evaluation (`bounds`, from _policy_bounds / _value_bounds on the same inputs)."""
    a = x.detach().clone().requires_grad_()
    ar = x.detach().clone().requires_grad_()
    loss, stats = op(a, *others, backend=backend, **kw)
    ref, ref_stats = ref_op(ar, *others, *ref_args)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_within(loss, ref, 2 * bounds["loss"], "loss")
    for k in ref_stats:
        s = stats[k]
        assert s.dtype == torch.float32 and s.dim() == 0 and not s.requires_grad
        assert_within(s, ref_stats[k], 2 * bounds[k], k)
    g = torch.randn((), device=x.device)
    (loss * g).backward()
    (ref * g).backward()
    assert a.grad.dtype == x.dtype and a.grad.shape == x.shape
    grad_bound = abs(float(g)) * (2 * bounds["grad"] + _stored(bounds["gmax"], x.dtype))
    assert_within(a.grad, ar.grad, grad_bound, "gradient")
    return loss, stats, a.grad


def _compare_policy(backend, x, y, z, mask, **kw):
    clip_low = kw.get("clip_low", 0.2)
    ref_args = (clip_low, kw.get("clip_high") or clip_low, kw.get("dual_clip"), kw.get("agg", "token-mean"),
                kw.get("global_count"), kw.get("horizon"))
    bounds = _policy_bounds(x, y, z, mask, *ref_args)
    return _compare(backend, fastalign.ppo_policy_loss, reference.ppo_policy_loss, ref_args, bounds,
                    x, y, z, mask, **kw)


def _compare_value(backend, v, vo, r, mask, **kw):
    ref_args = (kw.get("clip"), kw.get("agg", "token-mean"), kw.get("global_count"), kw.get("horizon"))
    bounds = _value_bounds(v, vo, r, mask, *ref_args)
    return _compare(backend, fastalign.ppo_value_loss, reference.ppo_value_loss, ref_args, bounds,
                    v, vo, r, mask, **kw)


# ---- agreement with the reference -------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clips", POLICY_CLIPS, ids=lambda c: "-".join(map(str, c)))
def test_policy_matches_reference(backend, device, dtype, agg, clips):
    _skip_interpreted(backend, device, dtype)
    clip_low, clip_high, dual = clips
    for shape in [(5, 37), (3, 1), (1, 1), (2, 1100)]:
        x, y, z, mask = _inputs(shape, device, dtype, scale=0.3)
        _compare_policy(backend, x, y, z, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual, agg=agg)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_matches_reference(backend, device, dtype, agg, clip):
    _skip_interpreted(backend, device, dtype)
    for shape in [(5, 37), (3, 1), (1, 1), (2, 1100)]:
        v, vo, r, mask = _inputs(shape, device, dtype, scale=0.3)
        _compare_value(backend, v, vo, r, mask, clip=clip, agg=agg)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fp16_and_mixed_dtypes_and_numeric_masks(backend, device):
    dtype = torch.float32 if backend == "triton" and device == "cpu" else torch.float16
    x, y, z, mask = _inputs((4, 29), device, dtype, scale=0.3)
    _compare_policy(backend, x, y, z, mask, dual_clip=2.0)
    _compare_value(backend, x, y, z, mask, clip=0.1)
    # old_logprobs / advantages of another dtype than logprobs; float and int masks (nonzero = valid)
    for m in (mask.float(), mask.to(torch.int32) * 3):
        _compare_policy(backend, x, y.double().float(), z.to(torch.bfloat16), m, agg="seq-mean-token-mean")
        _compare_value(backend, x, y.float(), z.float(), m, clip=0.5, agg="seq-mean-token-sum")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("steps", [3, 8, 29])
def test_mask_dtypes_give_identical_results(backend, device, steps):
    # the cpp kernels read uint8/int32/int64/float masks as they are (other backends convert to
    # bool): each must select the same tokens as the bool mask, loss, stats and gradient bit for bit
    x, y, z, mask = _inputs((5, steps), device, torch.float32, scale=0.3)

    def run(m):
        a, v = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss, stats = fastalign.ppo_policy_loss(a, y, z, m, dual_clip=2.0, agg="seq-mean-token-mean", backend=backend)
        vloss, vstats = fastalign.ppo_value_loss(v, y, z, m, clip=0.2, backend=backend)
        (loss + vloss).backward()
        return [loss, vloss, *stats.values(), *vstats.values(), a.grad, v.grad]

    want = run(mask)
    for m in (mask.to(torch.uint8), mask.int() * 7, mask.long(), mask.float() * 0.5, mask.double()):
        for a, b in zip(run(m), want):
            assert torch.equal(a, b), m.dtype


@pytest.mark.parametrize("steps", [5, 37])
def test_cpp_bf16_gradients_are_the_fp32_ones_rounded(steps):
    # the bf16 kernels compute in fp32 on exactly upcast inputs and round once at the store (a
    # vectorised round-to-nearest-even): the bf16 gradient is the fp32 kernel's, rounded, bit for bit
    if fastalign.backends()["cpp"]["reason"]:
        pytest.skip(fastalign.backends()["cpp"]["reason"])
    x, y, z, mask = _inputs((6, steps), "cpu", torch.bfloat16, scale=0.3)
    x[2, 1] = float("nan")  # a NaN gradient lane
    mask[2, 1] = True
    grads = {}
    for dtype in (torch.bfloat16, torch.float32):
        a, v = x.to(dtype).clone().requires_grad_(), x.to(dtype).clone().requires_grad_()
        loss, _ = fastalign.ppo_policy_loss(a, y.to(dtype), z.to(dtype), mask, dual_clip=2.0, backend="cpp")
        vloss, _ = fastalign.ppo_value_loss(v, y.to(dtype), z.to(dtype), mask, clip=0.2, backend="cpp")
        (loss + vloss).backward()
        grads[dtype] = (a.grad, v.grad)
    for got, g32 in zip(grads[torch.bfloat16], grads[torch.float32]):
        want = g32.to(torch.bfloat16)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    assert grads[torch.bfloat16][1][2, 1].isnan()  # the value loss passes the NaN on


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs_and_inputs_untouched(backend, device):
    base = torch.randn(4, 9, 40, device=device)
    x, y, z = base[:, 0, 3:], base[:, 2, 3:], base[:, 5, 3:]
    mask = (torch.rand(40, 4, device=device) > 0.2).t()[:, 3:]
    assert not x.is_contiguous() and not mask.is_contiguous()
    before = base.clone()
    _compare_policy(backend, x, y, z, mask, clip_high=0.3, dual_clip=2.5)
    _compare_value(backend, x, y, z, mask, clip=0.2)
    assert torch.equal(base, before)


# ---- the published formula, by hand ----------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_policy_hand_computed(backend, device):
    # ratios 1.5, 0.5, 1, 2 with A = 1, -1, 2, -1; clip 0.2: per token
    #   max(-1.5, -1.2) = -1.2 (clipped), max(0.5, 0.8) = 0.8 (clipped), max(-2, -2) = -2,
    #   max(2, 1.2) = 2 (unclipped); dual clip c = 1.5 caps the last at 1.5 (lower clip).
    ratios = torch.tensor([[1.5, 0.5, 1.0, 2.0]])
    old = torch.zeros(1, 4, device=device)
    logp = ratios.log().to(device).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]], device=device)
    mask = torch.ones(1, 4, dtype=torch.bool, device=device)
    loss, stats = fastalign.ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, backend=backend)
    # each hand value is within one evaluation's bound plus the inputs' representation error:
    # r = exp(fp32(log 1.5)) is not 1.5, and the loss moves by at most w |A| |r - ratio| per token
    b = _policy_bounds(logp, old, adv, mask)
    inexact = b["w"][:, None] * b["a"].abs() * (b["r"] - ratios.double()).abs()
    assert_within(loss, (-1.2 + 0.8 - 2.0 + 2.0) / 4, b["loss"] + inexact.sum(), "hand loss")
    assert_within(stats["clipfrac"], 0.5, b["clipfrac"], "hand clipfrac")
    assert float(stats["clipfrac_lower"]) == 0.0
    assert_within(stats["approx_kl"], -logp.detach().double().mean(), b["approx_kl"], "hand approx_kl")
    loss.backward()
    # d/dlogp of -A * ratio = -A * ratio where unclipped; 0 where clipped; mean over 4 tokens
    assert_within(logp.grad, torch.tensor([[0.0, 0.0, -2.0 / 4, 2.0 / 4]]), b["grad"] + inexact, "hand gradient")

    logp.grad = None
    loss, stats = fastalign.ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, dual_clip=1.5, backend=backend)
    b = _policy_bounds(logp, old, adv, mask, dual_clip=1.5)
    assert_within(loss, (-1.2 + 0.8 - 2.0 + 1.5) / 4, b["loss"] + inexact.sum(), "hand loss, dual clip")
    assert_within(stats["clipfrac_lower"], 0.25, b["clipfrac_lower"], "hand clipfrac_lower")
    loss.backward()
    assert_within(logp.grad, torch.tensor([[0.0, 0.0, -2.0 / 4, 0.0]]), b["grad"] + inexact, "hand gradient, dual clip")

    # seq-mean-token-sum over two rows, one of them empty: the empty row does not count
    two = logp.detach().repeat(2, 1), old.repeat(2, 1), adv.repeat(2, 1)
    holey = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], device=device)
    loss, _ = fastalign.ppo_policy_loss(*two, holey, agg="seq-mean-token-sum", backend=backend)
    b = _policy_bounds(*two, holey, agg="seq-mean-token-sum")
    assert_within(loss, -1.2 + 0.8 - 2.0 + 2.0, b["loss"] + 4 * inexact.sum(), "hand seq-mean-token-sum")
    loss, _ = fastalign.ppo_policy_loss(
        logp.detach(), old, adv, mask, agg="seq-mean-token-sum-norm", horizon=8, backend=backend
    )
    b = _policy_bounds(logp, old, adv, mask, agg="seq-mean-token-sum-norm", horizon=8)
    assert_within(loss, (-1.2 + 0.8 - 2.0 + 2.0) / 8, b["loss"] + inexact.sum() / 2, "hand seq-mean-token-sum-norm")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_value_hand_computed(backend, device):
    # v = (1, 2), v_old = (0, 2), R = (3, 0), clip 0.5:
    #   token 1: (1 - 3)^2 = 4 vs (clamp(1, -0.5, 0.5) - 3)^2 = 6.25 -> 6.25 (clipped, no gradient)
    #   token 2: (2 - 0)^2 = 4 vs (clamp(2, 1.5, 2.5) - 0)^2 = 4 -> a tie inside the clip range
    v = torch.tensor([[1.0, 2.0]], device=device, requires_grad=True)
    vo = torch.tensor([[0.0, 2.0]], device=device)
    ret = torch.tensor([[3.0, 0.0]], device=device)
    mask = torch.ones(1, 2, device=device)
    # every intermediate (differences, squares, sums, halves, quarters) is a small dyadic number,
    # exact in fp32 in any order: the results are exact on every backend
    loss, stats = fastalign.ppo_value_loss(v, vo, ret, mask, clip=0.5, backend=backend)
    assert float(loss.detach()) == 0.5 * (6.25 + 4.0) / 2
    assert float(stats["vf_clipfrac"]) == 0.5
    assert float(stats["vpred_mean"]) == 1.5 and float(stats["value_mse"]) == 4.0
    loss.backward()
    # token 2: 0.5 / 2 * (half of 2 * 2 through each tied branch) = 1
    assert v.grad.tolist() == [[0.0, 1.0]]
    v.grad = None
    loss, _ = fastalign.ppo_value_loss(v, vo, ret, mask, backend=backend)  # no clip
    assert float(loss.detach()) == 0.5 * (4.0 + 4.0) / 2
    loss.backward()
    assert v.grad.tolist() == [[-1.0, 1.0]]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_policy_gradient_at_ties_and_clamp_bounds(backend, device):
    # Exact ties, where autograd splits the gradient: d = 0 (ratio 1, both terms equal), d = ln 2
    # in fp32 (exp gives exactly 2.0 = 1 + clip_high = dual_clip: ties at the clip bound and the
    # dual-clip cap), d = 20 exactly (the clamp passes the gradient) and d = 20.5, -50, 50 (it
    # does not), and A = 0.
    ln2 = float(torch.tensor(math.log(2.0)))
    d = torch.tensor([[0.0, ln2, ln2, ln2, 20.0, 20.5, -50.0, 50.0, 0.3, 0.0]], device=device)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0, -1e-9, -1.0, 1.0, -1.0, 0.0, -3.0]], device=device)
    old = torch.full_like(d, -1.0)
    mask = torch.ones_like(d, dtype=torch.bool)
    assert float(torch.exp(d[0, 1])) == 2.0
    for kw in (dict(clip_high=1.0), dict(clip_high=1.0, dual_clip=2.0), dict(clip_low=0.5, dual_clip=1.5)):
        loss, stats, grad = _compare_policy(backend, old + d, old, adv, mask, **kw)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # and exactly autograd's numbers for the second setting, token by token (token-mean over 10):
    x = (old + d).requires_grad_()
    loss, _ = fastalign.ppo_policy_loss(x, old, adv, mask, clip_high=1.0, dual_clip=2.0, backend=backend)
    loss.backward()
    expected = torch.tensor([[-1.0, -2.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]], dtype=torch.float64) / 10
    # token 3: A = -1 ties the dual cap (2 == 2): half of +2; token 4 likewise; token 5 (d = 20,
    # A < 0, ratio e^20 > c): the dual cap binds, no gradient
    expected[0, 2], expected[0, 3] = 0.5 * 2.0 / 10, 0.5 * 4.0 / 10
    # r^ = exp(fp32(ln 2)) = 2 and exp(0) = 1 exactly on every backend (their exps' contract, pinned
    # above for torch), the shares 0, 1/2, 1 are exact: what is left is the products' roundings
    assert_within(x.grad, expected, gamma(GRAD_ROUNDINGS) * expected.abs(), "tie gradients")
    # without dual clip, d = 20 exactly passes the clamp's gradient (-A e^20), d = 20.5 does not
    x = torch.tensor([[19.0, 19.5]], device=device).requires_grad_()
    old, adv, ones = torch.full_like(x, -1.0), torch.full_like(x, -1e-9), torch.ones_like(x)
    loss, _ = fastalign.ppo_policy_loss(x, old, adv, ones, backend=backend)
    loss.backward()
    # -A e^20 / 2 with A as the kernels read it (fp32(-1e-9)), within one evaluation's bound; at
    # d = 20.5 the shared d decides the clamp: exactly 0
    bound = _policy_bounds(x, old, adv, ones)["grad"] * torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    want = torch.tensor([[-_f32(-1e-9) * math.exp(20.0) / 2, 0.0]], dtype=torch.float64)
    assert_within(x.grad, want, bound, "gradient at d = 20 and 20.5")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_value_gradient_at_clip_bounds(backend, device):
    # v exactly at v_old +- clip (the clamp passes the gradient there) and ties of the two terms
    vo = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]], device=device)
    v = torch.tensor([[0.5, -0.5, 1.5, 0.25, 3.0]], device=device)
    ret = torch.tensor([[0.5, 2.0, -1.0, 0.25, 0.0]], device=device)
    mask = torch.ones_like(v)
    _compare_value(backend, v, vo, ret, mask, clip=0.5)
    _compare_value(backend, v, vo, ret, mask, clip=0.5, agg="seq-mean-token-mean")


# ---- edge cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_gives_zero_not_nan(backend, device, agg):
    x, y, z, _ = _inputs((3, 7), device, torch.float32)
    x = x.requires_grad_()
    for mask in (torch.zeros(3, 7, dtype=torch.bool, device=device), torch.zeros(3, 0, device=device)):
        xs = x[:, : mask.shape[1]].detach().requires_grad_()
        ys, zs = y[:, : mask.shape[1]], z[:, : mask.shape[1]]
        for loss, stats in (
            fastalign.ppo_policy_loss(xs, ys, zs, mask, agg=agg, dual_clip=2.0, backend=backend),
            fastalign.ppo_value_loss(xs, ys, zs, mask, agg=agg, clip=0.2, backend=backend),
            fastalign.ppo_policy_loss(xs, ys, zs, mask, agg=agg, global_count=5, backend=backend),
            fastalign.ppo_value_loss(xs, ys, zs, mask, agg=agg, global_count=5, backend=backend),
        ):
            assert float(loss.detach()) == 0.0 and all(float(s) == 0.0 for s in stats.values())
            loss.backward()
            assert xs.grad.shape == xs.shape and (xs.grad == 0).all()
            xs.grad = None
    empty = torch.zeros(0, 5, device=device, requires_grad=True)
    e = empty.detach()
    loss, stats = fastalign.ppo_policy_loss(empty, e, e, e > 0, agg=agg, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and empty.grad.shape == (0, 5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_extreme_log_ratios_are_finite(backend, device, agg):
    x, y, z, mask = _inputs((4, 33), device, torch.float32)
    y = x + torch.where(torch.rand_like(x) > 0.5, 50.0, -50.0)  # log-ratios of +-50
    y[0, :5] = x[0, :5] + torch.tensor([19.0, 20.0, -20.0, 21.0, 0.0], device=device)
    for dual in (None, 3.0):
        loss, stats, grad = _compare_policy(backend, x, y, z * 10, mask, dual_clip=dual, agg=agg)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(s) for s in stats.values())
    loss, stats, grad = _compare_value(backend, x * 1e3, y, z, mask, clip=0.2, agg=agg)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_outside_the_mask_does_not_leak(backend, device):
    x, y, z, mask = _inputs((3, 11), device, torch.float32)
    mask[:, 4] = False
    for t in (x, y, z):
        t[:, 4] = float("nan")
    loss, stats, grad = _compare_policy(backend, x, y, z, mask, dual_clip=2.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and all(torch.isfinite(s) for s in stats.values())
    loss, stats, grad = _compare_value(backend, x, y, z, mask, clip=0.3)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    mask[0, 4] = True  # now a NaN is a valid token: the loss says so
    assert fastalign.ppo_policy_loss(x, y, z, mask, backend=backend)[0].isnan()
    assert fastalign.ppo_value_loss(x, y, z, mask, backend=backend)[0].isnan()


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "torch-cpu"])
def test_deterministic(backend, device):
    x, y, z, mask = _inputs((37, 301), device, torch.float32)
    a = fastalign.ppo_policy_loss(x, y, z, mask, agg="seq-mean-token-mean", backend=backend)[0]
    b = fastalign.ppo_policy_loss(x, y, z, mask, agg="seq-mean-token-mean", backend=backend)[0]
    assert torch.equal(a, b)


# ---- micro-batch accumulation ---------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_micro_batch_accumulation_with_global_count(backend, device, agg):
    """Summing micro-batch losses computed with global_count gives the full-batch loss and
    gradient; the per-micro-batch mean (global_count=None) does not, in general."""
    x, y, z, mask = _inputs((6, 23), device, torch.float32)
    mask[4, 2:] = False  # unequal lengths, so that averaging means would weight tokens unequally
    mask[3] = False
    count = mask.sum() if agg == "token-mean" else (mask.sum(-1) > 0).sum()
    cases = (
        (fastalign.ppo_policy_loss, _policy_bounds, dict(clip_high=0.3, dual_clip=2.0)),
        (fastalign.ppo_value_loss, _value_bounds, dict(clip=0.3)),
    )
    for fn, bounds, kw in cases:
        full_x = x.clone().requires_grad_()
        full, _ = fn(full_x, y, z, mask, agg=agg, backend=backend, **kw)
        full.backward()
        acc_x = x.clone().requires_grad_()
        total, naive, e_naive = 0.0, 0.0, 0.0
        for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
            part, _ = fn(acc_x[rows], y[rows], z[rows], mask[rows], agg=agg, global_count=int(count), horizon=23,
                         backend=backend, **kw)
            part.backward()
            total = total + part
            naive += float(fn(x[rows], y[rows], z[rows], mask[rows], agg=agg, backend=backend, **kw)[0]) / 3
            e_naive += bounds(x[rows], y[rows], z[rows], mask[rows], agg=agg, **kw)["loss"] / 3
        # the same exact loss and row weights either way (global_count = the full batch's count);
        # the micro-batch sum adds its 3 parts: 2 more additions on every term's path
        b = bounds(x, y, z, mask, agg=agg, extra_adds=2, **kw)
        assert_within(total, full, 2 * b["loss"], "micro-batch sum")
        assert_within(acc_x.grad, full_x.grad, 2 * b["grad"], "micro-batch gradient")
        # the pitfall global_count exists for: the mean of micro-batch means is another number,
        # further from the full loss than both evaluations' errors
        assert abs(naive - float(full.detach())) > e_naive + b["loss"]


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend, device):
    x, y, z, mask = _inputs((2, 5), device, torch.float32)
    pl, vl = fastalign.ppo_policy_loss, fastalign.ppo_value_loss
    with pytest.raises(ValueError, match="old_logprobs must have the shape of logprobs"):
        pl(x, y[:, :4], z, mask, backend=backend)
    with pytest.raises(ValueError, match="mask must have the shape"):
        pl(x, y, z, mask[:1], backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        pl(x[0], y[0], z[0], mask[0], backend=backend)
    with pytest.raises(TypeError, match="mask must be bool or a real"):
        pl(x, y, z, mask.to(torch.complex64), backend=backend)
    with pytest.raises(TypeError, match="advantages must be float32"):
        pl(x, y, z.long(), mask, backend=backend)
    with pytest.raises(TypeError, match="logprobs must be a tensor"):
        pl(x.tolist(), y, z, mask, backend=backend)
    for bad in (0.0, 1.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="clip_low must be a number in \\(0, 1\\)"):
            pl(x, y, z, mask, clip_low=bad, backend=backend)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="clip_high"):
            pl(x, y, z, mask, clip_high=bad, backend=backend)
    for bad in (1.0, 0.5, float("nan")):
        with pytest.raises(ValueError, match="dual_clip must be None or a finite number > 1"):
            pl(x, y, z, mask, dual_clip=bad, backend=backend)
    with pytest.raises(ValueError, match="agg must be one of .*token-mean.*seq-mean-token-sum-norm"):
        pl(x, y, z, mask, agg="mean", backend=backend)
    with pytest.raises(ValueError, match="global_count"):
        pl(x, y, z, mask, global_count=-1, backend=backend)
    with pytest.raises(ValueError, match="horizon"):
        pl(x, y, z, mask, agg="seq-mean-token-sum-norm", horizon=0, backend=backend)
    with pytest.raises(ValueError, match="clip must be None or a finite number > 0"):
        vl(x, y, z, mask, clip=0.0, backend=backend)
    with pytest.raises(ValueError, match="returns must have the shape of values"):
        vl(x, y, z[:, :2], mask, backend=backend)
    with pytest.raises(ValueError, match="agg must be one of"):
        vl(x, y, z, mask, agg="sum", backend=backend)


def test_device_mismatch_and_unknown_backend():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="mask is on meta"):
        fastalign.ppo_policy_loss(x, x, x, torch.ones(2, 3, device="meta"))
    with pytest.raises(ValueError, match="old_values is on meta"):
        fastalign.ppo_value_loss(x, torch.ones(2, 3, device="meta"), x, x > 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastalign.ppo_policy_loss(x, x, x, x > 0, backend="jax")


# ---- custom-op machinery ----------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "torch-cpu"])
def test_opcheck(backend, device):
    x, y, z, mask = _inputs((4, 19), device, torch.float32)
    pf, pb = P._fused_ops("policy", backend)
    vf, vb = P._fused_ops("value", backend)
    xg = x.clone().requires_grad_()
    for dual, agg, count in ((0.0, 0, -1.0), (2.0, 2, 7.0), (3.0, 3, -1.0)):
        torch.library.opcheck(pf, (xg, y, z, mask, 0.8, 1.3, dual, agg, count, 0.0))
        out, w = pf(x, y, z, mask, 0.8, 1.3, dual, agg, count, 0.0)
        torch.library.opcheck(pb, (torch.randn(4, device=device), x, y, z, mask, w, 0.8, 1.3, dual))
    for clip, agg in ((-1.0, 0), (0.2, 1), (0.2, 3)):
        torch.library.opcheck(vf, (xg, y, z, mask, clip, agg, -1.0, 30.0))
        out, w = vf(x, y, z, mask, clip, agg, -1.0, 30.0)
        torch.library.opcheck(vb, (torch.randn(4, device=device), x, y, z, mask, w, clip))
    if backend == "cpp":  # the cpp kernels also take float and int64 masks as they are
        for m in (mask.float(), mask.long()):
            torch.library.opcheck(pf, (xg, y, z, m, 0.8, 1.3, 2.0, 0, -1.0, 0.0))
            torch.library.opcheck(vf, (xg, y, z, m, 0.2, 1, -1.0, 0.0))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    def step(logp, old, adv, mask, v, vo, ret):
        pl, ps = fastalign.ppo_policy_loss(logp, old, adv, mask, clip_high=0.28, dual_clip=3.0, backend=backend)
        vl, vs = fastalign.ppo_value_loss(v, vo, ret, mask, clip=0.2, agg="seq-mean-token-mean", backend=backend)
        return pl + 0.5 * vl, ps["clipfrac"] + vs["vf_clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x, y, z, mask = _inputs((3, 17), device, torch.float32)
    v, vo, ret, _ = _inputs((3, 17), device, torch.float32)
    a, b = x.clone().requires_grad_(), v.clone().requires_grad_()
    loss, frac = compiled(a, y, z, mask, b, vo, ret)
    loss.backward()
    a2, b2 = x.clone().requires_grad_(), v.clone().requires_grad_()
    ref, ref_frac = step(a2, y, z, mask, b2, vo, ret)
    ref.backward()
    # two evaluations (inductor fuses and reorders on a GPU), each within its bound: the policy and
    # half the value loss's bounds plus one addition; clip fractions (<= 1 each) likewise
    bp = _policy_bounds(x, y, z, mask, clip_high=0.28, dual_clip=3.0)
    bv = _value_bounds(v, vo, ret, mask, clip=0.2, agg="seq-mean-token-mean")
    e_loss = bp["loss"] + 0.5 * bv["loss"] + gamma(1) * (bp["loss_size"] + 0.5 * bv["loss_size"])
    assert_within(loss, ref, 2 * e_loss, "compiled loss")
    assert_within(frac, ref_frac, 2 * (bp["clipfrac"] + bv["vf_clipfrac"] + 2 * U), "compiled clip fractions")
    assert_within(a.grad, a2.grad, 2 * bp["grad"], "compiled policy gradient")
    assert_within(b.grad, b2.grad, 2 * 0.5 * bv["grad"], "compiled value gradient")


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpp_narrower_isa_paths_match_reference(capability):
    """The C++ row loops run as 16-lane AVX-512, 8-lane AVX2 or 4-lane baseline clones; the tests
    in this process use the widest the CPU has, FASTALIGN_CPU_CAPABILITY forces the narrower ones
    (a fresh process: the choice is made once)."""
    if fastalign.backends()["cpp"]["reason"]:
        pytest.skip(fastalign.backends()["cpp"]["reason"])
    code = """
import torch, fastalign
from tests.test_ppo import _compare_policy, _compare_value, _inputs
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for agg in fastalign.ops.ppo.AGG_MODES:
        x, y, z, m = _inputs((5, 45), "cpu", dtype, scale=0.3)
        _compare_policy("cpp", x, y, z, m, clip_high=0.3, dual_clip=2.0, agg=agg)
        _compare_value("cpp", x, y, z, m, clip=0.2, agg=agg)
print("ok")
"""
    env = dict(os.environ, FASTALIGN_CPU_CAPABILITY=capability)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    if out.returncode != 0 and "this CPU lacks" in out.stderr:
        pytest.skip(f"this CPU cannot run the {capability} kernels")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_triton_kernels_compile_for_gpus():
    """The Triton kernels compile (to PTX and cubin, sm_80 and sm_90, fp32 and bf16, every
    constexpr variant) without a GPU -- the interpreter alone would not catch GPU-only
    compile errors. A fresh process, since the tests run Triton under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    code = r"""
import inspect, triton
from triton.backends import backends
if "nvidia" not in backends:
    print("skip"); raise SystemExit
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fastalign.kernels.triton import ppo as K, pg_policy as PG
jobs = [(K._finalize_kernel, None, {"BLOCK_B": 16})]
for dt in ("*fp32", "*bf16"):
    for on in (True, False):
        jobs += [(K._policy_fwd_kernel, dt, {"USE_DUAL": on, "BLOCK": 1024}),
                 (K._policy_bwd_kernel, dt, {"USE_DUAL": on, "BLOCK": 256}),
                 (K._value_fwd_kernel, dt, {"USE_CLIP": on, "BLOCK": 1024}),
                 (K._value_bwd_kernel, dt, {"USE_CLIP": on, "BLOCK": 256})]
    for kind in range(5):  # policy_loss's pg kernel: reinforce, cispo, sapo, gspo, geo_mean
        jobs += [(PG._pg_fwd_kernel, dt, {"KIND": kind, "BLOCK": 1024}),
                 (PG._pg_bwd_kernel, dt, {"KIND": kind, "BLOCK": 256})]
for fn, dt, consts in jobs:
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in consts else "*u8" if n == "m_ptr" else
           ("*fp32" if n in ("parts_ptr", "out_ptr", "w_ptr", "g_ptr") or dt is None else dt) if n.endswith("_ptr")
           else "i64" if n in ("T", "B") else "i32" if n == "agg" else "fp32" for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    for arch in (80, 90):
        triton.compile(src, target=GPUTarget("cuda", arch, 32))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=root)
    if out.stdout.strip() == "skip":
        pytest.skip("this Triton has no NVIDIA backend")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ---- review regressions ------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_only_the_first_input_gets_a_gradient_on_every_backend(backend, device):
    # the torch backend used to back-propagate into old_logprobs/advantages (old_values/returns)
    # while the fused backends did not: same call, different autograd graph per backend
    x, y, z, mask = _inputs((2, 5), device, torch.float32)
    for fn in (fastalign.ppo_policy_loss, fastalign.ppo_value_loss):
        first = x.clone().requires_grad_()
        others = [t.clone().requires_grad_() for t in (y, z)]
        loss, _ = fn(first, *others, mask, backend=backend)
        loss.backward()
        assert first.grad is not None and all(t.grad is None for t in others)
        loss, _ = fn(x, *others, mask, backend=backend)
        assert not loss.requires_grad


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_parameters_must_be_finite_in_fp32_and_agg_a_string(backend, device):
    # clip_high=1e300 used to raise a cryptic RuntimeError on torch and run on the fused backends;
    # an unhashable agg raised "unhashable type: 'list'"
    x, y, z, mask = _inputs((2, 5), device, torch.float32)
    pl, vl = fastalign.ppo_policy_loss, fastalign.ppo_value_loss
    with pytest.raises(ValueError, match="clip_high must be None or a finite number"):
        pl(x, y, z, mask, clip_high=1e300, backend=backend)
    with pytest.raises(ValueError, match="dual_clip must be None or a finite number"):
        pl(x, y, z, mask, dual_clip=1e300, backend=backend)
    with pytest.raises(ValueError, match="clip must be None or a finite number"):
        vl(x, y, z, mask, clip=1e300, backend=backend)
    with pytest.raises(ValueError, match="agg must be one of"):
        pl(x, y, z, mask, agg=["token-mean"], backend=backend)
    with pytest.raises(ValueError, match="agg must be one of"):
        vl(x, y, z, mask, agg=None, backend=backend)
    # positive but 0 in fp32: "no tokens" (loss 0) on cuda, a huge loss on cpp
    with pytest.raises(ValueError, match="global_count must be None, 0 or a finite number"):
        pl(x, y, z, mask, global_count=1e-300, backend=backend)
    with pytest.raises(ValueError, match="horizon must be None or a finite number"):
        vl(x, y, z, mask, agg="seq-mean-token-sum-norm", horizon=1e-300, backend=backend)


@pytest.mark.skipif(not fastalign.backends()["triton"]["usable"], reason="Triton not usable here")
def test_raw_triton_ops_reject_bad_arguments():
    # The raw fastalign_triton ops used to launch on any arguments: a short input or row_weight,
    # or an empty grad_out, was read out of bounds (a segfault under the interpreter).
    ops = torch.ops.fastalign_triton
    x, b = torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="one shape and device"):
        ops.ppo_policy_loss_fwd(x, x[:1], x, b, 0.8, 1.2, 0.0, 0, -1.0, 0.0)
    with pytest.raises(TypeError, match="mask must be bool"):
        ops.ppo_policy_loss_fwd(x, x, x, b.float(), 0.8, 1.2, 0.0, 0, -1.0, 0.0)
    with pytest.raises(TypeError, match="one dtype"):
        ops.ppo_value_loss_fwd(x, x.half(), x, b, 0.2, 0, -1.0, 0.0)
    with pytest.raises(ValueError, match="agg code"):
        ops.ppo_policy_loss_fwd(x, x, x, b, 0.8, 1.2, 0.0, 9, -1.0, 0.0)
    with pytest.raises(ValueError, match="row_weight must have 2"):
        ops.ppo_policy_loss_bwd(torch.ones(4), x, x, x, b, torch.ones(1), 0.8, 1.2, 0.0)
    with pytest.raises(ValueError, match="grad_out must have >= 1"):
        ops.ppo_value_loss_bwd(torch.ones(0), x, x, x, b, torch.ones(2), 0.2)


@pytest.mark.skipif(not fastalign.backends()["cuda"]["usable"], reason="no usable cuda backend")
def test_raw_cuda_backward_rejects_row_weight_on_another_device():
    # .to(kFloat) kept a CPU row_weight on the CPU and its host pointer went to the kernel
    x, b = torch.randn(2, 3, device="cuda"), torch.ones(2, 3, dtype=torch.bool, device="cuda")
    g = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match="row_weight is on cpu"):
        torch.ops.fastalign.ppo_policy_loss_bwd(g, x, x, x, b, torch.ones(2), 0.8, 1.2, 0.0)
    with pytest.raises(RuntimeError, match="row_weight is on cpu"):
        torch.ops.fastalign.ppo_value_loss_bwd(g, x, x, x, b, torch.ones(2), 0.2)


def test_environment_overrides_auto(monkeypatch):
    # FASTALIGN_BACKEND replaces "auto" for both losses (fastalign/_backends.py)
    x, y, z, mask = _inputs((2, 5), "cpu", torch.float32)
    calls = []
    for name in ("ppo_policy_loss", "ppo_value_loss"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    monkeypatch.setenv("FASTALIGN_BACKEND", "torch")
    fastalign.ppo_policy_loss(x, y, z, mask)
    fastalign.ppo_value_loss(x, y, z, mask, clip=0.2)
    assert calls == ["ppo_policy_loss", "ppo_value_loss"]
    if not fastalign.backends()["cuda"]["usable"]:
        monkeypatch.setenv("FASTALIGN_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run cpu tensors"):
            fastalign.ppo_policy_loss(x, y, z, mask)
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run cpu tensors"):
            fastalign.ppo_value_loss(x, y, z, mask)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_expanded_stride_zero_inputs(backend, device):
    # broadcast advantages (one per sequence, stride 0 over T) and an expanded logprobs leaf
    x, y, z, mask = _inputs((3, 7), device, torch.float32)
    adv = z[:, :1].expand(3, 7)
    base = x[:1].clone()
    for fn, bounds in ((fastalign.ppo_policy_loss, _policy_bounds), (fastalign.ppo_value_loss, _value_bounds)):
        a, ar = (base.clone().requires_grad_() for _ in range(2))
        loss, _ = fn(a.expand(3, 7), y, adv, mask, backend=backend)
        ref, _ = fn(ar.expand(3, 7), y, adv.contiguous(), mask, backend="torch")
        b = bounds(base.expand(3, 7), y, adv, mask)
        assert_within(loss, ref, 2 * b["loss"], "loss, expanded inputs")
        loss.backward()
        ref.backward()
        # the expanded leaf's gradient sums its 3 rows' gradients: their errors plus gamma(2) of their sizes
        e_grad = b["grad"].sum(0, keepdim=True) + gamma(2) * b["gmax"].sum(0, keepdim=True)
        assert_within(a.grad, ar.grad, 2 * e_grad, "gradient of an expanded leaf")
