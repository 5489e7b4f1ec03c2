"""The reference-free paired losses (fastalign.orpo_loss_from_tokens, cpo_loss_from_tokens,
simpo_loss_from_tokens; one fused op, fastalign/ops/ref_free.py) on every backend: against the
eager reference (kernels/reference_ref_free.py) and the exact float64 formulas, forward and
backward, fp32/bf16/fp16 inputs; against hand-computed values; against TRL's and Liger's
formulas re-derived from their sources; at extreme margins and log-probs near 0; with NaN and
garbage at masked positions; opcheck, torch.compile(fullgraph=True), bad inputs.

Error bounds (tests/numerics.py), each derived from the computation and computed in float64 from
the test's own inputs. Row sums: T terms in any order (lanes, tiles, threads, torch's blocked
sum) are within gamma(T) sum|x| of the exact sum; a mean divides once more: gamma(T+1) sum|x| / n.
Pair logits z: each formula's roundings (gamma(k) times the magnitudes formed) plus the inputs'
errors through its derivative: beta (c - r) moves by beta (ec + er); ORPO's log odds lo(y) =
y - log1mexp(y) move by (1 + odds(y)) ey (log1mexp' = -odds(y), taken at the top of the interval
since odds grows with y), and log1mexp is evaluated within FN (2 + |log1mexp|) + 2u: a relative
error <= 2 FN of 1 - e^y or e^y (exp, expm1: EXP_ULPS ulps; Triton's series for expm1 within a
few u, its exp(y) - 1 past |y| = 1/2 within 2 FN, as |result| > 0.39), passed 1:1 by the log
(or <= 2:1 by log1p(-e), e <= 1/2), the log's own FN |log1mexp|, and 2u for forming 1 - e.
logsig is 1-Lipschitz, sigmoid 1/4-Lipschitz (plus EXP_ULPS per exp/log1p and a few roundings).
Gradients: dpref/dc from the same pieces (ORPO's beta sig(-z) / expm1(c): the numerator's error,
the denominator's relative error odds(c) ec + 2 FN, a division), then the row scalar
g (dpref/dc / n - alpha / n): gamma(4) times its terms, and the storage rounding in bf16/fp16.
Kernel vs reference: two fp32 evaluations, so twice one evaluation's bound vs exact. A peer's
formula evaluated in float64 on the same inputs: one evaluation's bound (fastalign's).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastalign
from fastalign.kernels import reference_ref_free as R
from fastalign.ops import ref_free as RF
from tests.conftest import backend_params, requires_nvidia_compiler, run_triton_compile_script
from tests.numerics import EXP_ULPS, assert_within, fn_error, gamma, rounding, unit_roundoff

BACKENDS = backend_params()
FUSED = [p for p in BACKENDS if p.id != "torch-cpu"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
F32 = torch.float32
U32 = unit_roundoff(F32)
FN = 2 * EXP_ULPS * U32  # one exp/log/expm1 in fp32: EXP_ULPS ulps, one ulp <= 2 u |x|
TINY = 2.0**-126  # an fp32 exp/sigmoid result below the normal range: absolute error up to this
FLOOR = R.ODDS_FLOOR

# (name, kind, mean, beta, gamma, alpha, eps): every kernel kind, both reductions, the NLL term
CONFIGS = [
    ("orpo", "orpo", True, 0.1, 0.0, 1.0, 0.0),
    ("orpo-b2", "orpo", True, 2.0, 0.0, 0.5, 0.0),
    ("cpo-sigmoid", "sigmoid", False, 0.1, 0.0, 1.0, 0.1),
    ("cpo-hinge", "hinge", False, 0.2, 0.0, 1.0, 0.0),
    ("cpo-ipo", "ipo", True, 0.5, 0.0, 0.3, 0.0),
    ("simpo", "sigmoid", True, 2.0, 0.5, 0.0, 0.0),
    ("simpo-ls", "sigmoid", True, 2.5, 1.0, 0.2, 0.3),
]


def _d(t):
    return torch.as_tensor(t).detach().double().cpu()


def _stored(dtype, backend=None):
    """A gradient computed in fp32 and stored in `dtype` is rounded once more: u_dtype. The Triton
    interpreter converts fp32 to bf16 by truncating the mantissa (triton/runtime/interpreter.py,
    cast_impl: no rounding mode), up to one ulp, 2u; compiled Triton rounds to nearest."""
    if dtype == F32:
        return 0.0
    truncates = backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return (2 if truncates else 1) * unit_roundoff(dtype)


def _call(kind, x, m, mean, beta, gamma_, alpha, eps, backend):
    """The public function that runs (kind, mean) with these parameters."""
    if kind == "orpo":
        assert mean
        return fastalign.orpo_loss_from_tokens(x, m, beta=beta, nll_weight=alpha, backend=backend)
    if kind == "sigmoid" and gamma_ != 0.0:
        assert mean
        return fastalign.simpo_loss_from_tokens(x, m, beta=beta, gamma=gamma_, label_smoothing=eps, nll_weight=alpha,
                                                backend=backend)
    return fastalign.cpo_loss_from_tokens(x, m, beta=beta, loss_type=kind, nll_weight=alpha, label_smoothing=eps,
                                          average_log_prob=mean, backend=backend)


# ---- exact values and derived bounds (float64) ------------------------------------------------------


def _rows_exact(x, m, mean):
    """Exact row log-probs s [2B] and one fp32 evaluation's error; the exact mean and its error
    (the NLL's); the counts."""
    valid = (m != 0).cpu()
    xs = torch.where(valid, _d(x), 0.0)
    total, a, n = xs.sum(-1), xs.abs().sum(-1), valid.sum(-1).double()
    steps, nn = max(x.shape[-1], 1), n.clamp(min=1)
    avg, e_avg = total / nn, gamma(steps + 1) * a / nn
    s, es = (avg, e_avg) if mean else (total, gamma(steps) * a)
    return s, es, avg, e_avg, n


def _logsig_err(x, dx):
    """|fp32 logsig(x~) - logsig(x)| for x~ within dx of x: 1-Lipschitz, plus min(x, 0) -
    log1p(exp(-|x|)) evaluated (exp, log1p within EXP_ULPS; one rounding; TINY for underflow)."""
    e = torch.exp(-x.abs())
    return dx + fn_error(e) + fn_error(torch.log1p(e)) + rounding(F.logsigmoid(x), F32) + TINY


def _sig_err(z, dz):
    """|fp32 sigmoid(z~) - sigmoid(z)|: dz/4, and exp's error in numerator and denominator plus
    a few roundings: (2 EXP_ULPS + 4) u relative."""
    return dz / 4 + (2 * EXP_ULPS + 4) * U32 * torch.sigmoid(z) + TINY


def _odds(y):
    y = y.clamp(max=-FLOOR)
    return torch.exp(y) / -torch.expm1(y)


def _lo(y, ey):
    """lo(y~) = y~ - log1mexp(y~) at the floored y, and its fp32 error given y within ey."""
    yf = y.clamp(max=-FLOOR)
    big_l = R.log1mexp(yf)
    top = (yf + ey).clamp(max=-FLOOR)
    err = ey * (1 + _odds(top)) + FN * (2 + big_l.abs()) + 2 * U32 + TINY + U32 * (yf.abs() + big_l.abs())
    return yf - big_l, err


def _pair_exact(c, r, ec, er, kind, beta, gamma_, eps):
    """(z, dz, pref, e_pref): the exact logits and preference term of each pair, and one fp32
    evaluation's errors given c, r within ec, er."""
    if kind == "orpo":
        lc, elc = _lo(c, ec)
        lr, elr = _lo(r, er)
        z = lc - lr
        dz = elc + elr + U32 * (lc.abs() + lr.abs())
        pref = -beta * F.logsigmoid(z)
        e = beta * _logsig_err(z, dz) * (1 + gamma(2)) + gamma(2) * pref.abs()
        return z, dz, pref, e
    if kind == "sigmoid":  # beta, gamma rounded to fp32, c - r, the product, the subtraction
        z = beta * (c - r) - gamma_
        dz = beta * (ec + er) * (1 + gamma(4)) + gamma(4) * (beta * (c.abs() + r.abs()) + abs(gamma_))
        pref = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        e = (1 - eps) * _logsig_err(z, dz) + eps * _logsig_err(-z, dz)
        e = e + gamma(6) * ((1 - eps) * F.logsigmoid(z).abs() + eps * F.logsigmoid(-z).abs())
        return z, dz, pref, e
    if kind == "hinge":
        z = beta * (c - r)
        dz = beta * (ec + er) * (1 + gamma(3)) + gamma(3) * beta * (c.abs() + r.abs())
        return z, dz, torch.relu(1 - z), dz + U32 * (1 - z).abs()
    z = c - r  # ipo
    dz = (ec + er) * (1 + U32) + U32 * (c.abs() + r.abs())
    h = 1 / (2 * beta)
    d = z - h
    dd = (1 + U32) * dz + gamma(2) * (h + d.abs())
    return z, dz, d**2, 2 * d.abs() * dd + dd**2 + U32 * (d.abs() + dd) ** 2


def _exact(x, m, kind, mean, beta, gamma_, alpha, eps):
    """Exact (losses, chosen_rewards, rejected_rewards, nll, logits, c, r) and one fp32
    evaluation's bound for each; plus what the gradient bounds need."""
    s, es, avg, e_avg, n = _rows_exact(x, m, mean)
    b = s.shape[0] // 2
    c, r, ec, er = s[:b], s[b:], es[:b], es[b:]
    z, dz, pref, e_pref = _pair_exact(c, r, ec, er, kind, beta, gamma_, eps)
    nll, e_nll = -avg[:b], e_avg[:b]
    losses = pref + alpha * nll
    e_losses = e_pref + alpha * e_nll * (1 + gamma(2)) + gamma(2) * alpha * nll.abs() + U32 * losses.abs()
    ecw = beta * ec * (1 + U32) + gamma(2) * beta * c.abs()
    erw = beta * er * (1 + U32) + gamma(2) * beta * r.abs()
    values = (losses, beta * c, beta * r, nll, z, c, r)
    errs = (e_losses, ecw, erw, e_nll, dz, ec, er)
    return values, errs, (c, r, ec, er, z, dz, n)


def _grads_exact(kind, beta, eps, gamma_, pieces):
    """Exact (dpref/dc, dpref/dr) [B] and one fp32 evaluation's error of each."""
    c, r, ec, er, z, dz, _ = pieces
    if kind == "orpo":
        num, e_num = beta * torch.sigmoid(-z), beta * _sig_err(-z, dz) * (1 + gamma(2))
        out = []
        for y, ey, sign in ((c, ec, 1.0), (r, er, -1.0)):
            yf = y.clamp(max=-FLOOR)
            den = torch.expm1(yf)
            rel = _odds((yf + ey).clamp(max=-FLOOR)) * ey + 2 * FN + 4 * U32
            assert (rel < 0.5).all(), "test data: the denominator's error bound is too loose to use"
            g = sign * num / den
            out += [g, e_num / den.abs() + g.abs() * (2 * rel + U32)]
        return out[0], out[2], out[1], out[3]
    if kind == "sigmoid":
        g = beta * (-(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z))
        e = beta * ((1 - eps) * _sig_err(-z, dz) + eps * _sig_err(z, dz))
        e = e + gamma(8) * beta * ((1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z))
        return g, -g, e, e
    if kind == "hinge":  # at the kink the computed z may sit on either side: -beta or 0
        g = torch.where(z < 1, -beta, 0.0)
        kink = (1 - z).abs() <= dz + U32 * (1 - z).abs()
        e = torch.where(kink, torch.full_like(z, beta), U32 * beta)
        return g, -g, e, e
    d = z - 1 / (2 * beta)
    dd = (1 + U32) * dz + gamma(2) * (1 / (2 * beta) + d.abs())
    return 2 * d, -2 * d, 2 * dd + gamma(1) * 2 * d.abs(), 2 * dd + gamma(1) * 2 * d.abs()


def _token_grad(x, m, g, kind, mean, beta, gamma_, alpha, eps, pieces, backend=None):
    """Exact gradient of sum(g * losses) w.r.t. the token log-probs, and one fp32 evaluation's
    error (stored in x's dtype): row scalar g (dpref/dc / n - alpha / n) for chosen rows and
    g dpref/dr / n for rejected ones (no / n for sums) at their valid tokens."""
    gc, gr, egc, egr = _grads_exact(kind, beta, eps, gamma_, pieces)
    n = pieces[-1]
    b = gc.shape[0]
    nn = n.clamp(min=1)
    nc, nr = nn[:b], nn[b:]
    g = _d(g)
    dc, dr = (nc, nr) if mean else (torch.ones_like(nc), torch.ones_like(nr))
    vc, vr = g * (gc / dc - alpha / nc), g * gr / dr
    evc = g.abs() * egc / dc + gamma(4) * g.abs() * (gc.abs() / dc + alpha / nc)
    evr = g.abs() * egr / dr + gamma(3) * g.abs() * gr.abs() / dr
    v, ev = torch.cat([vc, vr]), torch.cat([evc, evr])
    ev = ev + _stored(x.dtype, backend) * (v.abs() + ev)
    valid = (m != 0).cpu()
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(valid, v[:, None], zero), torch.where(valid, ev[:, None], zero)



def _tokens(pairs, steps, device, dtype, chosen_len=None):
    """[2B, T] token log-probs in (-3, 0) and a mask: random lengths (a full row, maybe empty
    rows), prompt-like leading holes; with chosen_len, every chosen row has that many valid tokens."""
    x = (-3 * torch.rand(2 * pairs, steps, device=device)).to(dtype).requires_grad_()
    lengths = torch.randint(0, steps + 1, (2 * pairs,), device=device)
    lengths[0] = steps
    m = torch.arange(steps, device=device)[None, :] < lengths[:, None]
    m[:, 0] &= torch.rand(2 * pairs, device=device) > 0.5
    if chosen_len is not None:
        m[:pairs] = torch.arange(steps, device=device)[None, :] < chosen_len
    return x, m


def _grad(out, x, g):
    return torch.autograd.grad(out, x, g)[0]


# ---- every backend against the reference and the exact formulas ------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c[0])
def test_matches_reference_and_exact(backend, device, dtype, cfg):
    _, kind, mean, beta, gm, alpha, eps = cfg
    x, m = _tokens(5, 19, device, dtype)
    out = _call(kind, x, m, mean, beta, gm, alpha, eps, backend)
    ref = R.ref_free_losses(x, m, kind, beta, gm, alpha, eps, mean)
    values, errs, pieces = _exact(x, m, kind, mean, beta, gm, alpha, eps)
    ref_values = (*ref[:5], ref[5][0, :5], ref[5][0, 5:])
    for name, o, rv, v, e in zip(RF.PairLosses._fields, out, ref_values, values, errs):
        assert o.dtype == F32 and o.shape == (5,), name
        assert_within(o, v, e, f"{name} vs exact")
        assert_within(o, rv, 2 * e, f"{name} vs reference")
    assert out.losses.requires_grad and not any(t.requires_grad for t in out[1:])
    g = torch.randn(5, device=device)
    gx, gr = _grad(out.losses, x, g), _grad(ref[0], x, g)
    want, err = _token_grad(x, m, g, kind, mean, beta, gm, alpha, eps, pieces, backend)
    assert gx.dtype == dtype
    assert_within(gx, want, err, "token grad vs exact")
    assert_within(gx, gr, 2 * err, "token grad vs reference")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("steps", [1, 8, 37, 1100])
def test_row_logps_are_sequence_logps_bit_for_bit(backend, device, steps):
    # the fused op's rows are the DPO head's sums on each backend (the same loop and order), and
    # the counts are exact integers
    x, m = _tokens(3, steps, device, torch.float32)
    for kind, mean in (("orpo", True), ("sigmoid", False), ("ipo", True)):
        out = _call(kind, x, m, mean, 0.5, 0.0, 1.0, 0.0, backend)
        seq = fastalign.sequence_logps(x, m, reduce="mean" if mean else "sum", backend=backend)
        assert torch.equal(out.chosen_logps, seq[:3]) and torch.equal(out.rejected_logps, seq[3:])
        assert torch.equal(out.nll, -fastalign.sequence_logps(x[:3], m[:3], reduce="mean", backend=backend))
    if backend != "torch":
        stats = RF.REF_FREE_TOKENS.kernels(backend)[0](x.detach(), m, 0, 0.1, 0.0, 1.0, 0.0, True)[5]
        assert torch.equal(stats[1], m.sum(-1).float())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_hand_computed(backend, device):
    # Two pairs, T = 3 (-9 marks a masked position). Chosen rows: [-0.5, -1, -9] (mean -0.75, sum
    # -1.5) and [-2, -9, -9] (-2, -2); rejected: [-1.5, -2.5, -0.5] (mean -1.5, sum -4.5) and
    # [-0.125, -0.25, -9] (-0.1875, -0.375). The expected values are the published formulas in
    # Python floats (math module), written out here.
    x = torch.tensor([[-0.5, -1.0, -9.0], [-2.0, -9.0, -9.0], [-1.5, -2.5, -0.5], [-0.125, -0.25, -9.0]],
                     device=device)
    m = x != -9.0
    mc, mr = [-0.75, -2.0], [-1.5, -0.1875]
    sc, sr = [-1.5, -2.0], [-4.5, -0.375]
    nll = [0.75, 2.0]

    def logsig(v):
        return min(v, 0.0) - math.log1p(math.exp(-abs(v)))

    def lo(y):
        return y - math.log1p(-math.exp(y))

    cases = {
        # ORPO, beta (lambda) 0.1, nll_weight 1: nll - beta logsig(lo(c) - lo(r))
        ("orpo", 0.1, 0.0, 1.0, 0.0, True): [n - 0.1 * logsig(lo(c) - lo(r)) for n, c, r in zip(nll, mc, mr)],
        # CPO sigmoid on sums, beta 0.5, alpha 1, eps 0.1
        ("sigmoid", 0.5, 0.0, 1.0, 0.1, False): [
            -0.9 * logsig(0.5 * (c - r)) - 0.1 * logsig(-0.5 * (c - r)) + n for n, c, r in zip(nll, sc, sr)],
        # hinge on sums, beta 0.5, no NLL: relu(1 - beta (c - r))
        ("hinge", 0.5, 0.0, 0.0, 0.0, False): [max(0.0, 1 - 0.5 * (c - r)) for c, r in zip(sc, sr)],
        # ipo on means, beta 0.5: (c - r - 1)^2
        ("ipo", 0.5, 0.0, 0.0, 0.0, True): [(c - r - 1.0) ** 2 for c, r in zip(mc, mr)],
        # SimPO, beta 2, gamma 0.5: -logsig(2 (c - r) - 0.5)
        ("sigmoid", 2.0, 0.5, 0.0, 0.0, True): [-logsig(2.0 * (c - r) - 0.5) for c, r in zip(mc, mr)],
    }
    for (kind, beta, gm, alpha, eps, mean), want in cases.items():
        out = _call(kind, x, m, mean, beta, gm, alpha, eps, backend)
        err = _exact(x, m, kind, mean, beta, gm, alpha, eps)[1][0]  # inputs exact in fp32: one evaluation
        assert_within(out.losses, torch.tensor(want, dtype=torch.float64), err, f"{kind} beta={beta}")
        c, r = (mc, mr) if mean else (sc, sr)
        assert out.chosen_logps.tolist() == c and out.rejected_logps.tolist() == r  # exact in fp32
        assert out.nll.tolist() == nll


# ---- the peers' formulas, re-derived (evaluated in float64 on the same inputs) -------------------------
# TRL 1.16.0 (installed): trl/experimental/orpo/orpo_trainer.py (log1mexp, ORPOTrainer.odds_ratio_loss,
# get_batch_logps, concatenated_forward, get_batch_loss_metrics) and trl/experimental/cpo/cpo_trainer.py
# (CPOTrainer.cpo_loss, concatenated_forward, get_batch_loss_metrics). Liger-Kernel:
# src/liger_kernel/chunked_loss/{orpo_loss,cpo_loss,simpo_loss}.py and fused_linear_preference.py
# (LigerFusedLinearPreferenceBase._compute_loss / chunk_forward).


def _trl_log1mexp(x):
    t = -0.6931471805599453  # branch at -ln 2
    return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _trl_batch_logps(per_token, loss_mask, average_log_prob):
    s = (per_token * loss_mask).sum(-1)
    return s / loss_mask.sum(-1) if average_log_prob else s


def _trl_nll(per_token, loss_mask):
    # nn.CrossEntropyLoss() over the chosen rows: the mean over the non-ignored tokens
    return -(per_token * loss_mask).sum() / loss_mask.sum()


def _trl_orpo(per_token, loss_mask, beta):
    b = per_token.shape[0] // 2
    logps = _trl_batch_logps(per_token, loss_mask, True)
    c, r = logps[:b], logps[b:]
    log_odds = (c - r) - (_trl_log1mexp(c) - _trl_log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    losses = beta * ratio
    loss = _trl_nll(per_token[:b], loss_mask[:b]) - losses.mean()
    return loss, beta * c, beta * r, log_odds


def _trl_cpo(per_token, loss_mask, beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma):
    b = per_token.shape[0] // 2
    logps = _trl_batch_logps(per_token, loss_mask, loss_type in ("ipo", "simpo"))
    c, r = logps[:b], logps[b:]
    logits = c - r
    if loss_type in ("simpo", "sigmoid"):
        if loss_type == "simpo":
            logits = logits - simpo_gamma / beta
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    loss = losses.mean() + cpo_alpha * _trl_nll(per_token[:b], loss_mask[:b])
    return loss, beta * c, beta * r


def _liger_nll(per_token, loss_mask):
    # chunk_forward's F.nll_loss(reduction="sum") over the chosen targets / _compute_loss's
    # (full_target[:B] != ignore_index).sum()
    return -(per_token * loss_mask).sum() / loss_mask.sum()


def _liger(per_token, loss_mask, which, beta, alpha, label_smoothing=0.0, gamma_=0.5):
    b = per_token.shape[0] // 2
    avg = (per_token * loss_mask).sum(-1) / loss_mask.sum(-1)  # chunk_forward: always the average
    c, r = avg[:b], avg[b:]
    if which == "orpo":  # odds_ratio_loss: beta * sum(ratio), then loss = nll - alignment / B
        log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        return alpha * _liger_nll(per_token[:b], loss_mask[:b]) - beta * F.logsigmoid(log_odds).sum() / b
    logits = beta * (c - r) - (gamma_ if which == "simpo" else 0.0)
    pref = (-F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing).sum() / b
    return alpha * _liger_nll(per_token[:b], loss_mask[:b]) + pref


def _peer_inputs(device):
    # equal-length chosen completions (the peers' batch token mean of the NLL is then the mean of
    # the per-pair means); rejected rows of any length
    x, m = _tokens(6, 23, device, torch.float32, chosen_len=17)
    m[6:, 0] = True  # no empty rejected row: the peers divide by the count
    return x, m, _d(x), m.cpu().double()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_trl_orpo_formula(backend, device):
    x, m, x64, m64 = _peer_inputs(device)
    for beta in (0.1, 1.0):
        out = fastalign.orpo_loss_from_tokens(x, m, beta=beta, backend=backend)
        loss, cw, rw, log_odds = _trl_orpo(x64, m64, beta)
        values, errs, _ = _exact(x, m, "orpo", True, beta, 0.0, 1.0, 0.0)
        # our fp32 per-pair losses averaged exactly (fp64): within the mean of their bounds
        assert_within(_d(out.losses).mean(), loss, errs[0].mean(), "ORPO loss vs TRL")
        assert_within(out.chosen_rewards, cw, errs[1], "chosen rewards vs TRL")
        assert_within(out.rejected_rewards, rw, errs[2], "rejected rewards vs TRL")
        assert_within(out.logits, log_odds, errs[4], "log odds ratio vs TRL's log_odds")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_trl_cpo_formula(backend, device, loss_type):
    x, m, x64, m64 = _peer_inputs(device)
    beta, eps, alpha, gm = (0.1, 0.2, 1.0, 0.5) if loss_type != "simpo" else (2.0, 0.1, 0.5, 0.7)
    out = fastalign.cpo_loss_from_tokens(x, m, beta=beta, loss_type=loss_type, nll_weight=alpha, label_smoothing=eps,
                                         simpo_gamma=gm, backend=backend)
    loss, cw, rw = _trl_cpo(x64, m64, beta, loss_type, eps, alpha, gm)
    kind = "sigmoid" if loss_type == "simpo" else loss_type
    mean = loss_type in ("ipo", "simpo")
    values, errs, _ = _exact(x, m, kind, mean, beta, gm if loss_type == "simpo" else 0.0, alpha, eps)
    # TRL forms simpo's argument as beta ((c - r) - gamma / beta): equal in exact arithmetic
    assert_within(_d(out.losses).mean(), loss, errs[0].mean(), f"CPO {loss_type} loss vs TRL")
    assert_within(out.chosen_rewards, cw, errs[1], "chosen rewards vs TRL")
    assert_within(out.rejected_rewards, rw, errs[2], "rejected rewards vs TRL")
    if loss_type == "simpo":  # simpo_loss_from_tokens is the same kernel call
        same = fastalign.simpo_loss_from_tokens(x, m, beta=beta, gamma=gm, label_smoothing=eps, nll_weight=alpha,
                                                backend=backend)
        for a, b in zip(same, out):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_liger_formulas(backend, device):
    x, m, x64, m64 = _peer_inputs(device)
    runs = [
        ("orpo", fastalign.orpo_loss_from_tokens(x, m, beta=0.2, nll_weight=1.0, backend=backend),
         _liger(x64, m64, "orpo", 0.2, 1.0), ("orpo", True, 0.2, 0.0, 1.0, 0.0)),
        # Liger's CPO averages the log-probs: average_log_prob=True here
        ("cpo", fastalign.cpo_loss_from_tokens(x, m, beta=0.3, nll_weight=0.7, label_smoothing=0.1,
                                               average_log_prob=True, backend=backend),
         _liger(x64, m64, "cpo", 0.3, 0.7, 0.1), ("sigmoid", True, 0.3, 0.0, 0.7, 0.1)),
        ("simpo", fastalign.simpo_loss_from_tokens(x, m, beta=2.0, gamma=0.5, label_smoothing=0.05, backend=backend),
         _liger(x64, m64, "simpo", 2.0, 0.0, 0.05, 0.5), ("sigmoid", True, 2.0, 0.5, 0.0, 0.05)),
    ]
    for name, out, want, (kind, mean, beta, gm, alpha, eps) in runs:
        errs = _exact(x, m, kind, mean, beta, gm, alpha, eps)[1]
        assert_within(_d(out.losses).mean(), want, errs[0].mean(), f"{name} vs Liger")


# ---- extremes ---------------------------------------------------------------------------------------


def _single_token_rows(values_c, values_r, device, dtype):
    """[2B, 3] rows whose only valid token (the first) holds the given value; NaN at the masked
    positions (never read)."""
    vals = torch.tensor(list(values_c) + list(values_r), dtype=torch.float64)
    x = torch.full((vals.shape[0], 3), float("nan"), dtype=torch.float64)
    x[:, 0] = vals
    m = torch.zeros(x.shape, dtype=torch.bool)
    m[:, 0] = True
    return x.to(device=device, dtype=dtype).requires_grad_(), m.to(device)


def _check_extreme(out, x, m, kind, mean, beta, gm, alpha, eps, dtype, what, backend):
    values, errs, pieces = _exact(x, m, kind, mean, beta, gm, alpha, eps)
    assert out.losses.isfinite().all() and out.logits.isfinite().all(), what
    assert_within(out.losses, values[0], errs[0], f"{what}: losses vs exact")
    assert_within(out.logits, values[4], errs[4], f"{what}: logits vs exact")
    g = torch.ones(out.losses.shape[0], device=x.device)
    gx = _grad(out.losses, x, g)
    want, err = _token_grad(x, m, g, kind, mean, beta, gm, alpha, eps, pieces, backend)
    if dtype != torch.float16:  # fp16 cannot hold a gradient beyond 65504 (ORPO's at the floor)
        assert gx[m].isfinite().all(), what
    if dtype == torch.float16:  # what fp16 stores of a gradient beyond its range: inf
        want = torch.where(want.abs() >= 65520, want.sign() * float("inf"), want)
    ref = _grad(R.ref_free_losses(x, m, kind, beta, gm, alpha, eps, mean)[0], x, g)
    assert_within(gx, want, err, f"{what}: grad vs exact")
    assert_within(gx, ref, 2 * err, f"{what}: grad vs reference")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_margins_are_finite(backend, device, dtype):
    # beta (c - r) = +-1e4, +-100, +-30, 0 on summed log-probs (CPO sigmoid/hinge/ipo), and the
    # same on means for SimPO: logsig never overflows, the hinge and ipo stay exact
    c = [0.0, -1e4, -1.0, -101.0, -1.0, -31.0, -5.0]
    r = [-1e4, 0.0, -101.0, -1.0, -31.0, -1.0, -5.0]
    x, m = _single_token_rows(c, r, device, dtype)
    for kind, mean, gm, alpha, eps in (("sigmoid", False, 0.0, 1.0, 0.2), ("hinge", False, 0.0, 0.0, 0.0),
                                        ("ipo", True, 0.0, 0.0, 0.0), ("sigmoid", True, 0.5, 0.0, 0.1)):
        out = _call(kind, x, m, mean, 1.0, gm, alpha, eps, backend)
        _check_extreme(out, x, m, kind, mean, 1.0, gm, alpha, eps, dtype, f"{kind} mean={mean}", backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_orpo_log_probs_near_zero_and_very_negative(backend, device, dtype):
    # mean log-probs -> 0^- (exactly 0: probability 1 in fp32; below, at and above the 2^-24 floor)
    # and -> -1e4: finite losses and gradients, equal to the exact floored formula
    c = [0.0, -1.0, 0.0, -1e-9, -1e-7, -1e4, 0.0, -1e4, -1e-3, -FLOOR, -0.6931]
    r = [-1.0, 0.0, 0.0, -1e-7, -1e-9, 0.0, -1e4, -1e4, -FLOOR, -1e-3, -0.6932]
    x, m = _single_token_rows(c, r, device, dtype)
    for beta, alpha in ((0.1, 1.0), (1.0, 0.0)):
        out = fastalign.orpo_loss_from_tokens(x, m, beta=beta, nll_weight=alpha, backend=backend)
        _check_extreme(out, x, m, "orpo", True, beta, 0.0, alpha, 0.0, dtype, f"orpo beta={beta}", backend)
    # the floor's straight-through gradient: a rejected response at probability ~1 is pushed down
    # with the (finite) derivative at the floor, beta sig(-z) / (1 - e^-2^-24) ~ beta 2^24
    out = fastalign.orpo_loss_from_tokens(x, m, beta=0.1, nll_weight=0.0, backend=backend)
    g = _grad(out.losses, x, torch.ones(len(c), device=device))
    assert g[len(c) + 1, 0] > 1e5 if dtype != torch.float16 else g[len(c) + 1, 0] > 6e4


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_propagates_and_masked_garbage_is_ignored(backend, device):
    x, m = _tokens(4, 9, device, torch.float32)
    m[:, -3:] = False
    m[:, 0] = True
    with torch.no_grad():
        x[:, -3:] = float("nan")
        x[:, -1] = float("-inf")
    for kind, mean, gm in (("orpo", True, 0.0), ("sigmoid", False, 0.0), ("hinge", False, 0.0), ("ipo", True, 0.0),
                           ("sigmoid", True, 0.5)):
        out = _call(kind, x, m, mean, 0.5, gm, 1.0, 0.0, backend)
        assert all(t.isfinite().all() for t in out), kind
        gx = _grad(out.losses.sum(), x, None)
        assert gx.isfinite().all() and gx[:, -3:].eq(0).all(), kind
    with torch.no_grad():
        y = x.detach().clone()
        y[1, 0] = float("nan")  # a valid token of pair 1's chosen row
    for kind, mean, gm in (("orpo", True, 0.0), ("sigmoid", False, 0.0), ("ipo", True, 0.0), ("hinge", False, 0.0)):
        out = _call(kind, y, m, mean, 0.5, gm, 1.0, 0.0, backend)
        assert out.losses[1].isnan() and out.losses[[0, 2, 3]].isfinite().all(), kind


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_rows_and_empty_batch(backend, device):
    x, m = _tokens(3, 6, device, torch.float32)
    m[1] = False  # a chosen row without tokens: nll 0, c = 0 (ORPO: the floor), zero gradient
    m[4] = False
    for kind, mean, gm in (("orpo", True, 0.0), ("sigmoid", False, 0.0), ("sigmoid", True, 0.5)):
        out = _call(kind, x, m, mean, 0.5, gm, 1.0, 0.0, backend)
        assert out.nll[1] == 0 and out.chosen_logps[1] == 0 and out.rejected_logps[1] == 0
        assert all(t.isfinite().all() for t in out)
        gx = _grad(out.losses.sum(), x, None)
        assert gx[1].eq(0).all() and gx[4].eq(0).all() and gx.isfinite().all()
    e = torch.zeros(0, 5, device=device, requires_grad=True)
    out = fastalign.orpo_loss_from_tokens(e, torch.ones(0, 5, device=device), backend=backend)
    assert all(t.shape == (0,) for t in out)
    assert _grad(out.losses.sum(), e, None).shape == (0, 5)
    z = torch.zeros(4, 0, device=device, requires_grad=True)  # T = 0: every row empty
    out = fastalign.simpo_loss_from_tokens(z, torch.ones(4, 0, device=device), backend=backend)
    assert out.losses.isfinite().all() and out.chosen_logps.eq(0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("steps", [3, 16, 19, 1100])
def test_mask_dtypes_give_identical_results(backend, device, steps):
    # the cpp kernels read bool/uint8/int32/int64/float masks as they are (the others convert):
    # every dtype selects the same positions, forward and backward, bit for bit
    x, m = _tokens(3, steps, device, torch.float32)

    def run(mm):
        res = []
        for kind, mean, gm in (("orpo", True, 0.0), ("sigmoid", False, 0.0), ("sigmoid", True, 0.5)):
            out = _call(kind, x, mm, mean, 0.5, gm, 1.0, 0.1, backend)
            res += [*out, _grad(out.losses.sum(), x, None)]
        return res

    want = run(m)
    for mm in (m.to(torch.uint8), m.int(), m.long(), m.float() * 0.25, m.double()):
        for a, b in zip(run(mm), want):
            assert torch.equal(a, b), mm.dtype


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs_untouched(backend, device):
    x = (-3 * torch.rand(14, 8, device=device))[:, ::2].requires_grad_()  # every other column
    m = torch.rand(14, 4, device=device) > 0.2
    snap = x.detach().clone(), m.clone()
    out = fastalign.orpo_loss_from_tokens(x, m, backend=backend)
    want = fastalign.orpo_loss_from_tokens(x.detach().contiguous(), m, backend=backend)
    for a, b in zip(out, want):
        assert torch.equal(a, b)
    assert torch.equal(x.detach(), snap[0]) and torch.equal(m, snap[1])


# ---- the op: registration, opcheck, torch.compile ------------------------------------------------------


def test_kernels_per_backend_and_one_schema():
    op = RF.REF_FREE_TOKENS
    fwd, bwd = op.kernels("triton")
    assert fwd.name() == "fastalign_triton::ref_free_tokens_fwd" and bwd.name() == "fastalign_triton::ref_free_tokens_bwd"
    if fastalign.backends()["cpp"]["usable"]:
        cfwd, cbwd = op.kernels("cpp")
        assert op.kernels("cuda") == (cfwd, cbwd) and cfwd.name() == "fastalign::ref_free_tokens_fwd"
    for suffix in ("fwd", "bwd"):
        cpp = getattr(torch.ops.fastalign, f"ref_free_tokens_{suffix}").default._schema
        tri = getattr(torch.ops.fastalign_triton, f"ref_free_tokens_{suffix}").default._schema
        assert str(cpp).split("(", 1)[1] == str(tri).split("(", 1)[1]


@pytest.mark.parametrize("backend,device", FUSED)
def test_opcheck(backend, device):
    fwd, bwd = RF._OPS[backend]
    x = torch.randn(6, 7, device=device).clamp(max=-0.01).requires_grad_()
    m = torch.rand(6, 7, device=device) > 0.3
    for kind in range(4):
        for mean in (False, True):
            torch.library.opcheck(fwd, (x, m, kind, 0.5, 0.25, 1.0, 0.1, mean))
    stats = fwd(x.detach(), m, 0, 0.5, 0.0, 1.0, 0.0, True)[5]
    for kind in range(4):
        torch.library.opcheck(bwd, (torch.randn(3, device=device), stats, x.detach(), m, kind, 0.5, 0.25, 1.0, 0.1,
                                    kind % 2 == 0))
    if backend == "cpp":  # the cpp kernels also take float and int64 masks as they are
        torch.library.opcheck(fwd, (x, m.float(), 1, 0.5, 0.0, 1.0, 0.0, False))
        torch.library.opcheck(fwd, (x, m.long(), 0, 0.5, 0.0, 1.0, 0.0, True))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    def step(x, m):
        a = fastalign.orpo_loss_from_tokens(x, m, beta=0.2, backend=backend)
        b = fastalign.simpo_loss_from_tokens(x, m, beta=2.0, gamma=0.3, backend=backend)
        c = fastalign.cpo_loss_from_tokens(x, m, loss_type="hinge", beta=0.5, backend=backend)
        return a.losses.mean() + b.losses.mean() + c.losses.mean() + 0 * a.chosen_rewards.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x, m = _tokens(3, 11, device, torch.float32)
    got, want = compiled(x, m), step(x, m)
    g1, g2 = _grad(got, x, None), _grad(want, x, None)
    if device == "cpu":  # aot_eager runs the same eager kernels in the same order: the same bits
        assert torch.equal(got, want) and torch.equal(g1, g2)
        return
    # inductor fuses and reorders the means: each within its three losses' bounds (their mean:
    # the per-pair bounds' mean plus gamma(4) mean|L|), and two additions, gamma(2)
    err, gerr = 0.0, 0.0
    for kind, mean, beta, gm, alpha in (("orpo", True, 0.2, 0.0, 1.0), ("sigmoid", True, 2.0, 0.3, 0.0),
                                        ("hinge", False, 0.5, 0.0, 1.0)):
        values, errs, pieces = _exact(x, m, kind, mean, beta, gm, alpha, 0.0)
        err = err + errs[0].mean() + (gamma(4) + gamma(2)) * values[0].abs().mean()
        gerr = gerr + _token_grad(x, m, torch.full((3,), 1 / 3), kind, mean, beta, gm, alpha, 0.0, pieces)[1]
    assert_within(got, want, 2 * err, "compiled step vs eager")
    assert_within(g1, g2, 2 * gerr + U32 * g2.abs().cpu().double(), "compiled grad vs eager")


# ---- bad inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend, device):
    x, m = torch.randn(4, 5, device=device).clamp(max=-0.1), torch.ones(4, 5, device=device)
    o, c, s = fastalign.orpo_loss_from_tokens, fastalign.cpo_loss_from_tokens, fastalign.simpo_loss_from_tokens
    for fn in (o, c, s):
        name = fn.__name__
        with pytest.raises(TypeError, match=f"{name}: policy_token_logps must be a tensor"):
            fn([[0.0]], m, backend=backend)
        with pytest.raises(TypeError, match="policy_token_logps must be float32, bfloat16 or float16"):
            fn(x.double(), m, backend=backend)
        with pytest.raises(ValueError, match=r"policy_token_logps must be 2-D \[2B, T\]"):
            fn(x[0], m[0], backend=backend)
        with pytest.raises(ValueError, match="even number of rows"):
            fn(x[:3], m[:3], backend=backend)
        with pytest.raises(ValueError, match="mask must have the shape of policy_token_logps"):
            fn(x, m[:, :4], backend=backend)
        with pytest.raises(TypeError, match="mask must be a tensor"):
            fn(x, None, backend=backend)
        with pytest.raises(TypeError, match="mask must be bool or a real"):
            fn(x, m.to(torch.complex64), backend=backend)
        for beta in (0, -0.1, float("inf"), float("nan"), True, "0.1", None, 1e-300):
            with pytest.raises(ValueError, match=f"{name}: beta must be a finite number > 0"):
                fn(x, m, beta=beta, backend=backend)
        for w in (-0.5, float("nan"), float("inf"), "1", None, True):
            with pytest.raises(ValueError, match=f"{name}: nll_weight must be a finite number >= 0"):
                fn(x, m, nll_weight=w, backend=backend)
        with pytest.raises(ValueError, match="backend must be one of"):
            fn(x, m, backend="jax")
    for fn in (c, s):
        for eps in (-0.1, 0.5, 0.7, float("nan"), None):
            with pytest.raises(ValueError, match=r"label_smoothing must be a finite number in \[0, 0.5\)"):
                fn(x, m, label_smoothing=eps, backend=backend)
    with pytest.raises(ValueError, match="unknown loss_type 'robust'; valid choices: sigmoid, hinge, ipo, simpo"):
        c(x, m, loss_type="robust", backend=backend)
    for g in (float("nan"), float("inf"), "0.5", None):
        with pytest.raises(ValueError, match="simpo_loss_from_tokens: gamma must be a finite number"):
            s(x, m, gamma=g, backend=backend)
        with pytest.raises(ValueError, match="cpo_loss_from_tokens: simpo_gamma must be a finite number"):
            c(x, m, simpo_gamma=g, backend=backend)
    for bad in ("yes", 2, 0.5):
        with pytest.raises(TypeError, match="average_log_prob must be a bool"):
            c(x, m, average_log_prob=bad, backend=backend)
    with pytest.raises(ValueError, match="mask is on meta but policy_token_logps on"):
        o(x, m.to("meta"), backend=backend)


def test_raw_ops_check_their_arguments():
    # the public functions validate first; the raw ops guard direct calls (csrc/ref_free_checks.h,
    # the Triton launchers' _check) and refuse one meta tensor among CPU tensors (the fakes' check)
    x, m = torch.randn(4, 3), torch.ones(4, 3, dtype=torch.bool)
    stats = torch.zeros(2, 4)
    for backend, (fwd, bwd) in RF._OPS.items():
        if backend == "cuda":
            continue
        for args in ((x.to("meta"), m), (x, m.to("meta"))):
            with pytest.raises(RuntimeError, match=r"is on (meta|cpu) but .* on (cpu|meta)"):
                fwd(*args, 0, 0.1, 0.0, 1.0, 0.0, True)
        with pytest.raises(RuntimeError, match=r"is on (meta|cpu) but .* on (cpu|meta)"):
            bwd(torch.ones(2), stats.to("meta"), x, m, 0, 0.1, 0.0, 1.0, 0.0, True)
        with pytest.raises((RuntimeError, ValueError), match="even number of rows|2B rows"):
            fwd(x[:3], m[:3], 0, 0.1, 0.0, 1.0, 0.0, True)
        with pytest.raises((RuntimeError, ValueError), match=r"row_stats must be \[2, 2B\]|\[2, 2B\]"):
            bwd(torch.ones(2), stats[:, :3], x, m, 0, 0.1, 0.0, 1.0, 0.0, True)
    if "cpp" in RF._OPS:
        fwd, bwd = RF._OPS["cpp"]
        for args, match in (((x, m, 4, 0.1, 0.0, 1.0, 0.0, True), "kind must be 0..3"),
                            ((x, m, 0, 0.0, 0.0, 1.0, 0.0, True), "beta must be"),
                            ((x, m, 1, 0.1, float("nan"), 1.0, 0.0, True), "gamma must be finite"),
                            ((x, m, 1, 0.1, 0.0, -1.0, 0.0, True), "nll_weight must be"),
                            ((x, m, 1, 0.1, 0.0, 1.0, 0.5, True), "label_smoothing must be"),
                            ((x.int(), m, 1, 0.1, 0.0, 1.0, 0.0, True), "must be float32")):
            with pytest.raises(RuntimeError, match=match):
                fwd(*args)
        with pytest.raises(RuntimeError, match=r"grad must be \[B\]"):
            bwd(torch.ones(3), stats, x, m, 0, 0.1, 0.0, 1.0, 0.0, True)


_COMPILE_SCRIPT = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from fastalign.kernels.triton import ref_free as K

def build(kernel, sig, consts, warps=4):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    sig = {name: sig[name] for name in kernel.arg_names}
    src = ASTSource(kernel, sig, constexprs=consts)
    assert compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["cubin"]

scal = {"beta": "fp32", "gamma": "fp32", "alpha": "fp32", "eps": "fp32", "half_inv_beta": "fp32"}
outs = {n: "*fp32" for n in ("loss_ptr", "cw_ptr", "rw_ptr", "nll_ptr", "z_ptr", "st_ptr")}
for dt in ("fp32", "bf16", "fp16"):
    for kind in range(4):
        for mean in (False, True):
            build(K._fwd_kernel, dict(outs, x_ptr=f"*{dt}", m_ptr="*u8", B="i32", T="i64", **scal),
                  {"KIND": kind, "MEAN": mean, "BLOCK": 1024})
            build(K._bwd_kernel, dict(go_ptr="*fp32", st_ptr="*fp32", m_ptr="*u8", gx_ptr=f"*{dt}", B="i64", T="i32",
                                      **scal), {"KIND": kind, "MEAN": mean, "BLOCK": 256}, 1)
print("compiled")
"""


@requires_nvidia_compiler
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    # the interpreter does not exercise Triton's compiler (constexpr branches, scalar where, tuple
    # returns, dtype casts on store): compile every specialisation to a cubin for sm_90
    run_triton_compile_script(_COMPILE_SCRIPT, timeout=900)
