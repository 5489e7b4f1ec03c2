"""kl_penalty and masked_whiten: composed torch ops (the same code on every backend), checked
against independent formulas (TRL's/verl's, written out locally from their code), forward and
backward, plus edge cases, errors and torch.compile.

Error bounds (tests/numerics.py's model; every bound is computed in float64 from the test's actual
inputs, scaled by the magnitudes the computation sums or multiplies, never by the result):
  * the references are evaluated in float64 on the very fp32 values the ops read (bf16/fp16 inputs
    are upcast exactly on both sides), so only the op's own fp32 error is bounded; the fp64
    reference's own error is the same derivation with u = 2^-53, a 2^-29 fraction, added as such;
  * kl_penalty (_kl_bounds): d = logp - ref is one rounding (u|d|); k2 = (0.5 d) d three (gamma(3));
    k3 = e^x - x - 1 with x = clamp(-d): the exp's EXP_ULPS ulps, the rounding of d (and of a fast
    exp's x log2 e) carried through e^x (e^x gamma(2)|x|) and two subtractions (gamma(2) (e^x + |x|
    + 1)); backward the same terms times |w|; where the input-side clamp (|d| ~ 20) or the output
    clamp (k3 ~ 10) may decide differently within those errors, the whole gradient |w (e^x - 1)|
    is allowed there;
  * masked_whiten (_whiten_bounds): the masked mean of n terms errs by gamma(n) mean|x|; the
    variance (sum of n squares of deviations, one division) by gamma(n+3) (sum D^2 + n e_mu^2)
    + n e_mu^2, over n - 1 (Sum (D - e)^2 = Sum D^2 + n e^2 because Sum D = 0); rsqrt(var + eps)
    by half the variance's relative error (taken whole) plus EXP_ULPS ulps; each output by the
    centring, the scale and one product. Backward: autograd's graph term by term (the two sums over
    all N entries, sum w_i c_i and sum w_i, gamma(N + n) of their magnitudes, and each product's
    rounding), see the docstring;
  * gradients returned in bf16/fp16 are rounded once more: u_dtype |gradient|;
  * comparisons of two fp32 evaluations (torch.compile against eager) add both evaluations' bounds;
  * results whose every intermediate is exact (0 = x - x, x - 0, dyadic hand values, the same code
    on the same inputs) stay bit-exact comparisons.
"""

import math

import pytest
import torch

import fastalign
from tests.conftest import backend_params
from tests.numerics import EXP_ULPS, assert_within, fn_error, gamma, rounding, unit_roundoff

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U = unit_roundoff(torch.float32)
FP64_SHARE = 1 + 2.0**-29  # an fp64 reference's own error: the same bound with u = 2^-53


def _rel(*rs):
    """The relative error of a product of factors (1 + r_i): prod(1 + r_i) - 1 (Higham lemma 3.3)."""
    out = 1.0
    for r in rs:
        out = out * (1 + r)
    return out - 1


def _stored(g, dtype):
    """The rounding of an fp32 gradient stored in the input's dtype: none for fp32, u_dtype |g| else."""
    return torch.zeros_like(g.double()) if dtype == torch.float32 else rounding(g, dtype)


