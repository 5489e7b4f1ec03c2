"""Equal numerics: fastalign.integrations.{verl,openrlhf,trl} against each peer's formulas.

The peers are not imported. Each `_peer_*` function below re-derives, in plain eager torch, what
the cited peer source computes (read via the search tool; written anew here, not copied), so these
tests pin down the conventions the adapters claim: epsilons, clamps, masking, variance,
aggregation. Sources (default branches as stored): volcengine/verl verl/trainer/ppo/core_algos.py
and verl/utils/torch_functional.py (Jan 2026); OpenRLHF/OpenRLHF
openrlhf/trainer/ppo_utils/experience_maker.py, openrlhf/models/{loss,utils}.py (Aug 2026);
huggingface/trl trl/trainer/{utils,grpo_trainer,dpo_trainer}.py and
trl/experimental/ppo/ppo_trainer.py (Jul 2026).
Every adapter runs on each usable CPU backend (torch reference and the C++ kernels).

Error bounds: each peer formula is evaluated in float64 on the same fp32 inputs (inputs are
exact in both), so a comparison needs only fastalign's own fp32 error, derived in the helpers
below from the test's inputs and scaled by the magnitudes summed: a sum of n terms in any order
(lanes, rows then rows-of-rows, threads) gamma(n) sum|t|; a GAE scan a running bound carried
through the recurrence like Horner's rule; whitening the errors of mean, variance and rsqrt
(first order); exp/log within EXP_ULPS; max/min/clamp 1-Lipschitz; a mean's division one more
rounding. Where the peer's formula itself differs by a documented epsilon (verl's n + 1e-8
denominators) that difference is added as such. Counts behind clip fractions are exact when no
token lies within its error bound of a threshold, which each test's data are checked for
(`_clear`); a gradient stored in bf16 adds one rounding u_bf16 |g|.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastalign
from fastalign.integrations import openrlhf, trl, verl
from tests.numerics import EXP_ULPS, assert_within, gamma, unit_roundoff
from tests.test_preference import _d, _dpo_exact, _grad_err, _pair_grad, _pair_grad_err

U32 = unit_roundoff(torch.float32)


def _f64(*ts):
    """float64 copies (leaves requiring grad again where the originals do) for the peers' formulas."""
    out = tuple(t.detach().double().requires_grad_(t.requires_grad) for t in ts)
    return out if len(out) > 1 else out[0]


def _clear(x, thresholds, err, what, where=True):
    """Every x (where `where`) is farther than its error from every threshold, so fp32 and fp64
    take the same side of each comparison (clamp, max/min, a strict > counted in a clip fraction):
    the test data must not sit on a tie that rounding may break either way."""
    for th in thresholds:
        gap = torch.where(torch.as_tensor(where), (x - th).abs(), float("inf"))
        assert (gap > err).all(), f"{what}: test data within rounding of a threshold ({gap.min().item():.3g})"


def _mean_err(x, ex, m, count=None, numel=None):
    """Error of the fp32 masked sum of x (errors ex) divided by a count (default: the valid
    count): any order over numel summed terms, gamma(numel) sum|x|, the division one more u."""
    valid = m != 0
    n = valid.sum().clamp(min=1) if count is None else count
    numel = valid.numel() if numel is None else numel
    return (torch.where(valid, ex, 0.0).sum() + gamma(numel + 1) * torch.where(valid, x, 0.0).abs().sum()) / n


def _agg_weights(m, mode, count=None, horizon=None):
    """[B, 1] weight of each row's token losses in the aggregate: 1/N (token-mean), 1/S
    (seq-mean-token-sum), 1/(n_b S) (seq-mean-token-mean), 1/(S H) (seq-mean-token-sum-norm);
    count replaces N or S (verl's and OpenRLHF's global counts / dp_size)."""
    n_b = (m != 0).sum(-1, keepdim=True).double()
    if count is None:
        count = n_b.sum() if mode == "token-mean" else (n_b > 0).sum().double()
    w = torch.ones_like(n_b) / count
    if mode == "seq-mean-token-mean":
        w = w / n_b.clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        w = w / (m.shape[-1] if horizon is None else horizon)
    return w


def _agg_err(l, el, m, mode, count=None, horizon=None):
    """Error of an fp32 aggregation (reference.ppo_agg, or the C++ per-row lane sums then the
    cross-row sum) of per-token losses l with errors el: a token's loss passes at most T - 1 + B - 1
    additions, the row's 1/n_b, the count's and the horizon's divisions, so gamma(BT + 4) on
    sum w_b |l_bt| (_agg_weights), plus sum w_b el_bt. verl's seq-mean-token-mean divides by
    n_b + 1e-8: a formula difference of w_b |sum_t l_bt| 1e-8 / n_b per row, added."""
    valid = m != 0
    w = _agg_weights(m, mode, count, horizon)
    err = (w * torch.where(valid, el + gamma(l.numel() + 4) * l.abs(), 0.0)).sum()
    if mode == "seq-mean-token-mean":
        n_b = valid.sum(-1, keepdim=True).clamp(min=1)
        err = err + (w * torch.where(valid, l, 0.0).sum(-1, keepdim=True).abs() * 1e-8 / n_b).sum()
    return err


def _frac_err(frac, m):
    """A fraction of valid tokens: an exact count (the data are _clear of ties), one fp32 division
    u |f|, and verl's n + 1e-8 denominator 1e-8 / n."""
    return U32 * _d(frac).abs() + 1e-8 / (m != 0).sum()


def _gae_exact(r, v, m, gamma_, lam):
    """Exact (float64) GAE with fastalign's convention (masked steps carry V and A, output 0) and
    the error of fastalign's fp32 scan, carried through the recurrence like Horner's rule: per
    valid step delta = r + g V - v and A = delta + gl A' round each term at most 4 times (g and
    gl rounded to fp32, a product, two sums): the new error is gl (1 + gamma(4)) E' + gamma(4)
    (|r| + g |V| + |v| + gl |A'|); returns = A + v adds one rounding."""
    r, v, valid = _d(r), _d(v), (m != 0).cpu()
    gl = gamma_ * lam
    B, T = r.shape
    nv, a, e = (torch.zeros(B, dtype=torch.float64) for _ in range(3))
    adv, err = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for t in reversed(range(T)):
        ok = valid[:, t]
        new_a = r[:, t] + gamma_ * nv - v[:, t] + gl * a
        new_e = gl * (1 + gamma(4)) * e + gamma(4) * (r[:, t].abs() + gamma_ * nv.abs() + v[:, t].abs() + gl * a.abs())
        a, e = torch.where(ok, new_a, a), torch.where(ok, new_e, e)
        nv = torch.where(ok, v[:, t], nv)
        adv[:, t], err[:, t] = torch.where(ok, a, 0.0), torch.where(ok, e, 0.0)
    ret = torch.where(valid, adv + v, 0.0)
    return adv, err, ret, torch.where(valid, err + U32 * (adv.abs() + v.abs()), 0.0)


