"""kl_penalty and masked_whiten: composed torch ops (the same code on every backend), checked
against independent formulas (TRL's/verl's, written out locally from their code), forward and
backward, plus edge cases, errors and torch.compile."""

import pytest
import torch

import fastalign
from tests.conftest import TOL, backend_params

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


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
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    w = torch.randn(4, 33, device=device)
    (out * w).sum().backward()
    (want * w.double()).sum().backward()
    assert logp.grad.dtype == dtype and ref.grad.dtype == dtype
    torch.testing.assert_close(logp.grad.double(), lp64.grad, **TOL[dtype])
    torch.testing.assert_close(ref.grad.double(), ref64.grad, **TOL[dtype])


def test_kl_hand_values():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    kl = fastalign.kl_penalty
    assert kl(logp, ref, kind="k1").tolist() == [0.5, -1.0, 0.0]
    assert kl(logp, ref, kind="abs").tolist() == [0.5, 1.0, 0.0]
    assert kl(logp, ref, kind="k2").tolist() == [0.125, 0.5, 0.0]
    k3 = kl(logp, ref, kind="k3")  # x = ref - logp = (-0.5, 1, 0)
    expected = torch.tensor([torch.e**-0.5 + 0.5 - 1, torch.e - 2, 0.0])
    torch.testing.assert_close(k3, expected)
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
    fastalign.kl_penalty(lp, torch.tensor([-1.25], device=device), kind="k3", backend=backend).backward()
    torch.testing.assert_close(lp.grad, 1 - torch.exp(torch.tensor([-0.25], device=device)))


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
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    w = torch.randn(5, 40, device=device)
    (out * w).sum().backward()
    (want * w.double()).sum().backward()
    assert x.grad.dtype == dtype
    # the dtype's own tolerance: over 400 seeded runs fp32 needed atol ~3e-8 beyond rtol (the old
    # atol=1e-4 was ~3000x looser than the error), bf16/fp16 none beyond their rtol
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_whiten_statistics_and_mask_dtypes(backend, device):
    x = torch.randn(3, 50, device=device) * 4 - 1
    mask = _holey_mask((3, 50), device)
    out = fastalign.masked_whiten(x, mask, backend=backend)
    sel = out[mask]
    torch.testing.assert_close(sel.mean(), torch.tensor(0.0, device=device), rtol=0, atol=1e-5)
    torch.testing.assert_close(sel.std(unbiased=True), torch.tensor(1.0, device=device), rtol=1e-5, atol=1e-5)
    # the formula is applied outside the mask as well (as TRL and verl do)
    mean, std = x[mask].mean(), x[mask].std(unbiased=True)
    torch.testing.assert_close(out[~mask], (x[~mask] - mean) / std, rtol=1e-5, atol=1e-5)
    for m in (mask.to(torch.uint8), mask.long(), mask.float() * 0.5, mask.double()):
        torch.testing.assert_close(fastalign.masked_whiten(x, m, backend=backend), out, rtol=0, atol=0)
    # shift_mean=False: same scale, mean kept
    kept = fastalign.masked_whiten(x, mask, shift_mean=False, backend=backend)
    torch.testing.assert_close(kept, out + mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_whiten_fewer_than_two_entries_is_finite(backend, device):
    x = torch.randn(2, 6, device=device, requires_grad=True)
    none = torch.zeros(2, 6, dtype=torch.bool, device=device)
    out = fastalign.masked_whiten(x, none, backend=backend)  # mean 0, scale 1: x itself
    torch.testing.assert_close(out, x.detach())
    one = none.clone()
    one[1, 3] = True
    out = fastalign.masked_whiten(x, one, backend=backend)  # scale 1: x - x[1, 3]
    torch.testing.assert_close(out, x.detach() - x.detach()[1, 3])
    assert out[1, 3] == 0
    torch.testing.assert_close(fastalign.masked_whiten(x, one, shift_mean=False, backend=backend), x.detach())
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
    torch.testing.assert_close(out[mask], (x[mask] - x[mask].mean()) / x[mask].std(), rtol=1e-5, atol=1e-5)


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
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(logp.grad, lp2.grad)


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
    torch.testing.assert_close(fastalign.kl_penalty(x, x), torch.zeros(2, 3))