def _kl_bounds(logp, ref, kind, w=None):
    """Per-element bounds (forward, gradient w.r.t. logprobs) of fp32 kl_penalty against the exact
    formula on the same fp32 inputs, the gradient for the upstream weights w. The gradient w.r.t.
    ref_logprobs is its negation (exact), so it has the same bound.
      d = logp - ref, one rounding: u |d|. x = clamp(-d, -20, 20) inherits it: |x^ - x| <= gamma(1) |x|
        (the clamp is 1-Lipschitz, and cuts the error to 0 once |d| (1 - u) > 20).
      k1, abs: u |d|; their gradients +-w (sign(d) is exact: d rounds to 0 only when logp == ref).
      k2 = (0.5 d) d: gamma(3) d^2 / 2; gradient w d, from (w d) 0.5 + w (0.5 d): gamma(3) |w d|.
      k3 = (e^x - x) - 1: e^x^ within EXP_ULPS ulps and e^x gamma(2)|x| of e^x (d's rounding, and
        the rounding of x log2(e) in the GPUs' fast exp 2^(x log2 e)); the two subtractions
        gamma(2) (e^x + |x| + 1). The output clamp to [-10, 10] is 1-Lipschitz (adds nothing).
        Gradient -(w e^x - w) where both clamps pass it: |w| (e^x (EXP_ULPS u + gamma(2)|x|) +
        gamma(2)(e^x + 1)); where a clamp may decide otherwise within these errors (|d| within
        gamma(1) |d| of 20, or e^x - x - 1 within the forward bound of 10) one side may pass the
        gradient and the other block it: the whole |w (e^x - 1)| on top."""
    d = logp.detach().double() - ref.detach().double()  # exact: both are fp32 values
    w = torch.zeros_like(d) if w is None else w.detach().double().abs()
    zero = torch.zeros_like(d)
    if kind in ("k1", "abs"):
        return U * d.abs() * FP64_SHARE, zero
    if kind == "k2":
        return gamma(3) * 0.5 * d * d * FP64_SHARE, gamma(3) * (w * d).abs() * FP64_SHARE
    x = (-d).clamp(-20, 20)
    ex = x.exp()
    e_exp = fn_error(ex) + ex * gamma(2) * x.abs()  # the exp, d's rounding and a fast exp's x log2(e)
    fwd = e_exp + gamma(1) * x.abs() + gamma(2) * (ex + x.abs() + 1)
    grad = w * (e_exp + gamma(2) * (ex + 1))
    k3 = ex - x - 1
    flip = ((d.abs() - 20).abs() <= gamma(1) * d.abs()) | ((k3 - 10).abs() <= fwd)
    grad = grad + torch.where(flip, w * (ex - 1).abs() * (1 + gamma(2)), zero)
    return fwd * FP64_SHARE, grad * FP64_SHARE


def _whiten_bounds(x, mask, shift_mean=True, w=None, eps=1e-8):
    """Per-element bounds (forward, gradient for upstream weights w) of fp32 masked_whiten against
    the exact formula on the same fp32 inputs, for n >= 2 masked entries among N. With the exact
    mu, C_i = x_i - mu, D_i = C_i on the mask (0 off it), var = Sum D^2 / (n - 1),
    s = (var + eps)^-1/2 (reference.masked_whiten's ops, in order):
      mean = Sum x / n (n terms, one division):           e_mu  = gamma(n) Sum|x| / n
      c_i = x_i - mean^:                                  e_c   = e_mu + gamma(1) (|C| + e_mu)
      var^ = Sum (c_i)^2 / (n - 1), c_i = (D_i - e)(1 + d_i); Sum (D - e)^2 = Sum D^2 + n e^2:
                                                          e_var = (gamma(n+3)(Sum D^2 + n e_mu^2) + n e_mu^2) / (n-1)
      s^ = rsqrt(var^ + fp32(eps)), rho = (e_var + gamma(2)(var + eps)) / (var + eps) (the add, eps's
        own rounding); (1 + rho)^-1/2 is within rho of 1, rsqrt within EXP_ULPS ulps:
                                                          rel_s = rho + EXP_ULPS u
      out_i = c_i s^ (one product):                       e_out = s ((1 + rel_s)(1 + u) e_c + |C| (u + rel_s (1 + u)))
      shift_mean=False, out_i + mean^:                    + e_mu + gamma(1) (|out| + |mu| + e_out + e_mu)
    Backward, autograd's graph of those ops for loss = Sum w_i out_i (W = |w|):
      g_c = w s^ (to each centred entry):     e_gc = W s (gamma(1) + rel_s (1 + u))
      g_s = Sum_N w_i c_i (N products):       e_gs = Sum W e_c + gamma(N + 1) Sum W (|C| + e_c)
      g_var = -0.5 g_s s^3 (s^3 as s s s):    0.5 s^3 (e_gs (1 + r3) + |G_s| r3),
                                              r3 = (1 + rel_s)^3 (1 + gamma(4)) - 1
      g_dev_j = 2 c_j (g_var / (n - 1)) (the product rule's two equal halves, their sum exact):
                                              2 / (n-1) (|D| e_gvar (1 + gamma(2))
                                                         + (|G_var| + e_gvar) e_c + |D| |G_var| gamma(2))
      g_mean = -Sum_N g_c - Sum_n g_dev (+ Sum_N w for shift_mean=False), exactly -s Sum w (+ Sum w)
        since Sum D = 0: the terms' errors plus gamma(2N + n) of their magnitudes;
      grad_j = g_c_j + [j masked in] (g_dev_j + g_mean / n): the terms' errors, the division
        gamma(1) |g_mean| / n and the two additions gamma(2) of the three magnitudes."""
    xd = x.detach().double().cpu()
    valid = (mask != 0).cpu()
    n, big_n = int(valid.sum()), xd.numel()
    assert n >= 2
    xv = torch.where(valid, xd, 0.0)
    mu = xv.sum() / n
    c = xd - mu
    dm = torch.where(valid, c, 0.0)
    ssq = (dm * dm).sum()
    var = ssq / (n - 1)
    s = (var + eps).rsqrt()
    e_mu = gamma(n) * xv.abs().sum() / n
    e_c = e_mu + gamma(1) * (c.abs() + e_mu)
    e_var = (gamma(n + 3) * (ssq + n * e_mu**2) + n * e_mu**2) / (n - 1)
    rho = (e_var + gamma(2) * (var + eps)) / (var + eps)
    rel_s = rho + EXP_ULPS * U
    e_out = s * ((1 + rel_s) * (1 + U) * e_c + c.abs() * (U + rel_s * (1 + U)))
    out = c * s
    if not shift_mean:
        e_out = e_out + e_mu + gamma(1) * ((out + mu).abs() + mu.abs() + e_out + e_mu)
    if w is None:
        return e_out * FP64_SHARE, None
    wd = w.detach().double().cpu()
    ww = wd.abs()
    g_c = ww * s
    e_gc = ww * s * (gamma(1) + rel_s * (1 + U))
    g_s = (wd * c).sum()
    e_gs = (ww * e_c).sum() + gamma(big_n + 1) * (ww * (c.abs() + e_c)).sum()
    r3 = _rel(rel_s, rel_s, rel_s, gamma(4))
    g_var = 0.5 * s**3 * g_s.abs()
    e_gvar = 0.5 * s**3 * (e_gs * (1 + r3) + g_s.abs() * r3)
    g_dev = 2 / (n - 1) * dm.abs() * g_var
    e_gdev = 2 / (n - 1) * (dm.abs() * e_gvar * (1 + gamma(2)) + (g_var + e_gvar) * torch.where(valid, e_c, 0.0)
                            + dm.abs() * g_var * gamma(2))
    g_mean = s * wd.sum() - (0.0 if shift_mean else wd.sum())
    mags = g_c.sum() + g_dev.sum() + (0.0 if shift_mean else ww.sum())
    e_gmean = e_gc.sum() + e_gdev.sum() + gamma(2 * big_n + n) * (mags + e_gc.sum() + e_gdev.sum())
    e_grad = e_gc + torch.where(valid, e_gdev + (e_gmean + gamma(1) * (g_mean.abs() + e_gmean)) / n, 0.0)
    e_grad = e_grad + gamma(2) * (g_c + e_gc + torch.where(valid, g_dev + e_gdev + (g_mean.abs() + e_gmean) / n, 0.0))
    return e_out * FP64_SHARE, e_grad * FP64_SHARE


