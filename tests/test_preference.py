"""Preference ops (sequence_logps, dpo_loss, dpo_loss_from_tokens, reward_loss) on every backend
against kernels/reference.py, against hand-computed values of the published formulas, and the
fused token path against the composed ops."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastalign
from fastalign.kernels import reference
from fastalign.ops import preference as P
from tests.conftest import TOL, backend_params, requires_nvidia_compiler, run_triton_compile_script

BACKENDS = backend_params()
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# values computed in fp32 from (rounded) inputs on both sides: the error is fp32 arithmetic only
F32 = dict(rtol=1e-5, atol=1e-5)


def _mask(rows, steps, device):
    """Random holes, a row of length 0, a full row."""
    m = torch.rand(rows, steps, device=device) > 0.3
    if rows >= 2:
        m[1] = False
    m[0] = True
    return m


def _grad(out, inputs, seed_grad):
    return torch.autograd.grad(out, inputs, seed_grad, allow_unused=True)


# ---- sequence_logps ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (4, 7), (3, 1100), (2, 3, 9)])
def test_sequence_logps_matches_reference(backend, device, dtype, reduce, shape):
    x = (-3 * torch.rand(shape, device=device)).to(dtype).requires_grad_()
    m = _mask(math.prod(shape[:-1]), shape[-1], device).reshape(shape)
    out = fastalign.sequence_logps(x, m, reduce=reduce, backend=backend)
    ref = reference.sequence_logps(x, m, reduce == "mean")
    assert out.dtype == torch.float32 and out.shape == shape[:-1]
    tol = dict(rtol=1e-5, atol=1e-5 * math.sqrt(shape[-1]))
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn(shape[:-1], device=device)
    (gx,) = _grad(out, x, g)
    (gr,) = _grad(ref, x, g)
    assert gx.dtype == dtype
    torch.testing.assert_close(gx, gr, **TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sequence_logps_empty_rows_nan_at_masked_and_mask_dtypes(backend, device):
    x = torch.randn(3, 6, device=device)
    x[0, 2] = float("nan")
    x[1, :] = float("-inf")
    m = torch.ones(3, 6, device=device)
    m[0, 2] = 0
    m[1] = 0  # no valid token: 0 for sum and for mean, never NaN
    for reduce in ("sum", "mean"):
        out = fastalign.sequence_logps(x, m, reduce=reduce, backend=backend)
        assert out[0].isfinite() and out[1] == 0
        # nonzero is valid, whatever the mask dtype (the mask selects, it does not weight)
        for mm in (m.bool(), m.long(), 0.5 * m, m.to(torch.uint8)):
            torch.testing.assert_close(fastalign.sequence_logps(x, mm, reduce=reduce, backend=backend), out, rtol=0,
                                       atol=0)
    x = x.requires_grad_()
    out = fastalign.sequence_logps(x, m, reduce="mean", backend=backend)
    (g,) = _grad(out.sum(), x, None)
    assert g[1].eq(0).all() and g[0, 2] == 0 and g[0, 0] == pytest.approx(1 / 5)
    assert fastalign.sequence_logps(torch.zeros(0, 4, device=device), torch.ones(0, 4, device=device),
                                    backend=backend).shape == (0,)
    assert fastalign.sequence_logps(torch.zeros(2, 0, device=device), torch.ones(2, 0, device=device),
                                    reduce="mean", backend=backend).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sequence_logps_non_contiguous_and_inputs_untouched(backend, device):
    x = torch.randn(9, 4, device=device).t()  # [4, 9]
    m = _mask(9, 4, device).t()
    snap = x.clone(), m.clone()
    out = fastalign.sequence_logps(x, m, backend=backend)
    torch.testing.assert_close(out, reference.sequence_logps(x, m), **F32)
    assert torch.equal(x, snap[0]) and torch.equal(m, snap[1])


# ---- dpo_loss ---------------------------------------------------------------------------------


def _pairs(n, device, dtype, scale=5.0):
    return [(-scale * torch.rand(n, device=device)).to(dtype).requires_grad_() for _ in range(4)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_dpo_loss_matches_reference(backend, device, dtype, loss_type, eps):
    ins = _pairs(37, device, dtype)
    for beta in (0.1, 2.0):
        out = fastalign.dpo_loss(*ins, beta=beta, loss_type=loss_type, label_smoothing=eps, backend=backend)
        ref = reference.dpo_loss(*ins, beta, loss_type, eps)
        for o, r in zip(out, ref):
            assert o.dtype == torch.float32 and o.shape == (37,)
            torch.testing.assert_close(o, r, **F32)
        assert not out[1].requires_grad and not out[2].requires_grad
        g = torch.randn(37, device=device)
        got, want = _grad(out[0], ins, g), _grad(ref[0], ins, g)
        for a, b in zip(got, want):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dpo_loss_hand_computed(backend, device):
    # beta = 0.5. Pair 0: c=-1, r=-3, ref_c=-2, ref_r=-2.5 -> delta = 1 - (-0.5) = 1.5, x = 0.75.
    # Pair 1: c=-4, r=-1, ref_c=-3, ref_r=-2 -> delta = -1 - 1 = -2, x = -1.
    # Values from the published formulas with Python's math module (logsig(x) = -log1p(exp(-x))):
    #   sigmoid = -(1-e) logsig(x) - e logsig(-x); robust = (-(1-e) logsig(x) + e logsig(-x))/(1-2e)
    #   ipo = (delta - 1/(2 beta))^2 = (1.5-1)^2, (-2-1)^2; hinge = relu(1 - x) = 0.25, 2
    expected = {
        ("sigmoid", 0.0): [0.38687100611489994, 1.3132616875182228],
        ("sigmoid", 0.1): [0.46187100611489995, 1.2132616875182227],
        ("sigmoid", 0.3): [0.6118710061149, 1.0132616875182228],
        ("robust", 0.0): [0.38687100611489994, 1.3132616875182228],
        ("robust", 0.1): [0.2931210061148999, 1.4382616875182226],
        ("robust", 0.3): [-0.1756289938851001, 2.063261687518222],
        ("ipo", 0.0): [0.25, 9.0],
        ("ipo", 0.3): [0.25, 9.0],  # label smoothing does not enter ipo
        ("hinge", 0.0): [0.25, 2.0],
    }
    t = lambda *v: torch.tensor(v, device=device)  # noqa: E731
    c, r, rc, rr = t(-1.0, -4.0), t(-3.0, -1.0), t(-2.0, -3.0), t(-2.5, -2.0)
    for (loss_type, eps), want in expected.items():
        losses, cw, rw = fastalign.dpo_loss(c, r, rc, rr, beta=0.5, loss_type=loss_type, label_smoothing=eps,
                                            backend=backend)
        torch.testing.assert_close(losses, t(*want), rtol=1e-6, atol=1e-6)
        assert cw.tolist() == [0.5, -0.5] and rw.tolist() == [-0.25, 0.5]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dpo_loss_huge_margins_finite_with_right_asymptotes(backend, device, loss_type, dtype):
    # beta * delta = +-1e4, +-100, +-30, 0 (beta = 1): logsig must not overflow.
    x = torch.tensor([1e4, -1e4, 100.0, -100.0, 30.0, -30.0, 0.0], device=device)
    z = torch.zeros_like(x)
    c = x.to(dtype).requires_grad_()
    eps = 0.2
    losses, _, _ = fastalign.dpo_loss(c, z.to(dtype), z.to(dtype), z.to(dtype), beta=1.0, loss_type=loss_type,
                                      label_smoothing=eps, backend=backend)
    (g,) = _grad(losses.sum(), c, None)
    assert losses.isfinite().all() and g.isfinite().all()
    xs = x.to(dtype).float()
    if loss_type == "sigmoid":  # L -> (1-e)*(-x) for x -> -inf, e*x for x -> +inf
        want = torch.where(xs > 0, eps * xs, -(1 - eps) * xs)
        gwant = torch.where(xs > 0, eps, -(1 - eps))
    elif loss_type == "robust":  # L -> -(1-e) x/(1-2e) for x -> -inf, -e x/(1-2e) for x -> +inf
        want = torch.where(xs > 0, -eps * xs, -(1 - eps) * xs) / (1 - 2 * eps)
        gwant = torch.where(xs > 0, -eps, -(1 - eps)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        want, gwant = (xs - 0.5) ** 2, 2 * (xs - 0.5)
    else:
        want, gwant = torch.relu(1 - xs), torch.where(xs < 1, -1.0, 0.0)
    big = xs.abs() >= 100
    torch.testing.assert_close(losses[big], want[big], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[big].float(), gwant[big], **TOL[dtype])  # the gradient is rounded to dtype
    ref = reference.dpo_loss(c, z, z, z, 1.0, loss_type, eps)[0]
    torch.testing.assert_close(losses, ref, **F32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dpo_loss_fp16_long_sequences_no_nan_rewards(backend, device):
    # fp16 sequence log-probs of long responses: the margin (c - ref_c) - (r - ref_r) = -128000
    # overflows fp16 (max 65504); in fp32 it is exact, and the loss is finite (-logsig(-12800)).
    h = lambda *v: torch.tensor(v, device=device, dtype=torch.float16)  # noqa: E731
    c, rc, r, rr = h(-64992.0), h(-992.0), h(-992.0), h(-64992.0)  # exact fp16 values
    for loss_type in LOSS_TYPES:
        losses, cw, rw = fastalign.dpo_loss(c, r, rc, rr, beta=0.1, loss_type=loss_type, backend=backend)
        assert losses.isfinite().all()
        assert cw.tolist() == [pytest.approx(-6400.0)] and rw.tolist() == [pytest.approx(6400.0)]
    losses, _, _ = fastalign.dpo_loss(c, r, rc, rr, beta=0.1, backend=backend)
    assert losses.item() == pytest.approx(12800.0, rel=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dpo_loss_mixed_dtypes_non_contiguous_and_ref_grads(backend, device):
    base = torch.randn(4, 10, device=device)
    c = base[0, ::2].requires_grad_(False).clone().requires_grad_()  # fp32
    r = base[1, ::2].to(torch.bfloat16).requires_grad_()
    rc, rr = base[2, ::2], base[3, ::2]  # non-contiguous, no grad (frozen reference)
    out = fastalign.dpo_loss(c, r, rc, rr, beta=0.3, backend=backend)
    ref = reference.dpo_loss(c, r, rc, rr, 0.3, "sigmoid", 0.0)
    torch.testing.assert_close(out[0], ref[0], **F32)
    gc, gr = _grad(out[0].sum(), (c, r), None)
    assert gc.dtype == torch.float32 and gr.dtype == torch.bfloat16
    torch.testing.assert_close(gr.float(), -gc, **TOL[torch.bfloat16])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dpo_loss_nan_propagates(backend, device):
    c = torch.tensor([float("nan"), -1.0], device=device)
    z = torch.zeros(2, device=device)
    for loss_type in LOSS_TYPES:
        losses, cw, _ = fastalign.dpo_loss(c, z, z, z, loss_type=loss_type, backend=backend)
        assert losses[0].isnan() and cw[0].isnan() and losses[1].isfinite()


# ---- the fused DPO head: dpo_loss_from_tokens -------------------------------------------------


def _tokens(pairs, steps, device, dtype):
    pol = (-3 * torch.rand(2 * pairs, steps, device=device)).to(dtype).requires_grad_()
    ref = (pol.detach().float() + 0.3 * torch.randn(2 * pairs, steps, device=device)).to(dtype)
    lengths = torch.randint(0, steps + 1, (2 * pairs,), device=device)
    lengths[0] = steps
    mask = torch.arange(steps, device=device)[None, :] < lengths[:, None]
    mask[:, 0] &= torch.rand(2 * pairs, device=device) > 0.5  # prompt-like leading holes
    return pol, ref, mask


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("average", [False, True])
def test_fused_tokens_equal_composed_ops(backend, device, dtype, loss_type, average):
    pol, ref, mask = _tokens(5, 19, device, dtype)
    kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=0.1, backend=backend)
    out = fastalign.dpo_loss_from_tokens(pol, ref, mask, average_log_prob=average, return_sequence_logps=True, **kw)
    reduce = "mean" if average else "sum"
    pseq = fastalign.sequence_logps(pol, mask, reduce=reduce, backend=backend)
    rseq = fastalign.sequence_logps(ref, mask, reduce=reduce, backend=backend)
    comp = fastalign.dpo_loss(pseq[:5], pseq[5:], rseq[:5], rseq[5:], **kw)
    # same sums, same pair math: bit-identical on one backend
    for a, b in zip(out, (*comp, pseq, rseq)):
        assert torch.equal(a, b)
    g, gs = torch.randn(5, device=device), torch.randn(10, device=device)
    (got,) = _grad((out[0] * g).sum() + (out[3] * gs).sum(), pol, None)
    (want,) = _grad((comp[0] * g).sum() + (pseq * gs).sum(), pol, None)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    # and against the reference composition
    ref_p = reference.sequence_logps(pol, mask, average)
    ref_r = reference.sequence_logps(ref, mask, average)
    ref_out = reference.dpo_loss(ref_p[:5], ref_p[5:], ref_r[:5], ref_r[5:], 0.2, loss_type, 0.1)
    tol = dict(rtol=1e-5, atol=1e-4 if loss_type == "ipo" else 1e-5)
    for a, b in zip(out[:3], ref_out):
        torch.testing.assert_close(a, b, **tol)
    (want_ref,) = _grad((ref_out[0] * g).sum() + (ref_p * gs).sum(), pol, None)
    torch.testing.assert_close(got, want_ref, **TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fused_tokens_long_rows_and_defaults(backend, device):
    pol, ref, mask = _tokens(2, 1500, device, torch.float32)
    losses, cw, rw = fastalign.dpo_loss_from_tokens(pol, ref, mask, backend=backend)
    p, q = reference.sequence_logps(pol, mask), reference.sequence_logps(ref, mask)
    want = reference.dpo_loss(p[:2], p[2:], q[:2], q[2:], 0.1, "sigmoid", 0.0)
    for a, b in zip((losses, cw, rw), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    (g,) = _grad(losses.sum(), pol, None)
    (gw,) = _grad(want[0].sum(), pol, None)
    torch.testing.assert_close(g, gw, **F32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fused_tokens_ref_gets_no_grad_and_inputs_untouched(backend, device):
    pol, ref, mask = _tokens(3, 8, device, torch.float32)
    ref = ref.requires_grad_()
    snaps = pol.detach().clone(), ref.detach().clone(), mask.clone()
    losses, _, _ = fastalign.dpo_loss_from_tokens(pol, ref, mask, backend=backend)
    gp, gr = _grad(losses.sum(), (pol, ref), None)
    assert gr is None and gp is not None
    for t, s in zip((pol, ref, mask), snaps):
        assert torch.equal(t.detach(), s)
    # mixed dtypes run in fp32
    out = fastalign.dpo_loss_from_tokens(pol.to(torch.bfloat16), ref.detach(), mask, backend=backend)
    want = fastalign.dpo_loss_from_tokens(pol.to(torch.bfloat16).float(), ref.detach(), mask, backend="torch")
    torch.testing.assert_close(out[0], want[0], **F32)


# ---- loss-type registry (plugins) ---------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_registered_loss_type_runs_on_every_backend(backend, device):
    name = "test_simpo_like"
    if name not in P.DPO_LOSS_TYPES:
        fastalign.register_dpo_loss_type(name, lambda d, beta, eps: -F.logsigmoid(beta * d - 0.5))
    ins = _pairs(6, device, torch.float32)
    out = fastalign.dpo_loss(*ins, beta=2.0, loss_type=name, backend=backend)
    d = (ins[0] - ins[2]) - (ins[1] - ins[3])
    want = -F.logsigmoid(2.0 * d - 0.5)
    torch.testing.assert_close(out[0], want, **F32)
    (g,) = _grad(out[0].sum(), ins[0], None)
    (gw,) = _grad(want.sum(), ins[0], None)
    torch.testing.assert_close(g, gw, **F32)
    pol, ref, mask = _tokens(3, 7, device, torch.float32)
    got = fastalign.dpo_loss_from_tokens(pol, ref, mask, beta=2.0, loss_type=name, average_log_prob=True,
                                         backend=backend)
    p, q = reference.sequence_logps(pol, mask, True), reference.sequence_logps(ref, mask, True)
    want = -F.logsigmoid(2.0 * ((p[:3] - q[:3]) - (p[3:] - q[3:])) - 0.5)
    torch.testing.assert_close(got[0], want, **F32)
    with pytest.raises(ValueError, match="exists"):
        fastalign.register_dpo_loss_type(name, lambda d, beta, eps: d)
    with pytest.raises(ValueError, match="built-in"):
        fastalign.register_dpo_loss_type("sigmoid", lambda d, beta, eps: d, overwrite=True)


# ---- reward_loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reward_loss(backend, device, dtype):
    c = torch.randn(9, device=device).to(dtype).requires_grad_()
    r = torch.randn(9, device=device).to(dtype).requires_grad_()
    for margin in (None, 0.5, torch.rand(9, device=device)):
        loss = fastalign.reward_loss(c, r, margin=margin, backend=backend)
        m = 0.0 if margin is None else margin
        want = -F.logsigmoid(c.float() - r.float() - m).mean()
        assert loss.dtype == torch.float32 and loss.shape == ()
        torch.testing.assert_close(loss, want, **F32)
        gc, gr = _grad(loss, (c, r), None)
        wc, wr = _grad(want, (c, r), None)
        torch.testing.assert_close(gc, wc, **TOL[dtype])
        torch.testing.assert_close(gr, wr, **TOL[dtype])
    # hand-computed: -logsig(0.5) = 0.4740769841801067; mean(-logsig(2), -logsig(-1)) = 0.7200948492805976
    t = lambda *v: torch.tensor(v, device=device)  # noqa: E731
    assert fastalign.reward_loss(t(1.0), t(0.5), backend=backend).item() == pytest.approx(0.4740769841801067, 1e-6)
    assert fastalign.reward_loss(t(3.0, 0.0), t(0.0, 0.5), margin=t(1.0, 0.5), backend=backend).item() == \
        pytest.approx(0.7200948492805976, 1e-6)
    assert fastalign.reward_loss(t(1e4, -1e4), t(0.0, 0.0), backend=backend).item() == pytest.approx(5e3, 1e-6)


# ---- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend, device):
    c, r, rc, rr = (torch.randn(4, device=device) for _ in range(4))
    d = fastalign.dpo_loss
    with pytest.raises(ValueError, match="rejected_logps must have the shape of chosen_logps"):
        d(c, r[:3], rc, rr, backend=backend)
    with pytest.raises(ValueError, match="ref_rejected_logps must have the shape"):
        d(c, r, rc, rr[:2], backend=backend)
    with pytest.raises(ValueError, match=r"chosen_logps must be 1-D \[B\]"):
        d(c[None], r[None], rc[None], rr[None], backend=backend)
    with pytest.raises(TypeError, match="ref_chosen_logps must be float32"):
        d(c, r, rc.long(), rr, backend=backend)
    with pytest.raises(TypeError, match="chosen_logps must be a tensor"):
        d([1.0] * 4, r, rc, rr, backend=backend)
    for beta in (0, -0.1, float("inf"), float("nan"), True, "0.1", None):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            d(c, r, rc, rr, beta=beta, backend=backend)
    for eps in (-0.1, 0.5, 0.7, float("nan"), None):
        with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 0.5\)"):
            d(c, r, rc, rr, label_smoothing=eps, backend=backend)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'; valid choices: sigmoid, ipo, hinge, robust"):
        d(c, r, rc, rr, loss_type="kto", backend=backend)
    x, m = torch.randn(4, 5, device=device), torch.ones(4, 5, device=device)
    s = fastalign.sequence_logps
    with pytest.raises(ValueError, match="mask must have the shape of token_logps"):
        s(x, m[:, :4], backend=backend)
    with pytest.raises(ValueError, match="reduce must be 'sum' or 'mean'"):
        s(x, m, reduce="max", backend=backend)
    with pytest.raises(TypeError, match="token_logps must be float32"):
        s(x.double(), m, backend=backend)
    with pytest.raises(TypeError, match="mask must be bool or a real"):
        s(x, m.to(torch.complex64), backend=backend)
    t = fastalign.dpo_loss_from_tokens
    with pytest.raises(ValueError, match="even number of rows"):
        t(x[:3], x[:3], m[:3], backend=backend)
    with pytest.raises(ValueError, match="ref_token_logps must have the shape"):
        t(x, x[:, :4], m, backend=backend)
    with pytest.raises(ValueError, match=r"must be 2-D \[2B, T\]"):
        t(x[0], x[0], m[0], backend=backend)
    with pytest.raises(ValueError, match="unknown loss_type"):
        t(x, x, m, loss_type="nope", backend=backend)
    with pytest.raises(ValueError, match="label_smoothing"):
        t(x, x, m, label_smoothing=0.5, backend=backend)
    rl = fastalign.reward_loss
    with pytest.raises(ValueError, match="rejected_scores must have the shape of chosen_scores"):
        rl(c, r[:2], backend=backend)
    with pytest.raises(ValueError, match="margin must have the shape"):
        rl(c, r, margin=r[:2], backend=backend)
    with pytest.raises(TypeError, match="margin must be None, a finite number or a tensor"):
        rl(c, r, margin="1", backend=backend)
    with pytest.raises(ValueError, match="chosen_scores is empty"):
        rl(c[:0], r[:0], backend=backend)


def test_device_mismatch_and_backend_errors():
    c = torch.randn(3)
    with pytest.raises(ValueError, match="ref_rejected_logps is on meta but chosen_logps on cpu"):
        fastalign.dpo_loss(c, c, c, c.to("meta"))
    with pytest.raises(ValueError, match="mask is on meta"):
        fastalign.sequence_logps(c[None], torch.ones(1, 3, device="meta"))
    for fn, args in ((fastalign.dpo_loss, (c, c, c, c)), (fastalign.reward_loss, (c, c)),
                     (fastalign.sequence_logps, (c[None], c[None]))):
        with pytest.raises(ValueError, match="backend must be one of"):
            fn(*args, backend="jax")
        if not fastalign.backends()["cuda"]["usable"]:
            with pytest.raises(RuntimeError, match="backend 'cuda' cannot run cpu tensors"):
                fn(*args, backend="cuda")


# ---- opcheck and torch.compile ----------------------------------------------------------------


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "torch-cpu"])
def test_opcheck(backend, device):
    seq_f, seq_b = P._SEQ[backend]
    dpo_f, dpo_b = P._DPO[backend]
    tok_f, tok_b = P._TOK[backend]
    x = torch.randn(4, 6, device=device, requires_grad=True)
    q = torch.randn(4, 6, device=device)
    m = _mask(4, 6, device)
    torch.library.opcheck(seq_f, (x, m, False))
    torch.library.opcheck(seq_f, (x, m, True))
    torch.library.opcheck(seq_b, (torch.randn(4, device=device), x.detach(), m, True))
    ins = [torch.randn(3, device=device, requires_grad=True) for _ in range(4)]
    for lt in range(4):
        torch.library.opcheck(dpo_f, (*ins, 0.5, lt, 0.1))
    torch.library.opcheck(dpo_b, (torch.randn(3, device=device), *(t.detach() for t in ins), 0.5, 0, 0.1))
    torch.library.opcheck(tok_f, (x, q, m, 0.5, 0, 0.1, False))
    torch.library.opcheck(tok_f, (x, q, m, 0.5, 3, 0.2, True))
    if backend == "cpp":  # the cpp kernels also take float and int64 masks as they are
        torch.library.opcheck(seq_f, (x, m.float(), True))
        torch.library.opcheck(tok_f, (x, q, m.long(), 0.5, 0, 0.1, False))
    pseq, rseq = torch.randn(4, device=device), torch.randn(4, device=device)
    torch.library.opcheck(tok_b, (torch.randn(2, device=device), None, pseq, rseq, x.detach(), m, 0.5, 1, 0.0, True))
    torch.library.opcheck(tok_b, (torch.randn(2, device=device), torch.randn(4, device=device), pseq, rseq,
                                  x.detach(), m, 0.5, 2, 0.0, False))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    def step(pol, ref, mask):
        losses, cw, rw = fastalign.dpo_loss_from_tokens(pol, ref, mask, beta=0.1, loss_type="robust",
                                                        label_smoothing=0.1, backend=backend)
        seq = fastalign.sequence_logps(pol, mask, reduce="mean", backend=backend)
        l2, _, _ = fastalign.dpo_loss(seq[:3], seq[3:], cw, rw, beta=0.5, loss_type="ipo", backend=backend)
        return losses.mean() + l2.mean() + fastalign.reward_loss(cw, rw, margin=0.1, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    pol, ref, mask = _tokens(3, 11, device, torch.float32)
    got, want = compiled(pol, ref, mask), step(pol, ref, mask)
    torch.testing.assert_close(got, want)
    (g1,) = _grad(got, pol, None)
    (g2,) = _grad(want, pol, None)
    torch.testing.assert_close(g1, g2)



_COMPILE_SCRIPT = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from fastalign.kernels.triton import preference as K

def build(kernel, sig, consts, warps=4):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    sig = {name: sig[name] for name in kernel.arg_names}
    src = ASTSource(kernel, sig, constexprs=consts)
    assert compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["cubin"]

loss = {"beta": "fp32", "eps": "fp32", "half_inv_beta": "fp32", "robust_scale": "fp32"}
for dt in ("fp32", "bf16", "fp16"):
    for mean in (False, True):
        build(K._seq_fwd_kernel, {"x_ptr": f"*{dt}", "m_ptr": "*u8", "out_ptr": "*fp32", "T": "i64"},
              {"MEAN": mean, "BLOCK": 1024})
        build(K._seq_bwd_kernel, {"g_ptr": "*fp32", "m_ptr": "*u8", "gx_ptr": f"*{dt}", "T": "i32"},
              {"MEAN": mean, "BLOCK": 16}, 1)
        for lt in range(4):
            build(K._tok_fwd_kernel, dict(p_ptr=f"*{dt}", q_ptr=f"*{dt}", m_ptr="*u8", loss_ptr="*fp32",
                  cw_ptr="*fp32", rw_ptr="*fp32", ps_ptr="*fp32", qs_ptr="*fp32", B="i32", T="i64", **loss),
                  {"LOSS": lt, "MEAN": mean, "BLOCK": 1024})
            for has_gs in (False, True):
                build(K._tok_bwd_kernel, dict(go_ptr="*fp32", gs_ptr="*fp32", ps_ptr="*fp32", qs_ptr="*fp32",
                      m_ptr="*u8", gx_ptr=f"*{dt}", B="i64", T="i32", **loss),
                      {"HAS_GS": has_gs, "LOSS": lt, "MEAN": mean, "BLOCK": 256})
    for lt in range(4):
        p4 = {n: f"*{dt}" for n in ("c_ptr", "r_ptr", "rc_ptr", "rr_ptr")}
        build(K._dpo_fwd_kernel, dict(p4, loss_ptr="*fp32", cw_ptr="*fp32", rw_ptr="*fp32", B="i32", **loss),
              {"LOSS": lt, "BLOCK": 1024})
        build(K._dpo_bwd_kernel, dict(p4, go_ptr="*fp32", g_ptr="*fp32", B="i64", **loss), {"LOSS": lt, "BLOCK": 64})
print("compiled")
"""