def _whiten_err(x, ex, m, shift_mean=True, biased=False, eps=1e-8, mean_eps=0.0):
    """Error of fp32 whitening (x - mu) rsqrt(var + eps) (or rsqrt(max(var, eps)), the same bound)
    of x with errors ex, vs the exact whitening of the exact x, to first order in u:
      mu = masked sum / n: e_mu = _mean_err;
      dev = x - mu: e_dev = ex + e_mu + u |dev|;
      var = sum dev^2 / (n - 1) (n for biased): (sum (2 |dev| e_dev + e_dev^2) + gamma(numel + 2)
        sum dev^2) / (n - 1), then + eps rounded (eps and the sum: u (var + eps));
      s = rsqrt(v'): relative error half of v's, plus 3u (sqrt and division, or a 2-ulp rsqrt);
      out = dev s: e_dev s + |dev| e_s + u |out|; shift_mean=False adds mu back: e_mu + u |out + mu|.
    mean_eps: a peer dividing its masked means by n + mean_eps (verl: 1e-8) differs from the exact
    formula by |mu| mean_eps / n in the mean and var mean_eps / n in the variance; added."""
    valid = (m != 0).cpu()
    x, ex = _d(x), _d(ex)
    n = valid.sum().double()
    mu = torch.where(valid, x, 0.0).sum() / n
    e_mu = _mean_err(x, ex, valid) + mu.abs() * mean_eps / n
    dev = x - mu
    e_dev = ex + e_mu + U32 * dev.abs()
    dvalid = torch.where(valid, dev, 0.0)
    denom = n if biased else n - 1
    var = (dvalid**2).sum() / denom
    e_var = (torch.where(valid, 2 * dev.abs() * e_dev + e_dev**2, 0.0).sum()
             + gamma(valid.numel() + 2) * (dvalid**2).sum()) / denom + var * 2 * mean_eps / n
    vp = torch.clamp(var, min=eps) if biased else var + eps
    s = vp.rsqrt()
    e_s = s * (0.5 * (e_var + U32 * vp) / vp + 3 * U32)
    out = dev * s
    err = e_dev * s + dev.abs() * e_s + U32 * out.abs()
    if not shift_mean:
        out, err = out + mu, err + e_mu + U32 * (out + mu).abs()
    return out, err


def _policy_tok(old, logp, adv, low, high, dual=None):
    """Exact per-token PPO loss (float64) and its fp32 error: d = logp - old (one rounding), ratio
    = exp(d~) within ratio (EXP_ULPS + |d| + 1) u; the clamp bounds 1 - low, 1 + high rounded
    (u (1 + high)); l1 = -A r, l2 = -A clamp(r): |A| times their errors plus a product's u; max and
    min are 1-Lipschitz, the dual-clip cap -A c one more u. Also the exact d l / d logp
    (-A r on the unclipped branch, else 0) with its error, and the values whose sides must be clear."""
    old, logp, adv = _d(old), _d(logp), _d(adv)
    d = logp - old
    ratio = d.clamp(-20, 20).exp()
    e_r = ratio * U32 * (EXP_ULPS + d.abs() + 1)
    lo, hi = 1 - low, 1 + high
    l1, l2 = -adv * ratio, -adv * ratio.clamp(lo, hi)
    tok = torch.maximum(l1, l2)
    err = adv.abs() * (2 * e_r + U32 * hi) + U32 * (l1.abs() + l2.abs())
    inside = (ratio >= lo) & (ratio <= hi)
    grad = torch.where(inside | (l1 > l2), -adv * ratio, 0.0)
    if dual is not None:
        l3 = -adv * dual
        err = err + U32 * l3.abs()
        capped = (adv < 0) & (tok > l3)
        tok = torch.where(adv < 0, torch.minimum(tok, l3), tok)
        grad = torch.where(capped, 0.0, grad)
        _clear(torch.maximum(l1, l2), [l3], err, "dual-clip cap", adv < 0)
    _clear(ratio, [lo, hi], e_r + U32 * hi, "ratio clip bounds")
    e_grad = adv.abs() * e_r + U32 * grad.abs()
    return tok, err, grad, e_grad, d


@pytest.fixture(params=["torch", "cpp"])
def backend(request, monkeypatch):
    if not fastalign.backends()[request.param]["usable"]:
        pytest.skip(f"{request.param}: {fastalign.backends()[request.param]['reason']}")
    monkeypatch.setenv("FASTALIGN_BACKEND", request.param)
    return request.param