# ---- kl_penalty ---------------------------------------------------------------------------------


def _kl_formula(logp, ref, kind):
    """Written independently of kernels/reference.py, in float64."""
    logp, ref = logp.double(), ref.double()
    if kind == "k1":
        return logp - ref
    if kind == "abs":
        return (logp - ref).abs()
    if kind == "k2":
        return 0.5 * (logp - ref).square()
    # verl low_var_kl / OpenRLHF k3: ratio of ref to policy, clamped
    kl = (ref - logp).clamp(min=-20, max=20)
    return (kl.exp() - kl - 1).clamp(min=-10, max=10)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3"])
def test_kl_matches_formula_forward_and_backward(backend, device, dtype, kind):
    logp = (-torch.rand(4, 33, device=device) * 5).to(dtype).requires_grad_()
    ref = (-torch.rand(4, 33, device=device) * 5).to(dtype).requires_grad_()
    out = fastalign.kl_penalty(logp, ref, kind=kind, backend=backend)
    assert out.dtype == torch.float32 and out.shape == logp.shape
    lp64, ref64 = logp.detach().double().requires_grad_(), ref.detach().double().requires_grad_()
    want = _kl_formula(lp64, ref64, kind)
    w = torch.randn(4, 33, device=device)
    e_fwd, e_grad = _kl_bounds(logp, ref, kind, w)
    assert_within(out, want, e_fwd, f"kl {kind} forward")
    (out * w).sum().backward()
    (want * w.double()).sum().backward()
    assert logp.grad.dtype == dtype and ref.grad.dtype == dtype
    assert_within(logp.grad, lp64.grad, e_grad + _stored(lp64.grad, dtype), f"kl {kind} d/dlogprobs")
    assert_within(ref.grad, ref64.grad, e_grad + _stored(ref64.grad, dtype), f"kl {kind} d/dref_logprobs")