@requires_nvidia_compiler
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter does not exercise Triton's compiler (constexpr branches, scalar where, dtype
    # casts on store): compile every kernel specialisation to a cubin for sm_90 in a subprocess.
    run_triton_compile_script(_COMPILE_SCRIPT, timeout=900)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fused_tokens_ignore_nonfinite_masked_positions(backend, device):
    # padding positions may hold garbage (NaN/-inf from a masked log-softmax): never read
    pol, ref, mask = _tokens(3, 10, device, torch.float32)
    mask[:, -3:] = False
    with torch.no_grad():
        pol[:, -3:] = float("nan")
    ref = ref.clone()
    ref[:, -2:] = float("-inf")
    for average in (False, True):
        losses, cw, rw = fastalign.dpo_loss_from_tokens(pol, ref, mask, average_log_prob=average, backend=backend)
        assert losses.isfinite().all() and cw.isfinite().all() and rw.isfinite().all()
        (g,) = _grad(losses.sum(), pol, None)
        assert g.isfinite().all() and g[:, -3:].eq(0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("steps", [3, 16, 19, 1100])
def test_fused_tokens_mask_dtypes_give_identical_results(backend, device, steps):
    # the cpp kernels read bool/uint8/int32/int64/float masks as they are (other backends convert):
    # every dtype must select the same positions, forward and backward, bit for bit
    pol, ref, mask = _tokens(3, steps, device, torch.float32)

    def run(mm, average):
        out = fastalign.dpo_loss_from_tokens(pol, ref, mm, average_log_prob=average, return_sequence_logps=True,
                                             backend=backend)
        (g,) = _grad(out[0].sum() + out[3].sum(), pol, None)
        return (*out, g)

    want = {average: run(mask, average) for average in (False, True)}
    for mm in (mask.to(torch.uint8), mask.int(), mask.long(), mask.float() * 0.25, mask.double()):
        for average in (False, True):
            for a, b in zip(run(mm, average), want[average]):
                assert torch.equal(a, b), (mm.dtype, average)
        (gs,) = _grad(fastalign.sequence_logps(pol, mm, backend=backend).sum(), pol, None)
        assert torch.equal(gs, mask.float()), mm.dtype


def test_cpp_preference_baseline_isa_is_bit_identical():
    """The cpp DPO head runs 8-lane AVX2 clones or 4-lane baseline loops; both keep eight partial
    sums in one order, so FASTALIGN_CPU_CAPABILITY=default (a fresh process: chosen once) gives the
    same bits, forward and backward, for every dtype."""
    if fastalign.backends()["cpp"]["reason"]:
        pytest.skip(fastalign.backends()["cpp"]["reason"])
    code = """
import sys, torch, fastalign
torch.manual_seed(0)
outs = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for steps in (5, 8, 37, 1030):
        pol = (-3 * torch.rand(6, steps)).to(dtype).requires_grad_()
        ref = (-3 * torch.rand(6, steps)).to(dtype)
        mask = torch.rand(6, steps) > 0.3
        for average in (False, True):
            out = fastalign.dpo_loss_from_tokens(pol, ref, mask.long(), average_log_prob=average,
                                                 return_sequence_logps=True, backend="cpp")
            (g,) = torch.autograd.grad(out[0].sum() + out[3].sum(), pol)
            outs += [t.detach() for t in out] + [g]
torch.save(outs, sys.argv[1])
"""
    import os
    import subprocess
    import sys
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for cap in ("default", None):
            env = dict(os.environ)
            env.pop("FASTALIGN_CPU_CAPABILITY", None)
            if cap:
                env["FASTALIGN_CPU_CAPABILITY"] = cap
            path = os.path.join(tmp, f"{cap}.pt")
            out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=300,
                                 env=env, cwd=root)
            assert out.returncode == 0, out.stderr[-3000:]
            results.append(torch.load(path))
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(not fastalign.backends()["cuda"]["usable"], reason="no usable cuda backend")
def test_raw_cuda_backwards_reject_inputs_on_another_device():
    # The dispatcher routes on the token log-probs; the grads and saved sequence log-probs went to
    # the kernels by pointer, so a CPU one was an illegal address on the GPU instead of an error.
    ops = torch.ops.fastalign
    x, m = torch.randn(4, 3, device="cuda"), torch.ones(4, 3, dtype=torch.bool, device="cuda")
    c, seq, g2 = torch.randn(2, device="cuda"), torch.zeros(4, device="cuda"), torch.ones(2, device="cuda")
    with pytest.raises(RuntimeError, match="grad is on cpu"):
        ops.sequence_logps_bwd(torch.ones(4), x, m, False)
    with pytest.raises(RuntimeError, match="grad is on cpu"):
        ops.dpo_loss_bwd(torch.ones(2), c, c, c, c, 0.1, 0, 0.0)
    with pytest.raises(RuntimeError, match="grad is on cpu"):
        ops.dpo_tokens_bwd(torch.ones(2), None, seq, seq, x, m, 0.1, 0, 0.0, False)
    with pytest.raises(RuntimeError, match="policy sequence log-probs is on cpu"):
        ops.dpo_tokens_bwd(g2, None, seq.cpu(), seq, x, m, 0.1, 0, 0.0, False)
    with pytest.raises(RuntimeError, match="reference sequence log-probs is on cpu"):
        ops.dpo_tokens_bwd(g2, None, seq, seq.cpu(), x, m, 0.1, 0, 0.0, False)
    with pytest.raises(RuntimeError, match="grad of the sequence log-probs is on cpu"):
        ops.dpo_tokens_bwd(g2, torch.ones(4), seq, seq, x, m, 0.1, 0, 0.0, False)