def _mask(B, T, seed, holes=True):
    """Responses of different lengths (one empty row), with observation-token holes inside."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0
    m = torch.arange(T)[None, :] < lengths[:, None]
    if holes:
        m &= torch.rand(B, T, generator=g) > 0.25
    m[0, :3] = True  # at least a few valid entries overall
    return m



def _value_tok(v, vo, ret, clip, shifted=False):
    """Exact per-token clipped value loss max((v - R)^2, (vclip - R)^2) (float64), its fp32 error,
    and the exact d/dv with its error. a = v - R: one rounding; vclip = clamp(v, vo - c, vo + c)
    (OpenRLHF: vo + clamp(v - vo, -c, c), shifted=True): the bounds' or the shift's roundings,
    u (|vo| + c) (+ u |vclip|), clamp 1-Lipschitz; b = vclip - R one more rounding; a square of
    a value within e: 2 |a| e + e^2 + u a~^2; max 1-Lipschitz. d/dv = 2 a (or 2 b where the clamp
    passes), each within twice its operand's error plus a product's u."""
    v, vo, ret = _d(v), _d(vo), _d(ret)
    a = v - ret
    ea = U32 * a.abs()
    vclip = torch.minimum(torch.maximum(v, vo - clip), vo + clip)
    evc = U32 * (vo.abs() + clip) + (U32 * (vclip.abs() + (v - vo).abs()) if shifted else 0.0)
    b = vclip - ret
    eb = evc + U32 * (vclip.abs() + ret.abs())
    sq = lambda x, e: 2 * x.abs() * e + e**2 + U32 * (x.abs() + e) ** 2  # noqa: E731
    l1, l2 = a**2, b**2
    _clear(v, [vo - clip, vo + clip], evc, "value clip bounds")
    _clear(l1, [l2], sq(a, ea) + sq(b, eb), "value loss branches", l1 != l2)
    inside = (v > vo - clip) & (v < vo + clip)
    grad = torch.where(l1 >= l2, 2 * a, torch.where(inside, 2 * b, 0.0))
    egrad = torch.where(l1 >= l2, 2 * ea, 2 * eb) + U32 * grad.abs()
    return torch.maximum(l1, l2), sq(a, ea) + sq(b, eb), grad, egrad


def _softmax_err(logits, labels=None):
    """Exact float64 log_softmax(z)[label] and entropy of the (bf16- or fp32-) logits z, and the
    errors of fastalign's fp32 evaluation (online log-sum-exp: m = max z, s = sum e^(z - m),
    t = sum e^(z - m) (z - m); lse = m + log s, logp = z_y - lse, H = log s - t / s) or of torch's
    log_softmax / -(p logp).sum(). With M = max z - min z, V terms:
      each e^(z - m) is within (EXP_ULPS + M + 1) u (exp, and the rounding of z - m that exp
      turns relative), a sum of V of them gamma(V): r = (EXP_ULPS (1 + |log s|) + M + 4) u +
      gamma(V) bounds the relative error of s, of log s (log's EXP_ULPS on |log s|), and of t;
      lse: r + u |lse|; logp: that plus u (|z_y - m| + |logp|);
      H: t / s and the weighted sum p |logp| are at most E_p|z - m| + |log s| in magnitude, each
      term within 3 r of it: 3 r (E_p|z - m| + |log s| + 1) + u |H|.
    The gradient of sum logp[label] is onehot - p: p = e^(logp), within p (EXP_ULPS u + the
    argument's error r + u (|lse| + M + |logp|)) plus a subtraction's u."""
    z = _d(logits)
    V = z.shape[-1]
    m = z.amax(-1, keepdim=True)
    M = m - z.amin(-1, keepdim=True)
    lse = torch.logsumexp(z, -1, keepdim=True)
    log_s = lse - m
    logp = z - lse
    p = logp.exp()
    r = (EXP_ULPS * (1 + log_s.abs()) + M + 4) * U32 + gamma(V)
    e_lse = r + U32 * lse.abs()
    ent = -(p * logp).sum(-1)
    e_ent = 3 * r[..., 0] * ((p * (z - m)).sum(-1).abs() + log_s[..., 0].abs() + 1) + U32 * ent.abs()
    e_logp = e_lse + U32 * ((z - m).abs() + logp.abs())
    e_p = p * (EXP_ULPS * U32 + e_logp)
    if labels is None:
        return ent, e_ent
    return logp.gather(-1, labels[..., None])[..., 0], e_logp.gather(-1, labels[..., None])[..., 0], ent, e_ent, p, e_p


def _kl(lp, ref, kind):
    """Exact float64 fastalign kl_penalty `kind` (k1, abs, k2, k3) and d/d lp, their fp32 errors.
    d = lp - ref one rounding. k1, abs: u |d|; k2 = 0.5 d~ d~: gamma(3) d^2 / 2; k3: x = clamp(-d,
    -20, 20) within u |d|, e^x within e^x (EXP_ULPS + |d|) u (exp, and x's error made relative),
    e^x - x - 1 two more roundings gamma(2) (e^x + |x| + 1); where the +-10 clamp acts (the data
    are _clear of it) the result is 10 exactly. Gradients: k1 1, abs sign(d) (exact); k2 d~ (u |d|
    and a product); k3 1 - e^x inside both clamps (e^x's error and a subtraction), else 0."""
    lp, ref = _d(lp), _d(ref)
    d = lp - ref
    if kind in ("k1", "abs"):
        return (d if kind == "k1" else d.abs()), U32 * d.abs(), (torch.ones_like(d) if kind == "k1" else d.sign()), 0.0
    if kind == "k2":
        return 0.5 * d * d, gamma(3) * 0.5 * d * d, d, gamma(2) * d.abs()
    x = (-d).clamp(-20, 20)
    ex = x.exp()
    e_exp = ex * (EXP_ULPS + d.abs()) * U32
    raw = ex - x - 1
    e_raw = e_exp + U32 * d.abs() + gamma(2) * (ex + x.abs() + 1)
    _clear(-d, [-20.0, 20.0], U32 * d.abs(), "k3 input clamp")
    _clear(raw, [10.0], e_raw, "k3 output clamp")
    inside = (x.abs() < 20) & (raw < 10)
    k3 = raw.clamp(-10, 10)
    return k3, torch.where(raw < 10, e_raw, 0.0), torch.where(inside, 1 - ex, 0.0), \
        torch.where(inside, e_exp + U32 * (1 + ex), 0.0)


def _sum_err(x, dim=-1):
    """Error of an fp32 sum of x along dim in any order: gamma(n) sum|x|, except 0 where every
    partial sum is exact: all x multiples of 2^-k whose magnitudes add up to less than 2^(24-k)
    (then every partial sum is such a multiple below 2^(24-k), an fp32 number)."""
    a = x.abs().sum(dim)
    exact = torch.zeros_like(a, dtype=torch.bool)
    for k in range(21):
        sc = x * 2.0**k
        exact |= (sc == sc.round()).all(dim) & (a * 2.0**k < 2**24)
    return torch.where(exact, 0.0, gamma(x.shape[dim]) * a)


def _sqrt_err(sd, ev):
    """fp32 sqrt of a variance within ev of sd^2: |sqrt(v + e) - sqrt(v)| <= min(e / (2 sqrt v), sqrt e),
    plus the sqrt's rounding u sd."""
    return torch.minimum(torch.where(sd > 0, ev / (2 * sd), float("inf")), ev.sqrt()) + U32 * sd


def _group_adv(x, ex, ids, eps, scale="group", lone=False):
    """Exact float64 (x - group mean) / (std + eps) (scale "group": unbiased group std; "batch": the
    std of all x; "none": no division) for group ids `ids`, and the error of fastalign's fp32
    evaluation from x with errors ex, to first order:
      mean = sum / G: _sum_err (0 for exactly summable groups) / G plus the division's u |mean|
        (0 when the fp32 quotient is exact); dev = x - mean: ex + e_mean + u |dev| (0 for dev 0);
      std = sqrt(sum dev^2 / (G - 1)): var within (sum (2|dev| e_dev + e_dev^2) + gamma(G + 1)
        sum dev^2) / (G - 1); sqrt within min(e_var / (2 std), sqrt(e_var)) + u std;
      std + eps: u eps (eps rounded to fp32) + u (std + eps); the quotient e_dev / den + |adv| e_den
        / den + u |adv|. lone=True: a group of one has mean 0 and std 1 (verl)."""
    x = _d(x)
    ex = _d(ex) + torch.zeros_like(x)
    ids = torch.as_tensor(ids)
    mean, e_mean = torch.zeros_like(x), torch.zeros_like(x)
    std, e_std = torch.ones_like(x), torch.zeros_like(x)
    for g in ids.unique():
        sel = ids == g
        xs = x[sel]
        if lone and xs.numel() == 1:
            continue
        n = xs.numel()
        mu = xs.sum() / n
        exact_q = float(torch.tensor(mu.item(), dtype=torch.float32).double() * n) == xs.sum().item()
        es = _sum_err(xs, 0)
        em = (ex[sel].sum() + es) / n + (0.0 if exact_q and es == 0 and (ex[sel] == 0).all() else U32 * mu.abs())
        mean[sel], e_mean[sel] = mu, em
        dev = xs - mu
        ed = ex[sel] + em + U32 * dev.abs()
        var = (dev**2).sum() / max(n - 1, 1)
        ev = ((2 * dev.abs() * ed + ed**2).sum() + gamma(n + 1) * (dev**2).sum()) / max(n - 1, 1)
        sd = var.sqrt()
        std[sel], e_std[sel] = sd, _sqrt_err(sd, ev)
    dev = x - mean
    e_dev = ex + e_mean + U32 * dev.abs()
    if scale == "none":
        return dev, e_dev
    if scale == "batch":
        mu_all = x.mean()
        dev_all = x - mu_all
        e_all = ex + (ex.sum() + _sum_err(x, 0)) / x.numel() + U32 * mu_all.abs() + U32 * dev_all.abs()
        ev = ((2 * dev_all.abs() * e_all + e_all**2).sum() + gamma(x.numel() + 1) * (dev_all**2).sum()) / (x.numel() - 1)
        sd = x.std()
        std, e_std = sd.expand_as(x), _sqrt_err(sd, ev).expand_as(x)
    den = std + eps
    e_den = e_std + U32 * eps + U32 * den
    adv = dev / den
    return adv, e_dev / den + adv.abs() * e_den / den + U32 * adv.abs()

# ---- shared peer math, re-derived ---------------------------------------------------------------


def _masked_mean(x, m, dim=None, eps=0.0):
    m = m.float()
    if dim is None:
        return (torch.where(m > 0, x, 0.0) * m).sum() / (m.sum() + eps)
    return (torch.where(m > 0, x, 0.0) * m).sum(dim) / (m.sum(dim) + eps)


def _peer_whiten(x, m, shift_mean=True, mean_eps=0.0):
    """TRL / verl masked_whiten: masked mean, unbiased masked variance, rsqrt(var + 1e-8)."""
    mu = _masked_mean(x, m, eps=mean_eps)
    n = m.float().sum()
    var = _masked_mean((x - mu) ** 2, m, eps=mean_eps) * n / (n - 1)
    out = (x - mu) * torch.rsqrt(var + 1e-8)
    return out + mu if not shift_mean else out


def _peer_plain_gae(r, v, gamma, lam):
    """The unmasked GAE loop (TRL; OpenRLHF after masking its inputs)."""
    T = r.shape[1]
    last, out = torch.zeros(r.shape[0]), []
    for t in reversed(range(T)):
        nv = v[:, t + 1] if t + 1 < T else torch.zeros(r.shape[0])
        last = r[:, t] + gamma * nv - v[:, t] + gamma * lam * last
        out.append(last)
    adv = torch.stack(out[::-1], 1)
    return adv, adv + v


# ---- verl ---------------------------------------------------------------------------------------


def _peer_verl_gae(r, v, m, gamma, lam):
    """core_algos.compute_gae_advantage_return: masked steps carry next value and advantage."""
    m = m.float()
    nv, last, out = torch.zeros(r.shape[0]), torch.zeros(r.shape[0]), []
    for t in reversed(range(r.shape[1])):
        cand = r[:, t] + gamma * nv - v[:, t] + gamma * lam * last
        nv = m[:, t] * v[:, t] + (1 - m[:, t]) * nv
        last = m[:, t] * cand + (1 - m[:, t]) * last
        out.append(last)
    adv = torch.stack(out[::-1], 1)
    return _peer_whiten(adv, m, mean_eps=1e-8), adv + v


def _peer_verl_agg(lm, m, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """core_algos.agg_loss (current): global counts times dp_size; empty rows excluded."""
    m = m.float()
    n_b = m.sum(-1)
    if mode == "token-mean":
        count = m.sum() if batch_num_tokens is None else batch_num_tokens
        return (torch.where(m > 0, lm, 0.0) * m).sum() / count * dp_size
    seq = (torch.where(m > 0, lm, 0.0) * m).sum(-1)
    if mode == "seq-mean-token-sum-norm":
        return seq.sum() / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    if mode == "seq-mean-token-mean":
        seq = seq / (n_b + 1e-8)
    nonempty = (n_b > 0).float()
    count = nonempty.sum() if global_batch_size is None else global_batch_size
    return (seq * nonempty).sum() / count * dp_size


def _peer_verl_policy(old, logp, adv, m, low, high, c, mode, **agg):
    """core_algos.compute_policy_loss (dual clip always on for A < 0)."""
    d = torch.clamp(logp - old, -20.0, 20.0)
    ratio = d.exp()
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
    clipped = torch.maximum(l1, l2)
    l3 = -adv * c
    per_tok = torch.where(adv < 0, torch.minimum(l3, clipped), clipped)
    return (_peer_verl_agg(per_tok, m, mode, **agg), _masked_mean((l2 > l1).float(), m, eps=1e-8),
            _masked_mean(-d, m, eps=1e-8), _masked_mean(((clipped > l3) & (adv < 0)).float(), m, eps=1e-8))


def _peer_verl_kl(lp, ref, kind):
    base = kind.rstrip("+")
    if base in ("kl", "k1"):
        fwd = lp - ref
    elif base == "abs":
        fwd = (lp - ref).abs()
    elif base in ("mse", "k2"):
        fwd = 0.5 * (lp - ref) ** 2
    else:
        x = torch.clamp(ref - lp, -20, 20)
        fwd = torch.clamp(x.exp() - x - 1, -10, 10)
    if kind.endswith("+") and base not in ("mse", "k2"):
        k2 = 0.5 * (lp - ref) ** 2
        return k2 - k2.detach() + fwd.detach()
    return fwd


def test_verl_gae_and_whitening(backend):
    torch.manual_seed(0)
    B, T = 5, 37
    m = _mask(B, T, 1)
    m[1, 4] = True  # keep all rows non-degenerate for the whitening
    r, v = torch.randn(B, T), torch.randn(B, T)
    adv, ret = verl.compute_gae_advantage_return(r, v, m, gamma=0.99, lam=0.95)
    want_adv, want_ret = _peer_verl_gae(*_f64(r, v), m, 0.99, 0.95)
    # equal wherever verl's consumers read them (response_mask); see the module docstring.
    # fastalign: the fp32 scan's running error, then whitening's (verl's means use n + 1e-8)
    a, ea, _, eret = _gae_exact(r, v, m, 0.99, 0.95)
    _, ew = _whiten_err(a, ea, m, mean_eps=1e-8)
    assert_within(adv[m], want_adv[m], ew[m], "verl GAE advantages")
    assert_within(ret[m], want_ret[m], eret[m], "verl GAE returns")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("agg", [{}, dict(dp_size=4, batch_num_tokens=173, global_batch_size=19, loss_scale_factor=64)])
def test_verl_policy_loss_dual_clip(backend, mode, agg):
    torch.manual_seed(1)
    B, T = 6, 29
    m = _mask(B, T, 2)
    old = torch.randn(B, T) * 0.3 - 1
    logp = (old + torch.randn(B, T) * 0.4).requires_grad_(True)
    adv = torch.randn(B, T) * 2
    low, high, c = 0.2, 0.28, 3.0
    got = verl.compute_policy_loss(old, logp, adv, m, cliprange=0.2, cliprange_low=low, cliprange_high=high,
                                   clip_ratio_c=c, loss_agg_mode=mode, **agg)
    old64, logp64, adv64 = _f64(old, logp, adv)
    want = _peer_verl_policy(old64, logp64, adv64, m, low, high, c, mode, **agg)
    _check_policy(got, want, logp, logp64, m, _policy_tok(old, logp, adv, low, high, c), mode,
                  *_verl_divisor(mode, m, **agg))


def _verl_divisor(mode, m, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """(count, horizon) of verl's agg_loss for _agg_weights: the global count / dp_size, or, for
    seq-mean-token-sum-norm, no count and loss_scale_factor (default T) as the horizon."""
    if mode == "seq-mean-token-sum-norm":
        return 1.0, loss_scale_factor
    count = batch_num_tokens if mode == "token-mean" else global_batch_size
    return (None if count is None else count / dp_size), None


def _check_policy(got, want, logp, logp64, m, tok, mode, count, horizon):
    """fastalign's (loss, clipfrac, approx_kl[, clipfrac_lower]) and loss gradient vs a peer's in
    fp64: the loss within _agg_err of the per-token errors; the fractions _frac_err; approx_kl a
    valid mean of d (each d one rounding, _mean_err, plus verl's n + 1e-8); the gradient w_b times
    the per-token one, plus 3 roundings (the weight's divisions, the product)."""
    l, el, gl, egl, d = tok
    assert_within(got[0], want[0], _agg_err(l, el, m, mode, count, horizon), f"{mode} loss")
    for i in (1, 3)[:len(got) - 2]:
        assert_within(got[i], want[i], _frac_err(want[i], m), f"{mode} clip fraction {i}")
    kl_err = _mean_err(-d, U32 * d.abs(), m) + want[2].detach().abs() * 1e-8 / (m != 0).sum()
    assert_within(got[2], want[2], kl_err, f"{mode} approx_kl")
    (g_got,) = torch.autograd.grad(got[0], logp)
    (g_want,) = torch.autograd.grad(want[0], logp64)
    w = _agg_weights(m, mode, count, horizon)
    assert_within(g_got, g_want, torch.where(m, w * egl + gamma(3) * g_want.abs(), 0.0), f"{mode} loss grad")


def test_verl_policy_loss_vanilla_config(backend):
    torch.manual_seed(2)
    m = _mask(4, 16, 3)
    old, logp, adv = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 16)
    config = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.3, "clip_ratio_c": 2.5,
              "global_batch_info": {"dp_size": 2, "batch_num_tokens": 50}}
    loss, metrics = verl.compute_policy_loss_vanilla(old, logp, adv, m, "token-mean", config)
    want = _peer_verl_policy(*_f64(old, logp, adv), m, 0.2, 0.3, 2.5, "token-mean", dp_size=2, batch_num_tokens=50)
    l, el, _, _, d = _policy_tok(old, logp, adv, 0.2, 0.3, 2.5)
    assert_within(loss, want[0], _agg_err(l, el, m, "token-mean", 25.0), "vanilla loss")
    assert_within(metrics["actor/pg_clipfrac"], want[1], _frac_err(want[1], m), "pg_clipfrac")
    kl_err = _mean_err(-d, U32 * d.abs(), m) + want[2].abs() * 1e-8 / (m != 0).sum()
    assert_within(metrics["actor/ppo_kl"], want[2], kl_err, "ppo_kl")
    assert_within(metrics["actor/pg_clipfrac_lower"], want[3], _frac_err(want[3], m), "pg_clipfrac_lower")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl_agg_loss_modes(mode):
    torch.manual_seed(3)
    m = _mask(7, 20, 4)
    lm = torch.randn(7, 20)
    lm[~m] = float("nan")  # verl's masked_sum ignores NaN outside the mask; so must we
    for kw in ({}, dict(dp_size=8, batch_num_tokens=300, global_batch_size=40, loss_scale_factor=128)):
        err = _agg_err(torch.where(m, _d(lm), 0.0), 0.0, m, mode, *_verl_divisor(mode, m, **kw))
        assert_within(verl.agg_loss(lm, m, mode, **kw), _peer_verl_agg(_f64(lm), m, mode, **kw), err, mode)


def test_verl_value_loss(backend):
    torch.manual_seed(4)
    m = _mask(5, 24, 5)
    vpred = torch.randn(5, 24, requires_grad=True)
    values, returns = torch.randn(5, 24), torch.randn(5, 24)
    loss, clipfrac = verl.compute_value_loss(vpred, returns, values, m, cliprange_value=0.3)
    vp64, values, returns = _f64(vpred, values, returns)
    vclip = torch.maximum(torch.minimum(vp64, values + 0.3), values - 0.3)
    l1, l2 = (vp64 - returns) ** 2, (vclip - returns) ** 2
    want = 0.5 * _peer_verl_agg(torch.maximum(l1, l2), m, "token-mean")
    l, el, g, eg = _value_tok(vpred, values, returns, 0.3)
    assert_within(loss, want, 0.5 * _agg_err(l, el, m, "token-mean"), "value loss")  # 0.5: exact
    frac = _masked_mean((l2 > l1).float(), m, eps=1e-8)
    assert_within(clipfrac, frac, _frac_err(frac, m), "value clipfrac")
    w = 0.5 * _agg_weights(m, "token-mean")
    assert_within(torch.autograd.grad(loss, vpred)[0], torch.autograd.grad(want, vp64)[0],
                  torch.where(m, w * eg + gamma(3) * w * g.abs(), 0.0), "value loss grad")


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+"])
def test_verl_kl_penalty(kind):
    torch.manual_seed(5)
    lp = (torch.randn(4, 33) * 3).requires_grad_(True)
    ref = torch.randn(4, 33) * 3
    ref[0, 0], lp.data[0, 0] = 30.0, -0.5  # large log-ratio: the clamps act
    lp64 = _f64(lp)
    got, want = verl.kl_penalty(lp, ref, kind), _peer_verl_kl(lp64, _d(ref), kind)
    base = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}.get(kind.rstrip("+"), kind.rstrip("+"))
    _, err, _, gerr = _kl(lp, ref, base)
    assert_within(got, want, err, f"kl {kind}")
    if kind.endswith("+"):  # straight-through: the gradient of k2
        gerr = _kl(lp, ref, "k2")[3]
    assert_within(torch.autograd.grad(got.sum(), lp)[0], torch.autograd.grad(want.sum(), lp64)[0], gerr,
                  f"kl {kind} grad")


def test_verl_whiten_logprobs_entropy(backend):
    torch.manual_seed(6)
    x, m = torch.randn(6, 10), _mask(6, 10, 6)
    for shift in (True, False):
        err = _whiten_err(x, torch.zeros(()), m, shift, mean_eps=1e-8)[1]
        assert_within(verl.masked_whiten(x, m, shift), _peer_whiten(_d(x), m, shift, mean_eps=1e-8), err, "whiten")
    logits, labels = torch.randn(3, 7, 50), torch.randint(0, 50, (3, 7))
    z = _d(logits)
    want_lp = z.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    _, e_lp, _, e_ent, _, _ = _softmax_err(logits, labels)
    assert_within(verl.logprobs_from_logits(logits, labels), want_lp, e_lp, "logprobs_from_logits")
    p = z.softmax(-1)
    want_ent = torch.logsumexp(z, -1) - (p * z).sum(-1)
    assert_within(verl.entropy_from_logits(logits), want_ent, e_ent, "entropy_from_logits")


def _peer_verl_grpo(token_rewards, m, index, eps, norm):
    """compute_grpo_outcome_advantage: per-id mean and unbiased std; a lone sample: mean 0, std 1."""
    scores = token_rewards.sum(-1)
    out = scores.clone()
    for i in range(len(scores)):
        members = torch.stack([scores[j] for j in range(len(scores)) if index[j] == index[i]])
        mean, std = (members.mean(), members.std()) if len(members) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        out[i] = (scores[i] - mean) / (std + eps) if norm else scores[i] - mean
    return out[:, None] * m


@pytest.mark.parametrize("layout", ["contiguous", "shuffled", "uneven"])
@pytest.mark.parametrize("norm", [True, False])
def test_verl_grpo_advantage(layout, norm):
    torch.manual_seed(7)
    index = np.repeat(np.array(["a", "b", "c", "d"]), 4)
    if layout == "shuffled":
        index = np.random.default_rng(0).permutation(index)
    elif layout == "uneven":
        index = np.array(["a", "a", "b", "c", "c", "c", "d", "a", "e", "e", "c", "b", "f", "f", "f", "f"])
    rew = torch.zeros(16, 9)
    rew[torch.arange(16), torch.randint(0, 9, (16,))] = torch.randint(0, 3, (16,)).float()  # outcome reward
    rew[3, 2] += 0.5
    m = _mask(16, 9, 8, holes=False)
    adv, ret = verl.compute_grpo_outcome_advantage(rew, m, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm)
    ids = torch.as_tensor(np.unique(index, return_inverse=True)[1].reshape(-1))
    scores = _d(rew).sum(-1)  # sums of halves and small integers: exact in fp32 (_sum_err 0)
    _, err = _group_adv(scores, _sum_err(_d(rew)), ids, 1e-6, "group" if norm else "none", lone=True)
    assert_within(adv, _peer_verl_grpo(_d(rew), m, index, 1e-6, norm), err[:, None] * m, "verl GRPO")
    assert adv is ret or torch.equal(adv, ret)


# ---- TRL ----------------------------------------------------------------------------------------


def test_trl_masked_whiten(backend):
    torch.manual_seed(8)
    x, m = torch.randn(5, 21) * 4 + 1, _mask(5, 21, 9)
    for shift in (True, False):
        err = _whiten_err(x, torch.zeros(()), m, shift)[1]
        assert_within(trl.masked_whiten(x, m, shift), _peer_whiten(_d(x), m, shift), err, "trl whiten")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_selective_log_softmax(backend, dtype):
    torch.manual_seed(9)
    logits = (torch.randn(3, 6, 101) * 2).to(dtype).requires_grad_(True)
    idx = torch.randint(0, 101, (3, 6))
    # TRL: gather(logits) - logsumexp for fp32; log_softmax per row for bf16 (computed in bf16
    # there). Here both sides start from the same bf16-rounded logits (no input error), the peer in
    # fp64; fastalign computes in fp32 (_softmax_err) and stores the logits' gradient in bf16.
    z = _f64(logits)
    want = z.log_softmax(-1).gather(-1, idx[..., None])[..., 0]
    got = trl.selective_log_softmax(logits, idx)
    _, e_lp, _, _, p, e_p = _softmax_err(logits, idx)
    assert_within(got, want, e_lp, "selective_log_softmax")
    g1 = torch.autograd.grad(got.sum(), logits)[0]
    g2 = torch.autograd.grad(want.sum(), z)[0]  # onehot - p
    eg = e_p + U32 * g2.abs()
    stored = 0.0 if dtype == torch.float32 else unit_roundoff(dtype)
    assert_within(g1, g2, eg + stored * (g2.abs() + eg), "selective_log_softmax grad")
    idx_k = torch.randint(0, 101, (3, 6, 4))  # top-K style index
    want_k = _d(logits).log_softmax(-1).gather(-1, idx_k)
    e_k = torch.stack([_softmax_err(logits, idx_k[..., k])[1] for k in range(4)], -1)
    assert_within(trl.selective_log_softmax(logits, idx_k), want_k, e_k, "top-K selective_log_softmax")


def test_trl_entropy(backend):
    logits = torch.randn(4, 5, 64)
    z = _d(logits)
    want, err = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1), _softmax_err(logits)[1]
    assert_within(trl.entropy_from_logits(logits), want, err, "trl entropy")


def test_trl_ppo_gae(backend):
    """PPO trainer: values zero-filled past the end, unmasked loop, whiten over the response."""
    torch.manual_seed(10)
    B, T = 4, 23
    m = _mask(B, T, 11, holes=False)
    m[1, :2] = True
    r, v = torch.randn(B, T) * (m.float()), torch.where(m, torch.randn(B, T), 0.0)
    adv, ret = trl.compute_gae(r, v, m, gamma=1.0, lam=0.95)
    want_adv, want_ret = _peer_plain_gae(_d(r), _d(v), 1.0, 0.95)
    a, ea, _, eret = _gae_exact(r, v, torch.ones(B, T), 1.0, 0.95)  # the unmasked scan
    assert_within(ret, want_ret, eret, "trl returns")
    ew = _whiten_err(a, ea, m)[1]  # zero outside the response: exact on both sides
    assert_within(adv, torch.where(m, _peer_whiten(want_adv, m), 0.0), torch.where(m, ew, 0.0), "trl advantages")


def _peer_trl_grpo(rewards, G, scale):
    grouped = rewards.view(-1, G)
    mean = grouped.mean(1).repeat_interleave(G)
    if scale == "none":
        return rewards - mean
    if scale == "group":
        std = grouped.std(1).repeat_interleave(G)  # nanstd: Bessel-corrected
    else:
        std = rewards.std().expand_as(rewards)
    return (rewards - mean) / (std + 1e-4)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_trl_grpo_advantages(scale):
    torch.manual_seed(12)
    rewards = torch.randint(0, 2, (24,)).float()
    rewards[:6] = 1.0  # one group with zero std: eps decides the value
    _, err = _group_adv(rewards, torch.zeros(()), torch.arange(24) // 6, 1e-4, scale)
    assert_within(trl.grpo_advantages(rewards, 6, scale), _peer_trl_grpo(_d(rewards), 6, scale), err, "trl GRPO")


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_trl_dpo_losses(backend, loss_type):
    torch.manual_seed(13)
    c, r = (torch.randn(8) * 5 - 40).requires_grad_(True), (torch.randn(8) * 5 - 40).requires_grad_(True)
    rc, rr = torch.randn(8) * 5 - 40, torch.randn(8) * 5 - 40
    nc, nr = torch.randint(1, 30, (8,)), torch.randint(1, 30, (8,))
    c32, r32 = c, r
    beta, ls = 0.1, 0.1
    losses, cw, rw = trl.dpo_losses(c, r, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls,
                                    chosen_lengths=nc, rejected_lengths=nr)
    # fastalign's error: the DPO bounds of tests/test_preference.py; under IPO the inputs are first
    # divided by the lengths in fp32 (one rounding each); TRL ignores label smoothing under sigmoid
    ins, eps = (c, r, rc, rr), (0.0 if loss_type == "sigmoid" else ls)
    errs = (0.0,) * 4
    if loss_type == "ipo":
        ins = tuple(_d(t) / _d(n) for t, n in zip(ins, (nc, nr, nc, nr)))
        errs = tuple(U32 * t.abs() for t in ins)
    _, (err, _, _), (delta, dd) = _dpo_exact(ins, beta, loss_type, eps, errs)
    rew_err = [gamma(3) * beta * (_d(a).abs() + _d(b).abs()) for a, b in ((c, rc), (r, rr))]
    c, r, rc, rr = _f64(c, r, rc, rr)
    d = (c - rc) - (r - rr)
    if loss_type == "sigmoid":  # current TRL: label smoothing not applied to sigmoid
        want = -F.logsigmoid(beta * d)
    elif loss_type == "hinge":
        want = torch.relu(1 - beta * d)
    elif loss_type == "ipo":  # log-ratios averaged over completion tokens
        want = (((c - rc) / nc) - ((r - rr) / nr) - 1 / (2 * beta)) ** 2
    else:
        want = (-(1 - ls) * F.logsigmoid(beta * d) + ls * F.logsigmoid(-beta * d)) / (1 - 2 * ls)
    assert_within(losses, want, err, f"trl {loss_type}")
    assert_within(cw, beta * (c - rc).detach(), rew_err[0], "trl chosen rewards")
    assert_within(rw, beta * (r - rr).detach(), rew_err[1], "trl rejected rewards")
    g = torch.autograd.grad(losses.sum(), (c32, r32))
    gw = torch.autograd.grad(want.sum(), (c, r))
    # dL/dc = L'(delta) (IPO: / n_c, one more rounding), dL/dr = -L' (/ n_r)
    pg, epg = _pair_grad(delta, beta, loss_type, eps), _pair_grad_err(delta, dd, beta, loss_type, eps)
    for a, b, n in zip(g, gw, (nc, nr)):
        e = _grad_err(torch.ones(8), pg, epg, torch.float32)
        if loss_type == "ipo":
            e = e / _d(n) + U32 * b.abs()
        assert_within(a, b, e, f"trl {loss_type} grad")


# ---- OpenRLHF -----------------------------------------------------------------------------------


def test_openrlhf_gae(backend):
    """experience_maker.get_advantages_and_returns: mask values and rewards, then the plain loop."""
    torch.manual_seed(14)
    B, T = 5, 31
    m = _mask(B, T, 15)  # holes too: OpenRLHF does not skip them, it zeroes them
    r, v = torch.randn(B, T), torch.randn(B, T)
    adv, ret = openrlhf.get_advantages_and_returns(v, r, m.float(), 0.99, 0.9)
    want_adv, want_ret = _peer_plain_gae(_d(r) * m, _d(v) * m, 0.99, 0.9)
    _, ea, _, eret = _gae_exact(r * m, v * m, torch.ones(B, T), 0.99, 0.9)  # masking by * 0/1: exact
    assert_within(adv, want_adv, ea, "openrlhf advantages")
    assert_within(ret, want_ret, eret, "openrlhf returns")


def test_openrlhf_normalize_advantages():
    """Global over all experiences, biased variance, rsqrt(max(var, 1e-8))."""
    torch.manual_seed(16)
    advs = [torch.randn(3, 11) * 2 + 1, torch.randn(2, 7)]
    masks = [_mask(3, 11, 17).float(), _mask(2, 7, 18, holes=False).float()]
    got = openrlhf.normalize_advantages(advs, masks)
    a, mm = torch.cat([_d(x).flatten() for x in advs]), torch.cat([x.flatten() for x in masks])
    mean = (a * mm).sum() / mm.sum()
    var = ((a - mean) ** 2 * mm).sum() / mm.sum()
    # one global biased whitening with the 1e-8 floor (same bound as + eps)
    err = _whiten_err(a, torch.zeros(()), mm, biased=True)[1].split([x.numel() for x in advs])
    for g, x, e in zip(got, advs, err):
        assert_within(g, (_d(x) - mean) * var.clamp(min=1e-8).rsqrt(), e.view(x.shape), "openrlhf normalize")
    const = [torch.full((2, 4), 3.0)]  # zero variance: the 1e-8 floor, not +eps
    # mean of eight 3.0 is exact, so x - mean is 0 and the result exactly 0
    assert torch.equal(openrlhf.normalize_advantages(const, [torch.ones(2, 4)])[0], torch.zeros(2, 4))
    no_std = openrlhf.normalize_advantages(advs[0], masks[0], std_norm=False)
    a0, m0 = _d(advs[0]), masks[0] != 0
    e_mu = _mean_err(a0, torch.zeros(()), m0)
    assert_within(no_std, a0 - (a0 * masks[0]).sum() / masks[0].sum(), e_mu + U32 * (a0 - (a0 * masks[0]).sum()
                  / masks[0].sum()).abs(), "openrlhf centre only")


@pytest.mark.parametrize("estimator", ["group_norm", "dr_grpo", "reinforce_baseline", "rloo"])
def test_openrlhf_group_rewards(estimator):
    torch.manual_seed(19)
    n = 4
    rewards = torch.randn(20)
    rewards[4:8] = 0.5  # constant group
    g = _d(rewards).reshape(-1, n)
    if estimator == "group_norm":
        want = (g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + 1e-9)
    elif estimator == "rloo":
        want = g - (g.sum(-1, keepdim=True) - g) / (n - 1)
    else:
        want = g - g.mean(-1, keepdim=True)
    ids = torch.arange(20) // n
    _, err = _group_adv(rewards, torch.zeros(()), ids, 1e-9, "group" if estimator == "group_norm" else "none")
    if estimator == "rloo":  # fastalign: (r - mean) * fl32(n / (n - 1)): two more roundings
        err = err * n / (n - 1) + gamma(2) * want.reshape(-1).abs()
    assert_within(openrlhf.shape_group_rewards(rewards, n, estimator), want.reshape(-1), err, estimator)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_openrlhf_approx_kl(est):
    torch.manual_seed(20)
    lp, base = torch.randn(3, 40) * 6, torch.randn(3, 40) * 6
    lr = _d(lp) - _d(base)
    raw = {"k1": lr, "k2": lr ** 2 / 2, "k3": (-lr).exp() - 1 + lr}[est]
    want = raw.clamp(-10, 10)
    _, err, _, _ = _kl(lp, base, est)
    _clear(raw, [-10.0, 10.0], err, "approx_kl clamp")
    err = torch.where(raw.abs() >= 10, 0.0, err)  # clear of +-10: exactly +-10 on both sides there
    assert_within(openrlhf.compute_approx_kl(lp, base, est), want, err, f"approx_kl {est}")


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_openrlhf_policy_and_value_loss(backend, token_level, dual_clip):
    torch.manual_seed(21)
    B, T = 6, 18
    m = _mask(B, T, 22)
    mf = m.float()
    old = torch.randn(B, T) * 0.3
    lp = (old + torch.randn(B, T) * 0.5).requires_grad_(True)
    adv = torch.randn(B, T)
    loss, clip_ratio, ppo_kl = openrlhf.policy_loss(lp, old, adv, mf, 0.2, 0.27, dual_clip, token_level)
    lp32, old32, adv32 = lp, old, adv
    lp, old, adv, mf = _f64(lp, old, adv, mf)
    ratio = (lp - old).clamp(-20, 20).exp()
    s1, s2 = ratio * adv, ratio.clamp(1 - 0.2, 1 + 0.27) * adv
    if dual_clip is None:
        tok = -torch.min(s1, s2)
    else:
        c1 = torch.min(s1, s2)
        tok = -torch.where(adv < 0, torch.max(c1, dual_clip * adv), c1)

    def aggregate(x):
        if token_level:
            return (x * mf).sum() / mf.sum()
        n = mf.sum(-1)
        seq, keep = (x * mf).sum(-1) / (n + 1e-8), (n > 0).float()
        return (seq * keep).sum() / keep.sum()

    want = aggregate(tok)
    mode = "token-mean" if token_level else "seq-mean-token-mean"
    # aggregate() has no n + 1e-8 (the e-8 term of _agg_err then only loosens by ~1e-8 relative)
    _check_policy((loss, clip_ratio, ppo_kl), (want, (torch.lt(s2, s1).float() * mf).sum() / mf.sum(),
                  (-(lp - old).detach() * mf).sum() / mf.sum()), lp32, lp, m,
                  _policy_tok(old32, lp32, adv32, 0.2, 0.27, dual_clip), mode, None, None)

    v = torch.randn(B, T, requires_grad=True)
    vo, ret = torch.randn(B, T), torch.randn(B, T)
    got_v = openrlhf.value_loss(v, vo, ret, mf, clip_eps=0.2, token_level_loss=token_level)
    l, el, gv, egv = _value_tok(v, vo, ret, 0.2, shifted=True)
    v32, (v, vo, ret) = v, _f64(v, vo, ret)
    vclip = vo + (v - vo).clamp(-0.2, 0.2)
    want_v = 0.5 * aggregate(torch.max((vclip - ret) ** 2, (v - ret) ** 2))
    assert_within(got_v, want_v, 0.5 * _agg_err(l, el, m, mode), "openrlhf value loss")
    w = 0.5 * _agg_weights(m, mode)
    assert_within(torch.autograd.grad(got_v, v32)[0], torch.autograd.grad(want_v, v)[0],
                  torch.where(m, w * egv + gamma(3) * w * gv.abs(), 0.0), "openrlhf value grad")


def test_openrlhf_global_counts(backend):
    """dp_size / batch_num_tokens / global_batch_size: sum / global count * dp_size."""
    torch.manual_seed(23)
    m = _mask(4, 12, 24).float()
    old, lp, adv = torch.randn(4, 12), torch.randn(4, 12), torch.randn(4, 12)
    l, el, _, _, _ = _policy_tok(old, lp, adv, 0.2, 0.2)  # the data are _clear of the clip bounds
    loss_tok, _, _ = openrlhf.policy_loss(lp, old, adv, m, dp_size=4, batch_num_tokens=100)
    loss_seq, _, _ = openrlhf.policy_loss(lp, old, adv, m, token_level_loss=False, dp_size=2, global_batch_size=10)
    old, lp, adv, m = _f64(old, lp, adv, m)
    tok = -torch.min((lp - old).exp() * adv, (lp - old).exp().clamp(0.8, 1.2) * adv)
    assert_within(loss_tok, (tok * m).sum() / 100 * 4, _agg_err(l, el, m, "token-mean", 25.0), "global tokens")
    n = m.sum(-1)
    assert_within(loss_seq, ((tok * m).sum(-1) / (n + 1e-8) * (n > 0)).sum() / 10 * 2,
                  _agg_err(l, el, m, "seq-mean-token-mean", 5.0), "global sequences")


@pytest.mark.parametrize("ipo", [False, True])
def test_openrlhf_dpo(backend, ipo):
    torch.manual_seed(25)
    c, r = (torch.randn(10) * 4 - 30).requires_grad_(True), (torch.randn(10) * 4 - 30).requires_grad_(True)
    rc, rr = torch.randn(10) * 4 - 30, torch.randn(10) * 4 - 30
    beta, ls = 0.2, 0.15
    loss, cw, rw = openrlhf.dpo_loss(c, r, rc, rr, beta, label_smoothing=ls, ipo=ipo)
    # fastalign: the per-pair bounds of tests/test_preference.py, then the mean of 10: gamma(11)
    lt, eps = ("ipo", 0.0) if ipo else ("sigmoid", ls)
    (losses, _, _), (err, ecw, erw), (delta, dd) = _dpo_exact((c, r, rc, rr), beta, lt, eps)
    err = (err.sum() + gamma(11) * losses.abs().sum()) / 10
    gerr = _grad_err(torch.full((10,), 0.1), _pair_grad(delta, beta, lt, eps),
                     _pair_grad_err(delta, dd, beta, lt, eps), torch.float32)
    grads = torch.autograd.grad(loss, (c, r))
    c, r, rc, rr = _f64(c, r, rc, rr)
    x = (c - r) - (rc - rr)  # summed log-probs under IPO too
    if ipo:
        want = ((x - 1 / (2 * beta)) ** 2).mean()
    else:  # conservative DPO
        want = (-F.logsigmoid(beta * x) * (1 - ls) - F.logsigmoid(-beta * x) * ls).mean()
    assert_within(loss, want, err, "openrlhf dpo loss")
    assert_within(cw, beta * (c - rc).detach(), ecw, "openrlhf chosen rewards")
    assert_within(rw, beta * (r - rr).detach(), erw, "openrlhf rejected rewards")
    for a, b in zip(grads, torch.autograd.grad(want, (c, r))):  # +-L'/10: one more rounding (/10)
        assert_within(a, b, gerr + U32 * b.abs(), "openrlhf dpo grad")


# ---- group_advantages (the shared op) -----------------------------------------------------------


def test_group_advantages_contract():
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    a = fastalign.group_advantages(s, 3, eps=1e-3)
    ids = torch.arange(6) // 3
    # exact fp64 values; fastalign's error by _group_adv (mean 2 and std 1 are exact here)
    err = _group_adv(s, torch.zeros(()), ids, 1e-3)[1]
    assert_within(a[:3], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / 1.001, err[:3], "eps outside the sqrt")
    assert torch.equal(a[3:], torch.zeros(3))  # equal scores: 0 / (0 + eps), never NaN
    err = _group_adv(s, torch.zeros(()), ids, 1e-3, "batch")[1]
    assert_within(fastalign.group_advantages(s, 3, scale="batch", eps=1e-3)[:3],
                  torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / (_d(s).std() + 1e-3), err[:3], "batch std")
    tok = torch.zeros(6, 4)
    tok[:, -1] = s
    # row sums of one score and zeros are exact: the same scores, the same bits
    assert torch.equal(fastalign.group_advantages(tok, 3), fastalign.group_advantages(s, 3))
    assert fastalign.group_advantages(torch.zeros(0), 4).shape == (0,)
    with pytest.raises(ValueError, match="multiple of group_size"):
        fastalign.group_advantages(s, 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        fastalign.group_advantages(s, 1)
    with pytest.raises(ValueError, match="scale must be one of"):
        fastalign.group_advantages(s, 3, scale="rows")
    with pytest.raises(ValueError, match="eps"):
        fastalign.group_advantages(s, 3, eps=float("nan"))
    with pytest.raises(ValueError, match="eps"):
        fastalign.group_advantages(s, 3, eps=0.0)
    with pytest.raises(TypeError, match="float tensor"):
        fastalign.group_advantages(torch.arange(6), 3)
    with pytest.raises(ValueError, match="group_size must be an integer"):
        fastalign.group_advantages(s, True)
    assert torch.equal(fastalign.group_advantages(s, 1, scale="none"), torch.zeros(6))  # s - s: exactly 0