def test_kl_hand_values():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    kl = fastalign.kl_penalty
    assert kl(logp, ref, kind="k1").tolist() == [0.5, -1.0, 0.0]
    assert kl(logp, ref, kind="abs").tolist() == [0.5, 1.0, 0.0]
    assert kl(logp, ref, kind="k2").tolist() == [0.125, 0.5, 0.0]
    k3 = kl(logp, ref, kind="k3")  # x = ref - logp = (-0.5, 1, 0)
    expected = torch.tensor([math.exp(-0.5) + 0.5 - 1, math.e - 2, 0.0], dtype=torch.float64)
    assert_within(k3, expected, _kl_bounds(logp, ref, "k3")[0], "k3 by hand")
    assert (kl(logp, ref) == kl(logp, ref, kind="k1")).all()  # default kind


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_kl_extreme_log_ratios(backend, device):
    # log-ratios of +-50: k3 clamps x to +-20 and the result to +-10 (finite, zero gradient there)
    logp = torch.tensor([0.0, -50.0, -3.0, -60.0], device=device, requires_grad=True)
    ref = torch.tensor([-50.0, 0.0, -3.0, -10.0], device=device, requires_grad=True)
    k3 = fastalign.kl_penalty(logp, ref, kind="k3", backend=backend)
    # x = ref - logp = (-50, 50, 0, 50): e^-20 + 20 - 1 ~ 19 -> 10; e^20 - 21 -> 10; 0; 10
    assert k3.tolist() == [10.0, 10.0, 0.0, 10.0]
    k3.sum().backward()
    assert (logp.grad == 0).all() and (ref.grad == 0).all()
    for kind in ("k1", "abs", "k2"):
        assert fastalign.kl_penalty(logp, ref, kind=kind, backend=backend).isfinite().all()
    # a small log-ratio keeps the exact k3 and its gradient: d/dlogp (e^x - x - 1) = 1 - e^x
    lp = torch.tensor([-1.0], device=device, requires_grad=True)
    ref1 = torch.tensor([-1.25], device=device)
    fastalign.kl_penalty(lp, ref1, kind="k3", backend=backend).backward()
    want = torch.tensor([1 - math.exp(-0.25)], dtype=torch.float64)
    assert_within(lp.grad, want, _kl_bounds(lp, ref1, "k3", torch.ones(1))[1], "k3 gradient at d = 0.25")


