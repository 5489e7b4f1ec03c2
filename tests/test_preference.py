"""Preference ops (sequence_logps, dpo_loss, dpo_loss_from_tokens, reward_loss) on every backend
against kernels/reference.py, against hand-computed values of the published formulas, and the
fused token path against the composed ops.

Error bounds (tests/numerics.py, and the helpers below, each derived in its docstring): every
value is compared with a bound computed in float64 from the test's own inputs, scaled by the
magnitudes that are summed, never fitted to one CPU. A masked row sum of T terms in any order
(8 lane partials, 16-wide vectors, threads) is within gamma(T) sum|x_t| of the exact sum (mean:
gamma(T+1) sum|x_t| / n). The DPO margin delta = (c - ref_c) - (r - ref_r) adds gamma(2) times
the four magnitudes to the errors of its four inputs; x = beta delta adds beta's fp32 rounding
and a product. logsig is 1-Lipschitz (sigmoid 1/4-Lipschitz), so the argument's error passes at
most 1:1 (1/4), plus EXP_ULPS for each exp/log1p and a few roundings. Where two fp32
implementations are compared (kernel vs reference.py), the bound is the sum of both evaluations'
bounds; against an exact float64 value (a hand-computed constant, an asymptote) it is one
evaluation's. Inputs rounded to bf16/fp16 are the same rounded values on both sides (no input
error); a gradient stored in bf16/fp16 adds one rounding u_dtype |g| per side. Comparisons of the
same computation on one backend (fused vs composed forward, mask dtypes, ISA clones) stay exact.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastalign
from fastalign.kernels import reference
from fastalign.ops import preference as P
from tests.conftest import backend_params, requires_nvidia_compiler, run_triton_compile_script
from tests.numerics import EXP_ULPS, assert_within, fn_error, gamma, rounding, unit_roundoff

BACKENDS = backend_params()
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
F32 = torch.float32
U32 = unit_roundoff(F32)
# An fp32 exp/sigmoid result below the normal range is off by at most this much in absolute terms
# (subnormal spacing 2^-149, or flushed to zero): the relative ulp bounds do not hold down there.
TINY = 2.0**-126


# ---- derived error bounds (float64, from the test's inputs) ---------------------------------------


def _d(t):
    return torch.as_tensor(t).detach().double().cpu()


def _valid(m):
    return (m != 0).cpu()


def _stored(dtype):
    """A gradient computed in fp32 and stored in `dtype` is rounded once more: u_dtype (0 for fp32)."""
    return 0.0 if dtype == F32 else unit_roundoff(dtype)


def _seq_exact(x, m, mean):
    """The exact (float64) masked sum / mean over the last dim of the (already dtype-rounded) x."""
    valid = _valid(m)
    s = torch.where(valid, _d(x), 0.0).sum(-1)
    return s / valid.sum(-1).clamp(min=1) if mean else s


def _seq_err(x, m, mean):
    """Error of one fp32 masked row sum of T terms vs the exact sum, in ANY order (8 lane
    partials, vector width, threads, torch's blocked sum): gamma(T-1) sum|x_t| <= gamma(T) sum|x_t|
    (masked terms are exact zeros, the dtype->fp32 conversion is exact). The mean divides the
    rounded sum by the count n: gamma(T) A / n + u |sum| / n <= gamma(T+1) A / n."""
    steps = max(x.shape[-1], 1)
    valid = _valid(m)
    a = torch.where(valid, _d(x), 0.0).abs().sum(-1)
    return gamma(steps + 1) * a / valid.sum(-1).clamp(min=1) if mean else gamma(steps) * a


def _logsig_err(x, dx):
    """|fp32 logsig(x~) - logsig(x)| for an argument x~ within dx of x: logsig' = sig(-x) in (0, 1),
    so dx passes at most 1:1. Evaluating min(x, 0) - log1p(exp(-|x|)) (the kernels' form; torch's
    log_sigmoid is the same formula): exp within EXP_ULPS of e, which log1p' = 1/(1+e) <= 1 passes
    at most 1:1, log1p within EXP_ULPS, the subtraction one rounding of the result, and TINY for
    an exp that underflows."""
    e = torch.exp(-x.abs())
    return dx + fn_error(e) + fn_error(torch.log1p(e)) + rounding(F.logsigmoid(x), F32) + TINY


def _sig_err(z, dz):
    """|fp32 sigmoid(z~) - sigmoid(z)| for z~ within dz of z: sig' = sig (1 - sig) <= 1/4 passes dz/4.
    Evaluating e = exp(-|z|) (EXP_ULPS), 1 + e, e / (1 + e) or 1 / (1 + e), and in torch's backward
    1 - e/(1+e): exp's error enters numerator and denominator, so (2 EXP_ULPS + 4) u relative."""
    return dz / 4 + (2 * EXP_ULPS + 4) * U32 * torch.sigmoid(z) + TINY


def _x_err(x, beta, ddelta):
    """x = fl(fl32(beta) * delta~): beta rounded to fp32 and one product, gamma(2) |x|, plus beta
    times the margin's error."""
    return beta * ddelta * (1 + gamma(2)) + gamma(2) * x.abs()


def _ipo_d(delta, ddelta, beta):
    """d = delta - fl32(1/(2 beta)) and its error: the margin's, h's fp32 rounding, the subtraction."""
    h = 1 / (2 * beta)
    d = delta - h
    return d, (1 + U32) * ddelta + gamma(2) * (h + d.abs())


def _pair_err(delta, ddelta, beta, loss_type, eps):
    """Error of one fp32 per-pair DPO loss vs the exact loss of the exact margin delta, given the
    computed margin is within ddelta of it.
    sigmoid/robust: (1-eps) and eps times a logsig at +-x (_logsig_err each), combined with at most
      6 roundings per term (1 - eps and the robust 1/(1-2eps) rounded to fp32 and formed, two
      products, one sum): gamma(6) times the terms' magnitudes (no cancellation credit).
    ipo: d^2 with d within dd: 2|d| dd + dd^2, plus the square's rounding u d~^2.
    hinge: relu(1 - x) is 1-Lipschitz: dx plus the rounding of 1 - x."""
    x = beta * delta
    dx = _x_err(x, beta, ddelta)
    if loss_type in ("sigmoid", "robust"):
        err = (1 - eps) * _logsig_err(x, dx) + eps * _logsig_err(-x, dx)
        err = err + gamma(6) * ((1 - eps) * F.logsigmoid(x).abs() + eps * F.logsigmoid(-x).abs())
        return err / (1 - 2 * eps) if loss_type == "robust" else err
    if loss_type == "ipo":
        d, dd = _ipo_d(delta, ddelta, beta)
        return 2 * d.abs() * dd + dd**2 + U32 * (d.abs() + dd) ** 2
    return dx + U32 * (1 - x).abs()


def _pair_grad(delta, beta, loss_type, eps):
    """Exact dL/d delta (float64)."""
    x = beta * delta
    if loss_type == "sigmoid":
        return beta * (-(1 - eps) * torch.sigmoid(-x) + eps * torch.sigmoid(x))
    if loss_type == "robust":
        return beta * (-(1 - eps) * torch.sigmoid(-x) - eps * torch.sigmoid(x)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return 2 * (delta - 1 / (2 * beta))
    return torch.where(x < 1, -beta, 0.0)


def _pair_grad_err(delta, ddelta, beta, loss_type, eps):
    """Error of one fp32 dL/d delta (kernel formula or autograd of the reference) vs the exact one.
    sigmoid/robust: (1-eps), eps times sigmoids at -+x (_sig_err), beta, the robust scale: at most
      8 roundings per term (coefficients formed and rounded, products, the sum): gamma(8).
    ipo: 2 d: twice d's error plus one product.
    hinge: -beta (beta's rounding); where 1 - x is within x's error of 0 the computed x may sit on
      the other side of the kink, and the gradient may be either -beta or 0."""
    x = beta * delta
    dx = _x_err(x, beta, ddelta)
    if loss_type in ("sigmoid", "robust"):
        err = beta * ((1 - eps) * _sig_err(-x, dx) + eps * _sig_err(x, dx))
        err = err + gamma(8) * beta * ((1 - eps) * torch.sigmoid(-x) + eps * torch.sigmoid(x))
        return err / (1 - 2 * eps) if loss_type == "robust" else err
    if loss_type == "ipo":
        d, dd = _ipo_d(delta, ddelta, beta)
        return 2 * dd + gamma(1) * 2 * d.abs()
    kink = (1 - x).abs() <= dx + U32 * (1 - x).abs()
    return torch.where(kink, beta, U32 * beta)


def _dpo_exact(ins, beta, loss_type, eps, errs=(0.0, 0.0, 0.0, 0.0)):
    """Exact float64 (losses, chosen_rewards, rejected_rewards) of the four per-sequence log-probs
    `ins`, the bounds of one fp32 evaluation whose inputs are within `errs` of them, and the margin
    (delta, its error). delta = (c - rc) - (r - rr): each term rounded at most twice, gamma(2)
    sum|t|, plus the inputs' errors. Rewards beta (c - rc): one difference, beta's rounding, one
    product: gamma(3) beta (|c| + |rc|), plus beta times the inputs' errors."""
    c, r, rc, rr = (_d(t) for t in ins)
    ec, er, erc, err = errs
    delta = (c - rc) - (r - rr)
    dd = gamma(2) * (c.abs() + r.abs() + rc.abs() + rr.abs()) + (1 + gamma(2)) * (ec + er + erc + err)
    losses = reference.dpo_pair_losses(delta, beta, loss_type, eps)
    cw, rw = beta * (c - rc), beta * (r - rr)
    ecw = (1 + gamma(3)) * beta * (ec + erc) + gamma(3) * beta * (c.abs() + rc.abs())
    erw = (1 + gamma(3)) * beta * (er + err) + gamma(3) * beta * (r.abs() + rr.abs())
    return (losses, cw, rw), (_pair_err(delta, dd, beta, loss_type, eps), ecw, erw), (delta, dd)


def _dpo_tokens_exact(pol, ref, mask, beta, loss_type, eps, mean):
    """_dpo_exact of the rows' masked sums (means): chosen rows first, rejected rows second; the
    inputs' errors are _seq_err's. Also returns the exact sequence values and their errors."""
    p, q = _seq_exact(pol, mask, mean), _seq_exact(ref, mask, mean)
    ep, eq = _seq_err(pol, mask, mean), _seq_err(ref, mask, mean)
    b = p.shape[0] // 2
    out, errs, margin = _dpo_exact((p[:b], p[b:], q[:b], q[b:]), beta, loss_type, eps,
                                   (ep[:b], ep[b:], eq[:b], eq[b:]))
    return out, errs, margin, (p, q, ep, eq)


def _grad_err(g, pg, epg, dtype):
    """Error of fp32 g * (dL/d delta~) stored in `dtype`, given dL/d delta~ within epg of pg: the
    product's rounding, then the storage rounding of the result."""
    e = _d(g).abs() * epg + U32 * (_d(g) * pg).abs()
    return e + _stored(dtype) * ((_d(g) * pg).abs() + e)


def _token_grad(pol, mask, g, gs, margin, beta, loss_type, eps, mean):
    """Exact gradient w.r.t. the policy token log-probs of sum(g * losses) + sum(gs * policy seq),
    and one fp32 evaluation's error (stored in pol's dtype). Row j (pair i) gets the scalar
    v_j = +-g_i L'(delta_i) + gs_j at its valid tokens, divided by the row count n_j for the mean:
    L' within _pair_grad_err, then at most 3 roundings (product, sum, division), and the storage
    rounding."""
    delta, dd = margin
    b = delta.shape[0]
    pg, epg = _pair_grad(delta, beta, loss_type, eps), _pair_grad_err(delta, dd, beta, loss_type, eps)
    g, gs = _d(g), _d(gs) if gs is not None else torch.zeros(2 * b, dtype=torch.float64)
    v = torch.cat([g * pg, -g * pg]) + gs
    ev = torch.cat([g.abs() * epg] * 2) + gamma(3) * (torch.cat([(g * pg).abs()] * 2) + gs.abs())
    valid = _valid(mask)
    n = valid.sum(-1).clamp(min=1) if mean else torch.ones(2 * b, dtype=torch.long)
    v, ev = v / n, ev / n
    ev = ev + _stored(pol.dtype) * (v.abs() + ev)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(valid, v[:, None], zero), torch.where(valid, ev[:, None], zero)



def _reward_exact(c, r, margin, ec=0.0, er=0.0):
    """Exact float64 reward loss mean(-logsig(d)), d = c - r - margin, and one fp32 evaluation's
    error: d rounded at most twice, gamma(2) (|c| + |r| + |margin|), plus the errors ec, er of
    scores that are themselves computed; each -logsig within
    _logsig_err; the mean of n: gamma(n+1) sum|L| / n (any summation order, one division). Also
    the exact gradient w.r.t. c, -sig(-d) / n (r gets +sig(-d) / n), and its fp32 error: _sig_err
    and 3 roundings (the upstream product, the mean's division, the logsig backward product)."""
    c, r = _d(c), _d(r)
    m = _d(0.0 if margin is None else margin)
    d = c - r - m
    dd = gamma(2) * (c.abs() + r.abs() + m.abs()) + (1 + gamma(2)) * (_d(ec) + _d(er))
    losses = -F.logsigmoid(d)
    n = d.numel()
    err = (_logsig_err(d, dd).sum() + gamma(n + 1) * losses.abs().sum()) / n
    gc = -torch.sigmoid(-d) / n
    return losses.mean(), err, gc, _sig_err(-d, dd) / n + gamma(3) * gc.abs()

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
    # kernel and reference: fp32 sums of the same rounded tokens, each within _seq_err of the exact
    # one (so within twice that of each other)
    exact, err = _seq_exact(x, m, reduce == "mean"), _seq_err(x, m, reduce == "mean")
    assert_within(out, exact, err, "sequence_logps vs exact")
    assert_within(ref, exact, err, "reference sequence_logps vs exact")
    g = torch.randn(shape[:-1], device=device)
    (gx,) = _grad(out, x, g)
    (gr,) = _grad(ref, x, g)
    assert gx.dtype == dtype
    # both: g (sum) or fl(g / n) (mean) at valid tokens, stored in dtype. Each side within
    # 2u |g/n| (one division, 2 ulp allowed for a GPU's division) plus the storage rounding.
    n = _valid(m).sum(-1).clamp(min=1) if reduce == "mean" else 1
    v = torch.where(_valid(m), (_d(g) / n)[..., None], 0.0)
    e = (2 * U32 if reduce == "mean" else 0.0) * v.abs()
    assert_within(gx, gr, 2 * (e + _stored(dtype) * (v.abs() + e)), "sequence_logps grad vs reference")


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
    assert g[1].eq(0).all() and g[0, 2] == 0
    assert_within(g[0, 0], 1 / 5, 2 * U32 / 5, "mean grad 1/5")  # one fp32 division (2 ulp on a GPU)
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
    assert_within(out, reference.sequence_logps(x, m), 2 * _seq_err(x, m, False), "non-contiguous vs reference")
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
        # kernel and reference: two fp32 evaluations on the same rounded inputs
        _, errs, (delta, dd) = _dpo_exact(ins, beta, loss_type, eps)
        for o, r, e, what in zip(out, ref, errs, ("losses", "chosen_rewards", "rejected_rewards")):
            assert o.dtype == torch.float32 and o.shape == (37,)
            assert_within(o, r, 2 * e, f"{what} vs reference")
        assert not out[1].requires_grad and not out[2].requires_grad
        g = torch.randn(37, device=device)
        got, want = _grad(out[0], ins, g), _grad(ref[0], ins, g)
        pg, epg = _pair_grad(delta, beta, loss_type, eps), _pair_grad_err(delta, dd, beta, loss_type, eps)
        for a, b in zip(got, want):  # +-g L'(delta) for each input, stored in dtype
            assert a.dtype == dtype
            assert_within(a, b, 2 * _grad_err(g, pg, epg, dtype), "input grad vs reference")


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
        # exact fp64 constants: one fp32 evaluation's error (the inputs are exact in fp32)
        err = _dpo_exact((c, r, rc, rr), 0.5, loss_type, eps)[1][0]
        assert_within(losses, torch.tensor(want, dtype=torch.float64), err, f"{loss_type} eps={eps}")
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
    xs = _d(c)  # the dtype-rounded margins, exact in fp32 and fp64
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
    # vs the exact asymptote: one fp32 evaluation's error, plus the asymptote's own distance from
    # the loss (log1p(e^-|x|) <= e^-|x| per logsig; sigmoid(-|x|) <= e^-|x| for the gradient)
    zs = torch.zeros_like(xs)
    _, errs, (delta, dd) = _dpo_exact((xs, zs, zs, zs), 1.0, loss_type, eps)
    tail = torch.exp(-xs.abs()) / (1 - 2 * eps)
    assert_within(losses[big], want[big], (errs[0] + tail)[big], "loss vs asymptote")
    epg = _grad_err(torch.ones(7), _pair_grad(delta, 1.0, loss_type, eps),
                    _pair_grad_err(delta, dd, 1.0, loss_type, eps), dtype)
    assert_within(g[big], gwant[big], (epg + (1 + _stored(dtype)) * tail)[big], "grad vs asymptote")
    ref = reference.dpo_loss(c, z, z, z, 1.0, loss_type, eps)[0]
    assert_within(losses, ref, 2 * errs[0], "huge margins vs reference")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dpo_loss_fp16_long_sequences_no_nan_rewards(backend, device):
    # fp16 sequence log-probs of long responses: the margin (c - ref_c) - (r - ref_r) = -128000
    # overflows fp16 (max 65504); in fp32 it is exact, and the loss is finite (-logsig(-12800)).
    h = lambda *v: torch.tensor(v, device=device, dtype=torch.float16)  # noqa: E731
    c, rc, r, rr = h(-64992.0), h(-992.0), h(-992.0), h(-64992.0)  # exact fp16 values
    for loss_type in LOSS_TYPES:
        losses, cw, rw = fastalign.dpo_loss(c, r, rc, rr, beta=0.1, loss_type=loss_type, backend=backend)
        assert losses.isfinite().all()
        # c - rc = -64000 exactly in fp32; beta's fp32 rounding and one product: gamma(2) |reward|
        assert_within(cw, torch.tensor([-6400.0]), gamma(2) * 6400, "chosen reward")
        assert_within(rw, torch.tensor([6400.0]), gamma(2) * 6400, "rejected reward")
    losses, _, _ = fastalign.dpo_loss(c, r, rc, rr, beta=0.1, backend=backend)
    # -logsig(-12800) = 12800 + log1p(e^-12800): 12800 exactly in fp64; one fp32 evaluation's error
    err = _dpo_exact((c, r, rc, rr), 0.1, "sigmoid", 0.0)[1][0]
    assert_within(losses, torch.tensor([12800.0], dtype=torch.float64), err, "fp16 long-sequence loss")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dpo_loss_mixed_dtypes_non_contiguous_and_ref_grads(backend, device):
    base = torch.randn(4, 10, device=device)
    c = base[0, ::2].requires_grad_(False).clone().requires_grad_()  # fp32
    r = base[1, ::2].to(torch.bfloat16).requires_grad_()
    rc, rr = base[2, ::2], base[3, ::2]  # non-contiguous, no grad (frozen reference)
    out = fastalign.dpo_loss(c, r, rc, rr, beta=0.3, backend=backend)
    ref = reference.dpo_loss(c, r, rc, rr, 0.3, "sigmoid", 0.0)
    assert_within(out[0], ref[0], 2 * _dpo_exact((c, r, rc, rr), 0.3, "sigmoid", 0.0)[1][0], "mixed vs reference")
    gc, gr = _grad(out[0].sum(), (c, r), None)
    assert gc.dtype == torch.float32 and gr.dtype == torch.bfloat16
    # one fp32 g from the backward: +g stored in fp32, -g rounded once to bf16
    assert_within(gr, -gc, rounding(gc, torch.bfloat16), "bf16 grad = -fp32 grad")


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
    # the fused backward and the composed one (two kernels + autograd) form the same row scalars
    # from the same (bit-identical) sums, but may round them differently: both within _token_grad
    _, errs, margin, _ = _dpo_tokens_exact(pol, ref, mask, 0.2, loss_type, 0.1, average)
    _, gerr = _token_grad(pol, mask, g, gs, margin, 0.2, loss_type, 0.1, average)
    assert_within(got, want, 2 * gerr, "fused grad vs composed")
    # and against the reference composition: two fp32 evaluations, sums in different orders
    ref_p = reference.sequence_logps(pol, mask, average)
    ref_r = reference.sequence_logps(ref, mask, average)
    ref_out = reference.dpo_loss(ref_p[:5], ref_p[5:], ref_r[:5], ref_r[5:], 0.2, loss_type, 0.1)
    for a, b, e in zip(out[:3], ref_out, errs):
        assert_within(a, b, 2 * e, "fused vs reference composition")
    (want_ref,) = _grad((ref_out[0] * g).sum() + (ref_p * gs).sum(), pol, None)
    assert_within(got, want_ref, 2 * gerr, "fused grad vs reference composition")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fused_tokens_long_rows_and_defaults(backend, device):
    pol, ref, mask = _tokens(2, 1500, device, torch.float32)
    losses, cw, rw, ps, qs = fastalign.dpo_loss_from_tokens(pol, ref, mask, return_sequence_logps=True,
                                                            backend=backend)
    p, q = reference.sequence_logps(pol, mask), reference.sequence_logps(ref, mask)
    want = reference.dpo_loss(p[:2], p[2:], q[:2], q[2:], 0.1, "sigmoid", 0.0)
    exact, errs, margin, (pe, qe, ep, eq) = _dpo_tokens_exact(pol, ref, mask, 0.1, "sigmoid", 0.0, False)
    # sums of 1500 terms: the loss's bound (beta times four rows' gamma(1500) sum|x|) is about one
    # token's effect on it, so the row sums themselves are checked too (gamma(1500) sum|x| ~ 0.1 per
    # row, a token ~ 1.5), against the exact values (one evaluation's bound each)
    assert_within(ps, pe, ep, "long policy rows vs exact")
    assert_within(qs, qe, eq, "long reference rows vs exact")
    for a, b, x, e in zip((losses, cw, rw), want, exact, errs):
        assert_within(a, x, e, "long rows vs exact")
        assert_within(b, x, e, "long rows reference vs exact")
    (g,) = _grad(losses.sum(), pol, None)
    (gw,) = _grad(want[0].sum(), pol, None)
    gerr = _token_grad(pol, mask, torch.ones(2), None, margin, 0.1, "sigmoid", 0.0, False)[1]
    assert_within(g, gw, 2 * gerr, "long rows grad vs reference")


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
    # the same bf16-rounded policy values on both sides (exact in fp32); the sums in two orders
    err = _dpo_tokens_exact(pol.to(torch.bfloat16), ref, mask, 0.1, "sigmoid", 0.0, False)[1][0]
    assert_within(out[0], want[0], 2 * err, "mixed dtypes vs fp32 torch")


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
    # a plugin type runs its torch formula on every backend: the same fp32 ops on the same values
    # as here, in one process, so the same bits
    assert torch.equal(out[0], want)
    (g,) = _grad(out[0].sum(), ins[0], None)
    (gw,) = _grad(want.sum(), ins[0], None)
    assert torch.equal(g, gw)
    pol, ref, mask = _tokens(3, 7, device, torch.float32)
    got = fastalign.dpo_loss_from_tokens(pol, ref, mask, beta=2.0, loss_type=name, average_log_prob=True,
                                         backend=backend)
    p, q = reference.sequence_logps(pol, mask, True), reference.sequence_logps(ref, mask, True)
    want = -F.logsigmoid(2.0 * ((p[:3] - q[:3]) - (p[3:] - q[3:])) - 0.5)
    # the fused means and the reference's differ in order; x = 2 delta - 0.5: 2 delta exact, one
    # rounding of the subtraction, then -logsig (1-Lipschitz) per side
    delta, dd = _dpo_tokens_exact(pol, ref, mask, 2.0, "sigmoid", 0.0, True)[2]
    x = 2 * delta - 0.5
    assert_within(got[0], want, 2 * _logsig_err(x, 2 * dd + U32 * x.abs()), "plugin from tokens vs reference")
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
        assert loss.dtype == torch.float32 and loss.shape == ()
        # against the formula in fp64 on the same dtype-rounded scores: one fp32 evaluation's error
        want, err, wc, wc_err = _reward_exact(c, r, margin)
        assert_within(loss, want, err, "reward loss vs fp64")
        gc, gr = _grad(loss, (c, r), None)
        stored = wc_err + _stored(dtype) * (wc.abs() + wc_err)  # the score gradients are stored in dtype
        assert_within(gc, wc, stored, "chosen grad vs fp64")
        assert_within(gr, -wc, stored, "rejected grad vs fp64")
    # hand-computed in fp64: -logsig(0.5) = 0.4740769841801067; mean(-logsig(2), -logsig(-1)) =
    # 0.7200948492805976; mean(-logsig(1e4), -logsig(-1e4)) = 5e3 (+ e^-1e4). One fp32 evaluation's error.
    t = lambda *v: torch.tensor(v, device=device)  # noqa: E731
    for args, want in (((t(1.0), t(0.5), None), 0.4740769841801067),
                       ((t(3.0, 0.0), t(0.0, 0.5), t(1.0, 0.5)), 0.7200948492805976),
                       ((t(1e4, -1e4), t(0.0, 0.0), None), 5e3)):
        got = fastalign.reward_loss(*args[:2], margin=args[2], backend=backend)
        assert_within(got, torch.tensor(want, dtype=torch.float64), _reward_exact(*args)[1], f"reward_loss = {want}")


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
    (g1,) = _grad(got, pol, None)
    (g2,) = _grad(want, pol, None)
    if device == "cpu":  # aot_eager runs the same eager kernels in the same order: the same bits
        assert torch.equal(got, want) and torch.equal(g1, g2)
    # inductor fuses and reorders the elementwise tail and the means (and uses its own exp/log):
    # each result is within one fp32 evaluation's error of the exact step, composed from the parts
    (rob, cw, rw), (e_rob, ecw, erw), margin, _ = _dpo_tokens_exact(pol, ref, mask, 0.1, "robust", 0.1, False)
    sm, esm = _seq_exact(pol, mask, True), _seq_err(pol, mask, True)
    (ipo, _, _), (e_ipo, _, _), margin2 = _dpo_exact((sm[:3], sm[3:], cw, rw), 0.5, "ipo", 0.0,
                                                     (esm[:3], esm[3:], ecw, erw))
    rew, e_rew, _, _ = _reward_exact(cw, rw, 0.1, ecw, erw)
    exact = rob.mean() + ipo.mean() + rew
    # each mean of 3: its terms' errors / 3 plus gamma(4) mean|L|; two more additions: gamma(2)
    err = (e_rob.mean() + gamma(4) * rob.abs().mean() + e_ipo.mean() + gamma(4) * ipo.abs().mean() + e_rew
           + gamma(2) * (rob.abs().mean() + ipo.abs().mean() + rew.abs()))
    assert_within(got, exact, err, "compiled step vs exact")
    assert_within(got, want, 2 * err, "compiled step vs eager")
    # token grads: robust L'/3 per pair (summed rows) + ipo L'/3 through the row means (cw, rw are
    # detached), each within _token_grad, and one addition: u (|a| + |b|)
    a, ea = _token_grad(pol, mask, torch.ones(3) / 3, None, margin, 0.1, "robust", 0.1, False)
    b, eb = _token_grad(pol, mask, torch.ones(3) / 3, None, margin2, 0.5, "ipo", 0.0, True)
    eg = ea + eb + U32 * (a.abs() + b.abs())
    assert_within(g1, a + b, eg, "compiled grad vs exact")
    assert_within(g1, g2, 2 * eg, "compiled grad vs eager")



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