def test_kl_bad_inputs():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    kl = fastalign.kl_penalty
    with pytest.raises(ValueError, match=r"kind must be one of \('k1', 'abs', 'k2', 'k3'\), got 'k4'"):
        kl(a, b, kind="k4")
    with pytest.raises(ValueError, match="ref_logprobs must have the shape of logprobs"):
        kl(a, b[:, :2])
    with pytest.raises(TypeError, match="logprobs must be float32"):
        kl(a.long(), b)
    with pytest.raises(TypeError, match="ref_logprobs must be float32"):
        kl(a, b.double())
    with pytest.raises(TypeError, match="ref_logprobs must be a tensor"):
        kl(a, 0.5)
    with pytest.raises(ValueError, match="ref_logprobs are on meta but logprobs on cpu"):
        kl(a, b.to("meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        kl(a, b, backend="jax")
    if not fastalign.backends()["cuda"]["usable"]:
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run cpu tensors"):
            kl(a, b, backend="cuda")


# ---- masked_whiten ------------------------------------------------------------------------------


def _trl_masked_whiten(values, mask, shift_mean=True):
    """TRL's / verl's masked_whiten (masked mean, Bessel-corrected masked variance, eps 1e-8)."""
    mask = mask.to(values.dtype)
    mean = (values * mask).sum() / mask.sum()
    centered = values - mean
    variance = (centered**2 * mask).sum() / mask.sum()
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def _holey_mask(shape, device):
    mask = torch.rand(shape, device=device) > 0.3
    mask[0, : shape[1] // 3] = False
    mask[-1, -2:] = False
    return mask


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_trl_forward_and_backward(backend, device, dtype, shift_mean):
    x = (torch.randn(5, 40, device=device) * 3 + 2).to(dtype).requires_grad_()
    mask = _holey_mask((5, 40), device)
    out = fastalign.masked_whiten(x, mask, shift_mean=shift_mean, backend=backend)
    assert out.dtype == torch.float32 and out.shape == x.shape
    x64 = x.detach().double().requires_grad_()
    want = _trl_masked_whiten(x64, mask, shift_mean)
    w = torch.randn(5, 40, device=device)
    e_out, e_grad = _whiten_bounds(x, mask, shift_mean, w)
    assert_within(out, want, e_out, "whiten forward")
    (out * w).sum().backward()
    (want * w.double()).sum().backward()
    assert x.grad.dtype == dtype
    assert_within(x.grad, x64.grad, e_grad + _stored(x64.grad, dtype), "whiten backward")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_whiten_statistics_and_mask_dtypes(backend, device):
    x = torch.randn(3, 50, device=device) * 4 - 1
    mask = _holey_mask((3, 50), device)
    out = fastalign.masked_whiten(x, mask, backend=backend)
    e_out, _ = _whiten_bounds(x, mask)
    # mean and std of the whitened entries, taken in fp64 (their own error is ~2^-29 of the bounds):
    # exactly 0 and sqrt(var / (var + eps)) for the exact output; the computed one is within e_out
    # entry by entry, so its mean within mean(e_out) and its std within ||e_out|| / sqrt(n - 1)
    # (centring is a projection, the std a norm)
    sel, e_sel = out[mask].double().cpu(), e_out[mask.cpu()]
    n = sel.numel()
    x64 = x.double()[mask].cpu()
    var = x64.var(unbiased=True)
    assert_within(sel.mean(), torch.tensor(0.0), e_sel.mean(), "mean of the whitened entries")
    assert_within(sel.std(unbiased=True), (var / (var + 1e-8)).sqrt(), e_sel.square().sum().div(n - 1).sqrt(),
                  "std of the whitened entries")
    # the formula is applied outside the mask as well (as TRL and verl do)
    want = (x.double().cpu() - x64.mean()) * (var + 1e-8).rsqrt()
    assert_within(out[~mask], want[~mask.cpu()], e_out[~mask.cpu()], "whitened entries outside the mask")
    for m in (mask.to(torch.uint8), mask.long(), mask.float() * 0.5, mask.double()):
        torch.testing.assert_close(fastalign.masked_whiten(x, m, backend=backend), out, rtol=0, atol=0)
    # shift_mean=False: same scale (the same computed out, the same code on the same inputs), mean
    # kept: out + mean^, where mean^ errs by e_mu = gamma(n) mean|x| and the add rounds once
    kept = fastalign.masked_whiten(x, mask, shift_mean=False, backend=backend)
    e_mu = gamma(n) * x64.abs().mean()
    assert_within(kept, out.double().cpu() + x64.mean(),
                  e_mu + gamma(1) * (out.double().cpu().abs() + x64.mean().abs() + e_mu), "shift_mean=False")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_whiten_fewer_than_two_entries_is_finite(backend, device):
    x = torch.randn(2, 6, device=device, requires_grad=True)
    none = torch.zeros(2, 6, dtype=torch.bool, device=device)
    # exact by design: a sum of zeros (and of one value) is exact, x - 0, x * 1 and the same
    # subtraction x - x[1, 3] as the right-hand side are the same IEEE operations
    out = fastalign.masked_whiten(x, none, backend=backend)  # mean 0, scale 1: x itself
    assert torch.equal(out, x.detach())
    one = none.clone()
    one[1, 3] = True
    out = fastalign.masked_whiten(x, one, backend=backend)  # scale 1: x - x[1, 3]
    assert torch.equal(out, x.detach() - x.detach()[1, 3])
    assert out[1, 3] == 0
    # (x - m) + m: two roundings, u |x - m| + u |x| (not exact: x - m may round)
    xd = x.detach().double()
    assert_within(fastalign.masked_whiten(x, one, shift_mean=False, backend=backend), xd,
                  gamma(2) * ((xd - xd[1, 3]).abs() + xd.abs()), "x - m + m")
    out.sum().backward()
    assert x.grad.isfinite().all()
    # all masked entries equal: variance 0, finite thanks to eps (> 0 enforced)
    const = torch.full((2, 6), 3.0, device=device)
    assert (fastalign.masked_whiten(const, one | ~one, backend=backend) == 0).all()
    empty = fastalign.masked_whiten(torch.zeros(0, 4, device=device), torch.zeros(0, 4, device=device), backend=backend)
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_whiten_nan_outside_mask_stays_local(backend, device):
    x = torch.randn(2, 8, device=device)
    mask = torch.ones(2, 8, dtype=torch.bool, device=device)
    mask[0, 2] = False
    x[0, 2] = float("nan")
    out = fastalign.masked_whiten(x, mask, backend=backend)
    # forward only: the statistics ignore the entry; the gradient is the formula's, and the
    # NaN entry's x - mean enters d(out)/d(scale), as in any composed implementation
    assert out[0, 2].isnan() and out[mask].isfinite().all()
    x64 = x.double()[mask].cpu()
    want = (x64 - x64.mean()) * (x64.var(unbiased=True) + 1e-8).rsqrt()
    assert_within(out[mask], want, _whiten_bounds(x, mask)[0][mask.cpu()], "whitened entries beside a NaN")


def test_whiten_bad_inputs():
    x, m = torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)
    w = fastalign.masked_whiten
    with pytest.raises(ValueError, match=r"mask must have the shape of x \(2, 3\)"):
        w(x, m[:, :2])
    with pytest.raises(TypeError, match="x must be float32"):
        w(x.long(), m)
    with pytest.raises(TypeError, match="mask must be bool or a real"):
        w(x, m.to(torch.complex64))
    with pytest.raises(TypeError, match="mask must be a tensor"):
        w(x, None)
    with pytest.raises(ValueError, match="mask is on meta but x on cpu"):
        w(x, m.to("meta"))
    # 1e-300 / 1e300 are finite in Python but 0 / inf in fp32 (NaN, or all-zero output, before)
    for eps in (0.0, -1e-8, float("nan"), float("inf"), True, 1e-300, 1e300):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            w(x, m, eps=eps)
    with pytest.raises(ValueError, match="backend must be one of"):
        w(x, m, backend="jax")


# ---- torch.compile ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if "triton-cpu" not in p.id])
def test_torch_compile_fullgraph(backend, device):
    def step(logp, ref, adv, mask):
        kl = fastalign.kl_penalty(logp, ref, kind="k3", backend=backend)
        white = fastalign.masked_whiten(adv, mask, backend=backend)
        return (kl * mask).sum() + (white * logp).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    logp = (-torch.rand(3, 9, device=device) * 4).requires_grad_()
    ref = -torch.rand(3, 9, device=device) * 4
    adv = torch.randn(3, 9, device=device)
    mask = _holey_mask((3, 9), device)
    got = compiled(logp, ref, adv, mask)
    got.backward()
    lp2 = logp.detach().clone().requires_grad_()
    want = step(lp2, ref, adv, mask)
    want.backward()
    # two fp32 evaluations (inductor fuses and reorders on a GPU): twice one evaluation's bound.
    # One evaluation: each k3 and whitened entry within its bound, the products white * logp one
    # rounding, the two N-term sums and their sum gamma(N + 1) of the magnitudes; the gradient
    # mask * dk3/dlogp + white, one addition
    m = mask.double().cpu()
    lp, white = logp.detach().double().cpu(), _trl_masked_whiten(adv.double().cpu(), mask.cpu())
    k3 = _kl_formula(lp, ref.double().cpu(), "k3")
    e_k3, e_gk3 = _kl_bounds(logp.cpu(), ref.cpu(), "k3", m)
    e_white, _ = _whiten_bounds(adv, mask)
    e_prod = lp.abs() * e_white + gamma(1) * (white * lp).abs()
    n = lp.numel()
    e_loss = (m * e_k3).sum() + e_prod.sum() + gamma(n + 1) * ((m * k3).abs().sum() + (white * lp).abs().sum())
    assert_within(got, want, 2 * e_loss, "compiled loss")
    g_k3 = m * (1 - (lp - ref.double().cpu()).neg().exp())
    e_grad = e_gk3 + e_white + gamma(1) * (g_k3.abs() + white.abs())
    assert_within(logp.grad, lp2.grad, 2 * e_grad, "compiled gradient")


@pytest.mark.skipif(fastalign.backends()["cuda"]["usable"], reason="needs a machine where cuda is unusable")
def test_environment_backend_is_validated(monkeypatch):
    # FASTALIGN_BACKEND replaces "auto" here too: an unusable backend fails like an explicit one
    x = torch.randn(2, 3)
    monkeypatch.setenv("FASTALIGN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run cpu tensors"):
        fastalign.kl_penalty(x, x)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run cpu tensors"):
        fastalign.masked_whiten(x, x > 0)
    monkeypatch.setenv("FASTALIGN_BACKEND", "torch")
    assert torch.equal(fastalign.kl_penalty(x, x), torch.zeros(2, 3))  # x - x = 0 exactly
