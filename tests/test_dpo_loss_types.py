"""Every DPO loss type of TRL 1.16 (fastalign/kernels/reference_dpo_types.py): each type and
weighted combinations on every backend against the eager reference evaluated exactly (fp64),
forward and backward; against TRL 1.16's formulas (re-derived here, and TRL's own
DPOTrainer._compute_loss called on a stub trainer); f-divergences, LD-DPO, WPO; extreme
log-ratios; bad inputs; opcheck and torch.compile of the general ops.

Tolerances. The fused kernels compute in fp32 from the stored inputs; the reference here is the
same formula in fp64 on the same stored values, so the difference is fp32 rounding only:
  * the log-ratios cr = c - ref_c, rr = r - ref_r round once each (<= u (|c| + |ref_c|)), and for
    dpo_loss_from_tokens the sequence sums carry numerics.sum_bound (any order, n tokens). Their
    effect on a loss or gradient is measured, not estimated: the fp64 formula re-evaluated at
    cr +- delta_c, rr +- delta_r (all four sign combinations; delta is twice the bound), max change;
  * the evaluation itself: at most _OPS fp32 operations per type, each exact to EXP_ULPS ulps
    (transcendentals; 1/2 ulp for the rest), on intermediates bounded by the magnitude M below:
    _OPS * fn_error(1) * (|result| + M) per type and weight.
A wrong formula (a factor, a sign, a missing term) errs by O(term), far above these bounds.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import fastalign
from fastalign.kernels import reference_dpo_types as RT
from fastalign.ops import preference as P
from tests.conftest import backend_params
from tests.numerics import EXP_ULPS, assert_within, sum_bound, unit_roundoff

BACKENDS = backend_params()
FUSED_BACKENDS = [p for p in BACKENDS if p.id != "torch-cpu"]
U32 = unit_roundoff(torch.float32)
_FN = 2 * EXP_ULPS * U32  # one fp32 transcendental, relative (numerics.fn_error)
_OPS = 16  # fp32 operations per type, an upper count over the formulas of reference_dpo_types
PAIR_TYPES = RT.FUSED_TYPES
ALL_TYPES = RT.FUSED_TYPES + RT.BATCH_TYPES
KW = dict(beta=0.3, label_smoothing=0.1, discopop_tau=0.05)


def _pairs(n, dtype, scale=4.0, device="cpu"):
    # sequence log-probs of a few tokens each: negative, log-ratios of O(scale)
    c, r, rc, rr = (-(torch.rand(n) * 3 * scale) for _ in range(4))
    return [t.to(dtype).to(device).requires_grad_() for t in (c, r, rc, rr)]


def _lengths(n, device="cpu"):
    return torch.randint(1, 40, (n,), device=device), torch.randint(1, 40, (n,), device=device)


def _pair_ref64(names, weights, cr, rr, nc, nr, beta, eps, fdiv="reverse_kl", alpha=0.5, tau=0.05):
    """sum_k w_k L_k and (dL/dcr, dL/drr), fp64, of the per-pair types at the log-ratios cr, rr."""
    cr = cr.detach().double().requires_grad_()
    rr = rr.detach().double().requires_grad_()
    total = sum(w * RT.pair_type_losses(n, cr, rr, nc.double(), nr.double(), beta, eps, fdiv, alpha, tau)
                for n, w in zip(names, weights))
    gc, gr = torch.autograd.grad(total.sum(), (cr, rr))
    return total.detach(), gc, gr


def _magnitude(names, weights, cr, rr, nc, nr, beta, fdiv, alpha):
    """M: the sum over types of |w| times the largest intermediates they evaluate (fp64)."""
    sc, sr = RT.f_divergence_scores(cr, fdiv, alpha), RT.f_divergence_scores(rr, fdiv, alpha)
    m = 1 + (beta + 1) * (sc.abs() + sr.abs() + cr.abs() + rr.abs()) + (sc / nc).abs() + (sr / nr).abs()
    if "discopop" in names:
        m = m * (1 + 1 / KW["discopop_tau"])  # x / tau
    return sum(abs(w) for w in weights) * m


def _bounds(names, weights, cr, rr, dcr, drr, nc, nr, beta, eps, fdiv="reverse_kl", alpha=0.5, tau=0.05):
    """(tol of the losses, tol of dL/dcr, tol of dL/drr): the measured effect of the log-ratio
    errors dcr, drr plus the fp32 evaluation error (module docstring)."""
    L, gc, gr = _pair_ref64(names, weights, cr, rr, nc, nr, beta, eps, fdiv, alpha, tau)
    sens = [torch.zeros_like(L) for _ in range(3)]
    for sc in (-2, 2):
        for sr in (-2, 2):
            out = _pair_ref64(names, weights, cr + sc * dcr, rr + sr * drr, nc, nr, beta, eps, fdiv, alpha, tau)
            sens = [torch.maximum(s, (o - v).abs()) for s, o, v in zip(sens, out, (L, gc, gr))]
    m = _magnitude(names, weights, cr.double(), rr.double(), nc.double(), nr.double(), beta, fdiv, alpha)
    _, dsc = _score_grad(cr, fdiv, alpha)
    _, dsr = _score_grad(rr, fdiv, alpha)
    grow = max(beta, 1.0) * (1 + dsc.abs() + dsr.abs())
    return (sens[0] + _OPS * _FN * (L.abs() + m), sens[1] + _OPS * _FN * (gc.abs() + m * grow),
            sens[2] + _OPS * _FN * (gr.abs() + m * grow)), (L, gc, gr)


def _score_grad(t, fdiv, alpha):
    t = t.detach().double().requires_grad_()
    s = RT.f_divergence_scores(t, fdiv, alpha)
    return s.detach(), torch.autograd.grad(s.sum(), t)[0]


def _check_pairs(got, c, r, rc, rr, names, weights, nc, nr, beta, eps, fdiv="reverse_kl", alpha=0.5, tau=0.05,
                 what=""):
    """got = (losses, grads of c, r, rc, rr) of a dpo_loss call; checked against the fp64 reference."""
    losses, g_c, g_r, g_rc, g_rr = got
    cr64 = c.detach().double() - rc.detach().double()
    rr64 = r.detach().double() - rr.detach().double()
    dcr = 2 * U32 * (c.detach().double().abs() + rc.detach().double().abs())
    drr = 2 * U32 * (r.detach().double().abs() + rr.detach().double().abs())
    (tl, tgc, tgr), (L, gc, gr) = _bounds(names, weights, cr64, rr64, dcr, drr, nc, nr, beta, eps, fdiv, alpha, tau)
    assert_within(losses, L, tl, f"{what} losses")
    store = unit_roundoff(c.dtype)  # the gradients come back in the inputs' dtype
    assert_within(g_c, gc, tgc + store * gc.abs(), f"{what} d/dchosen")
    assert_within(g_rc, -gc, tgc + store * gc.abs(), f"{what} d/dref_chosen")
    assert_within(g_r, gr, tgr + store * gr.abs(), f"{what} d/drejected")
    assert_within(g_rr, -gr, tgr + store * gr.abs(), f"{what} d/dref_rejected")


def _run(ins, **kw):
    for t in ins:
        t.grad = None
    losses, cw, rw = fastalign.dpo_loss(*ins, **kw)
    losses.sum().backward()
    return (losses.detach(), *(t.grad for t in ins)), cw, rw


# ---- each per-pair type, lists of them, f-divergences: dpo_loss ----------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", PAIR_TYPES)
def test_each_pair_type_matches_reference(backend, device, dtype, name):
    ins = _pairs(37, dtype, device=device)
    nc, nr = _lengths(37, device)
    got, cw, rw = _run(ins, loss_type=[name], chosen_lengths=nc, rejected_lengths=nr, backend=backend, **KW)
    _check_pairs(got, *ins, [name], [1.0], nc.cpu(), nr.cpu(), KW["beta"], KW["label_smoothing"], what=name)
    c, r, rc, rr = (t.detach().float() for t in ins)
    assert torch.equal(cw, KW["beta"] * (c - rc)) and torch.equal(rw, KW["beta"] * (r - rr))
    assert not cw.requires_grad and not rw.requires_grad


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_weighted_list_of_types_in_one_pass(backend, device):
    names = ["sigmoid", "nca_pair", "sppo_hard", "discopop", "ipo_norm", "apo_down", "sigmoid"]
    weights = [0.8, 0.2, 0.05, 1.5, 0.01, -0.3, 0.25]  # sigmoid twice: the weights add up
    ins = _pairs(29, torch.float32, device=device)
    nc, nr = _lengths(29, device)
    got, _, _ = _run(ins, loss_type=names, loss_weights=weights, chosen_lengths=nc, rejected_lengths=nr,
                     backend=backend, **KW)
    _check_pairs(got, *ins, names, weights, nc.cpu(), nr.cpu(), KW["beta"], KW["label_smoothing"], what="list")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fdiv,alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                        ("alpha_divergence", 1.7)])
def test_f_divergences(backend, device, fdiv, alpha):
    names = ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm", "ipo_norm"]
    weights = [1.0, 0.5, 0.01, 0.7, 0.3, 0.2, 0.4, 0.01]
    ins = _pairs(41, torch.float32, scale=1.0, device=device)
    nc, nr = _lengths(41, device)
    got, _, _ = _run(ins, loss_type=names, loss_weights=weights, chosen_lengths=nc, rejected_lengths=nr,
                     f_divergence_type=fdiv, f_alpha_divergence_coef=alpha, backend=backend, **KW)
    _check_pairs(got, *ins, names, weights, nc.cpu(), nr.cpu(), KW["beta"], KW["label_smoothing"], fdiv, alpha,
                 what=fdiv)


@pytest.mark.parametrize("backend,device", FUSED_BACKENDS)
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "robust"])
def test_general_op_equals_original_op_bitwise(backend, device, name):
    # the general kernels evaluate the original four types with the same expressions: one type of
    # weight 1 under the reverse KL gives the original ops' bits, forward and backward
    ins = _pairs(33, torch.float32, device=device)
    kid = PAIR_TYPES.index(name)
    (dpo_f, dpo_b), (multi_f, multi_b) = P._DPO[backend], P._MULTI[backend]
    det = [t.detach() for t in ins]
    old = dpo_f(*det, 0.3, kid, 0.1)
    new = multi_f(*det, None, 0.3, [kid], [1.0], 0.1, 0, 0.5, 0.05)
    assert all(torch.equal(a, b) for a, b in zip(old, new))
    go = torch.randn(33, device=device)
    g_old = dpo_b(go, *det, 0.3, kid, 0.1)
    g_c, g_r = multi_b(go, *det, None, 0.3, [kid], [1.0], 0.1, 0, 0.5, 0.05)
    assert torch.equal(g_c, g_old) and torch.equal(g_r, -g_old)


def test_old_api_forms_are_the_same_call():
    ins = _pairs(9, torch.float32)
    a = fastalign.dpo_loss(*ins, loss_type="robust", label_smoothing=0.2)[0]
    b = fastalign.dpo_loss(*ins, loss_type=["robust"], loss_weights=[1.0], label_smoothing=0.2)[0]
    assert torch.equal(a, b)


# ---- batch types (torch composites on every backend) ---------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", RT.BATCH_TYPES)
def test_batch_types_match_reference(backend, device, name):
    ins = _pairs(23, torch.float32, device=device)
    nc, nr = _lengths(23, device)
    got, _, _ = _run(ins, loss_type=[name, "bco_pair"], loss_weights=[0.7, 0.3], chosen_lengths=nc,
                     rejected_lengths=nr, backend=backend, **KW)
    x64 = [t.detach().double().cpu().requires_grad_() for t in ins]
    L, _, _ = RT.dpo_type_losses(*x64, [name, "bco_pair"], [0.7, 0.3], KW["beta"], KW["label_smoothing"],
                                 chosen_lengths=nc.cpu(), rejected_lengths=nr.cpu())
    grads = torch.autograd.grad(L.sum(), x64)
    # every loss and gradient here is 1-Lipschitz in beta * (log-prob differences) or a mean of
    # the log-probs (sft): the input roundings (4 u max|x| per difference, sum_bound for sft's
    # batch sum) times beta or 1/sum(n), plus _OPS fp32 operations on O(1 + |beta x|) values
    mags = sum(t.detach().double().abs().cpu() for t in ins)
    sft_err = sum_bound(ins[0].detach().double().abs().sum(), 23) / nc.sum().double()
    tol = 4 * U32 * mags.max() + sft_err + _OPS * _FN * (1 + L.abs() + KW["beta"] * mags.max())
    assert_within(got[0].cpu(), L.detach(), tol, f"{name} losses")
    for g, want in zip(got[1:], grads):
        assert_within(g.cpu(), want, tol, f"{name} gradient")


def test_aot_entries_are_sorted_deltas():
    # AOT's per-pair entries come from the sorted margins (TRL's definition): a permutation of the
    # pairs leaves them unchanged
    ins = _pairs(16, torch.float32)
    a = fastalign.dpo_loss(*ins, loss_type="aot", beta=0.5)[0]
    perm = torch.randperm(16)
    b = fastalign.dpo_loss(*(t[perm] for t in ins), loss_type="aot", beta=0.5)[0]
    assert torch.equal(a, b)


# ---- dpo_loss_from_tokens: the general fused head, LD-DPO, WPO --------------------------------------


def _tokens(pairs, steps, dtype, device="cpu"):
    pol = (-torch.rand(2 * pairs, steps) * 2).to(dtype).to(device).requires_grad_()
    ref = (-torch.rand(2 * pairs, steps) * 2).to(dtype).to(device)
    lens = torch.randint(1, steps + 1, (2 * pairs,))
    mask = (torch.arange(steps)[None] < lens[:, None]).to(device)
    return pol, ref, mask


def _tokens_ref64(pol, ref, mask, names, weights, ld_alpha=None, lssp=None, **kw):
    """The whole head in fp64: weighted token sums, the reference losses, WPO weights; and the
    gradient w.r.t. the policy tokens."""
    p64 = pol.detach().double().cpu().requires_grad_()
    q64, m = ref.detach().double().cpu(), mask.cpu()
    w = RT.ld_token_weights(m, ld_alpha).double() if ld_alpha is not None else m.double()
    ps, qs = (p64 * w).sum(-1), (q64 * w).sum(-1)
    n = m.sum(-1).double()
    b = ps.shape[0] // 2
    pw = None
    if lssp is not None:
        valid = m != 0
        wr = torch.exp(torch.where(valid, p64.detach() - lssp.double().cpu(), 0.0).sum(-1) / n.clamp(min=1))
        pw = wr[:b] * wr[b:]
    L, _, _ = RT.dpo_type_losses(ps[:b], ps[b:], qs[:b], qs[b:], names, weights, kw["beta"], kw["label_smoothing"],
                                 kw.get("f_divergence_type", "reverse_kl"), kw.get("f_alpha_divergence_coef", 0.5),
                                 kw["discopop_tau"], n[:b], n[b:], pw)
    (g,) = torch.autograd.grad(L.sum(), p64)
    pw = torch.ones(b, dtype=torch.float64) if pw is None else pw
    return L.detach(), g, (ps.detach(), qs, p64.detach().abs().mul(w).sum(-1), q64.abs().mul(w).sum(-1), n, pw)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["pair_types", "with_batch_types", "ld_wpo", "fdiv_norm"])
def test_from_tokens_general_matches_reference(backend, device, dtype, case):
    names, weights, extra = {
        "pair_types": (["sigmoid", "exo_pair", "bco_pair", "apo_zero"], [1.0, 0.3, 0.5, 2.0], {}),
        "with_batch_types": (["sigmoid", "sft", "aot", "aot_unpaired"], [1.0, 0.2, 0.3, 0.4], {}),
        "ld_wpo": (["robust", "nca_pair", "sigmoid_norm"], [1.0, 0.5, 0.5], {"ld_alpha": 0.3}),
        "fdiv_norm": (["sigmoid", "ipo_norm", "discopop"], [1.0, 0.1, 0.3], {"f_divergence_type": "js_divergence"}),
    }[case]
    pol, ref, mask = _tokens(6, 50, dtype, device)
    lssp = None
    if case == "ld_wpo":
        lssp = (-torch.rand(12, 50) * 0.5 - 0.05).to(device)
        extra = {**extra, "use_weighting": True, "log_sum_sq_probs": lssp}
    losses, cw, rw = fastalign.dpo_loss_from_tokens(pol, ref, mask, loss_type=names, loss_weights=weights,
                                                    backend=backend, **KW, **extra)
    (g,) = torch.autograd.grad(losses.sum(), pol)
    kw = {**KW, **{k: v for k, v in extra.items() if k.startswith("f_")}}
    L, g64, (ps, qs, pabs, qabs, n, pw) = _tokens_ref64(pol, ref, mask, names, weights, extra.get("ld_alpha"), lssp, **kw)
    # the sequence sums: any order over 50 tokens (sum_bound) plus the LD weight multiply (u each)
    serr = sum_bound(pabs, 50) + sum_bound(qabs, 50) + U32 * (pabs + qabs)
    b = 6
    fdiv = kw.get("f_divergence_type", "reverse_kl")
    pair_names = [x for x in names if x in PAIR_TYPES]
    pair_w = [w for x, w in zip(names, weights) if x in PAIR_TYPES]
    cr, rr = ps[:b] - qs[:b], ps[b:] - qs[b:]
    (tl, tgc, tgr), _ = _bounds(pair_names, pair_w, cr, rr, serr[:b] + U32 * cr.abs(), serr[b:] + U32 * rr.abs(),
                                n[:b], n[b:], KW["beta"], KW["label_smoothing"], fdiv)
    # the batch types: 1-Lipschitz in beta x or the token mean (as test_batch_types_match_reference)
    scale, extra_row = 1.0, 0.0
    if len(pair_names) < len(names):
        tl = tl + KW["beta"] * 4 * serr.max() + _OPS * _FN * (1 + L.abs() + KW["beta"] * ps.abs().max())
        scale = 1 + KW["beta"]
        extra_row = KW["beta"] ** 2 * 4 * serr.max() + _OPS * _FN * (1 + g64.abs().amax(-1))
    # the WPO weight (<= pw, an exp of a token mean: fp32, detached) multiplies loss and gradients
    tl = tl * pw + _OPS * _FN * L.abs()
    pw2 = torch.cat([pw, pw])
    assert_within(losses.cpu(), L, tl, f"{case} losses")
    # a token's gradient is its row's scalar (dL/dcr or dL/drr, + sft's -1/sum(n)) times its LD weight
    w = RT.ld_token_weights(mask.cpu(), extra["ld_alpha"]).double() if "ld_alpha" in extra else mask.cpu().double()
    rowtol = torch.cat([tgc, tgr]) * scale * pw2 + extra_row
    tol_tok = rowtol[:, None] * w + unit_roundoff(dtype) * g64.abs() + _OPS * _FN * g64.abs()
    assert_within(g.cpu(), g64, tol_tok, f"{case} token gradients")
    assert_within(cw.cpu(), KW["beta"] * cr, KW["beta"] * (serr[:b] + 2 * U32 * cr.abs()) + U32, "chosen rewards")


# ---- TRL 1.16: the formulas re-derived, and its own DPOTrainer._compute_loss ----------------------


def _trl_formula(name, cs, rs, cl, rl, nc, nr, beta, eps, tau):
    """TRL 1.16 trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss, the per-type branch of its loss
    loop, re-derived: cs, rs the f-divergence scores, cl, rl the raw log-ratios, nc, nr the
    completion token counts. (label_smoothing enters robust, exo_pair and the aot types only.)"""
    d = cs - rs
    if name == "sigmoid":
        return -F.logsigmoid(beta * d)
    if name == "hinge":
        return torch.relu(1 - beta * d)
    if name == "ipo":  # TRL's ipo averages the scores over the tokens: fastalign's ipo_norm
        return (cs / nc - rs / nr - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        q, lq = torch.sigmoid(beta * d), F.logsigmoid(beta * d)
        ql, lql = torch.sigmoid(-beta * d), F.logsigmoid(-beta * d)
        return q * (lq - math.log1p(-eps)) + ql * (lql - math.log(eps))
    if name == "nca_pair":
        return -F.logsigmoid(beta * cl) - 0.5 * F.logsigmoid(-beta * cl) - 0.5 * F.logsigmoid(-beta * rl)
    if name == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -F.logsigmoid(beta * cl) - F.logsigmoid(-beta * rl)
    if name == "sppo_hard":
        return (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2
    if name == "apo_zero":
        return 1 - torch.sigmoid(beta * cl) + torch.sigmoid(beta * rl)
    if name == "apo_down":
        return torch.sigmoid(beta * cl) + 1 - torch.sigmoid(beta * (cl - rl))
    if name == "discopop":  # as written: exp(-x) * modulation (inf * 0 = NaN at |x| ~ 90: moderate x here)
        x = beta * d
        m = torch.sigmoid(x / tau)
        return -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m
    if name == "sigmoid_norm":
        return -F.logsigmoid(beta * (cs / nc - rs / nr))
    raise AssertionError(name)


# TRL's name -> fastalign's, and whether fastalign's type applies label_smoothing where TRL's does not
_TRL_NAMES = {n: n for n in PAIR_TYPES if n != "ipo_norm"} | {"ipo": "ipo_norm"}
_TRL_PAIR = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
             "apo_down", "discopop", "sigmoid_norm"]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("trl_name", _TRL_PAIR)
def test_each_type_equals_trl_formula(backend, device, trl_name):
    ins = _pairs(31, torch.float32, scale=1.0, device=device)
    nc, nr = _lengths(31, device)
    name = _TRL_NAMES[trl_name]
    eps = 0.0 if trl_name in ("sigmoid", "sigmoid_norm") else 0.1  # TRL's sigmoid ignores label smoothing
    got, _, _ = _run(ins, loss_type=name, beta=0.3, label_smoothing=eps, discopop_tau=0.05, chosen_lengths=nc,
                     rejected_lengths=nr, backend=backend)
    x64 = [t.detach().double().cpu().requires_grad_() for t in ins]
    cl, rl = x64[0] - x64[2], x64[1] - x64[3]
    want = _trl_formula(trl_name, cl, rl, cl, rl, nc.cpu().double(), nr.cpu().double(), 0.3, eps, 0.05)
    grads = torch.autograd.grad(want.sum(), x64)
    tol = 1e3 * U32 * (1 + want.detach().abs())  # fp32 vs fp64 of O(1) values: a few hundred ulps at most
    assert_within(got[0].cpu(), want.detach(), tol, f"{trl_name} vs TRL")
    for g, w in zip(got[1:], grads):
        assert_within(g.cpu(), w, 1e3 * U32 * (1 + w.abs()), f"{trl_name} gradient vs TRL")


def _trl_trainer_stub(loss_types, weights, beta, eps, fdiv="reverse_kl", alpha=0.5, ld_alpha=None, use_weighting=False,
                      tau=0.05, policy=None, ref=None):
    """The attributes DPOTrainer._compute_loss reads, on a plain namespace: the loss configuration,
    a model and a reference model returning the given per-token log-probs, identity gathers."""

    class Model(torch.nn.Module):  # accelerate's is_peft_model inspects a Module's submodules
        is_gradient_checkpointing = False

        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, **kwargs):
            return self.out

    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    return types.SimpleNamespace(
        model=Model(policy), ref_model=Model(ref), accelerator=acc, ld_alpha=ld_alpha, precompute_ref_logps=False,
        f_divergence_type=fdiv, f_alpha_divergence_coef=alpha, loss_types=list(loss_types),
        loss_weights=list(weights), beta=beta, label_smoothing=eps, use_weighting=use_weighting,
        args=types.SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None), aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)


_TRL_CASES = [
    (["sigmoid"], None, {}),
    (["sigmoid", "sft"], [1.0, 0.5], {}),  # RPO
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {"eps": 0.1}),  # MPO, label smoothing TRL's sigmoid ignores
    (["hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"], [1, 0.1, 0.5, 0.5, 0.3, 1], {"eps": 0.05}),
    (["nca_pair", "sppo_hard", "apo_zero", "apo_down", "aot", "aot_unpaired"], [1, 0.01, 1, 1, 0.5, 0.5], {}),
    (["sigmoid", "ipo", "robust"], [1, 0.1, 1], {"fdiv": "alpha_divergence", "alpha": 0.3, "eps": 0.1}),
    (["sigmoid", "sigmoid_norm", "exo_pair"], [1, 1, 1], {"fdiv": "js_divergence", "eps": 0.01}),
    (["sigmoid", "hinge"], [1, 1], {"fdiv": "forward_kl"}),
    (["sigmoid", "nca_pair"], [1, 0.5], {"ld_alpha": 0.4, "use_weighting": True}),
    (["sigmoid", "sft", "aot"], [1, 0.3, 0.2], {"ld_alpha": 0.6, "eps": 0.2}),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", range(len(_TRL_CASES)), ids=lambda i: "+".join(_TRL_CASES[i][0]))
def test_equals_trl_dpo_trainer_compute_loss(backend, device, case):
    """TRL 1.16's own DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py) on a stub trainer whose
    model returns given token log-probs; fastalign.integrations.trl.dpo_loss_like_trl on the same."""
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    from fastalign.integrations.trl import dpo_loss_like_trl

    names, weights, opt = _TRL_CASES[case]
    pairs, steps = 5, 24
    lens = torch.randint(1, steps, (2 * pairs,))
    completion = (torch.arange(steps + 1)[None] >= 1) & (torch.arange(steps + 1)[None] <= lens[:, None])
    shift = completion[:, 1:]
    pol = torch.where(shift, -torch.rand(2 * pairs, steps) * 2, 0.0).requires_grad_()
    ref = torch.where(shift, -torch.rand(2 * pairs, steps) * 2, 0.0)
    lssp = -torch.rand(2 * pairs, steps) * 0.5 - 0.05
    out = types.SimpleNamespace(log_probs=pol, entropy=torch.zeros_like(pol), mean_logits=torch.zeros_like(pol),
                                is_top1=torch.zeros_like(shift), log_sum_sq_probs=lssp)
    stub = _trl_trainer_stub(names, weights or [1.0] * len(names), 0.2, opt.get("eps", 0.0),
                             opt.get("fdiv", "reverse_kl"), opt.get("alpha", 0.5), opt.get("ld_alpha"),
                             opt.get("use_weighting", False), policy=out,
                             ref=types.SimpleNamespace(log_probs=ref))
    inputs = {"input_ids": torch.zeros(2 * pairs, steps + 1, dtype=torch.long),
              "attention_mask": torch.ones(2 * pairs, steps + 1, dtype=torch.long), "completion_mask": completion.long()}
    want = DPOTrainer._compute_loss(stub, stub.model, inputs, False)
    (g_want,) = torch.autograd.grad(want, pol)
    # TRL sums every position, relying on its LM head to return 0 (without gradient) at label -100:
    # the stub's log-probs are plain tensors, so the gradient TRL's sum puts there is dropped here
    g_want = torch.where(shift, g_want, 0.0)
    got = dpo_loss_like_trl(pol.to(device), ref.to(device), shift.to(device), beta=0.2, loss_type=names,
                            loss_weights=weights, label_smoothing=opt.get("eps", 0.0),
                            f_divergence_type=opt.get("fdiv", "reverse_kl"),
                            f_alpha_divergence_coef=opt.get("alpha", 0.5), ld_alpha=opt.get("ld_alpha"),
                            use_weighting=opt.get("use_weighting", False),
                            log_sum_sq_probs=lssp.to(device) if opt.get("use_weighting") else None, backend=backend)
    (g_got,) = torch.autograd.grad(got, pol)
    # both in fp32: sums of <= 24 tokens in other orders (sum_bound) and a few transcendentals per
    # type; the losses are O(1..100) (sppo's squares): relative 1e-5 covers both, a wrong term does not
    scale = 1 + want.detach().abs()
    assert_within(got.detach().cpu(), want.detach(), 2e-5 * scale, "loss vs TRL")
    assert_within(g_got.cpu(), g_want, 2e-5 * (1 + g_want.abs().max()), "token gradient vs TRL")


# ---- extreme log-ratios -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ALL_TYPES)
def test_extreme_log_ratios_finite(backend, device, name):
    big = torch.tensor([1e4, -1e4, 1e4, -1e4, 5e3, 0.0, 88.0, -88.0])
    small = torch.tensor([-1e4, 1e4, 1e4, -1e4, -5e3, 0.0, -88.0, 88.0])
    z = torch.zeros(8)
    ins = [t.to(device).requires_grad_() for t in (big, small, z, z.clone())]
    n = torch.full((8,), 7, device=device)
    fdivs = ["reverse_kl"] + (["forward_kl", "js_divergence", "alpha_divergence"]
                              if name in ("sigmoid", "hinge", "robust", "exo_pair", "discopop", "sigmoid_norm") else [])
    for fdiv in fdivs:
        got, _, _ = _run(ins, loss_type=name, beta=0.1, label_smoothing=0.1, chosen_lengths=n, rejected_lengths=n,
                         f_divergence_type=fdiv, backend=backend)
        for t in got:  # None: an input the type does not read (sft: only the chosen log-probs)
            assert t is None or torch.isfinite(t).all(), (name, fdiv, t)


# ---- bad inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_inputs_name_the_argument(backend, device):
    c, r, rc, rr = (torch.randn(4, device=device) for _ in range(4))
    d = lambda **kw: fastalign.dpo_loss(c, r, rc, rr, backend=backend, **kw)  # noqa: E731
    n = torch.ones(4, device=device)
    with pytest.raises(ValueError, match="loss_weights must be a list with one weight per loss type"):
        d(loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="loss_weights must be finite"):
        d(loss_type=["sigmoid"], loss_weights=[float("nan")])
    with pytest.raises(ValueError, match="loss_type must be a loss type name or a non-empty list"):
        d(loss_type=[])
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        d(loss_type=["sigmoid", "kto"])
    with pytest.raises(ValueError, match="at most 16 loss types"):
        d(loss_type=["sigmoid"] * 17)
    with pytest.raises(ValueError, match="unknown f_divergence_type 'tv'"):
        d(f_divergence_type="tv")
    with pytest.raises(ValueError, match="f_divergence_type 'js_divergence' is only defined for"):
        d(loss_type=["sigmoid", "nca_pair"], f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="f_alpha_divergence_coef must be a finite number"):
        d(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("inf"))
    with pytest.raises(ValueError, match="discopop_tau must be a finite number > 0"):
        d(loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match="'exo_pair' needs label_smoothing > 0"):
        d(loss_type="exo_pair")
    with pytest.raises(ValueError, match=r"needs chosen_lengths and rejected_lengths"):
        d(loss_type="sigmoid_norm", chosen_lengths=n)
    with pytest.raises(ValueError, match="rejected_lengths must have the shape"):
        d(loss_type="sft", chosen_lengths=n, rejected_lengths=n[:2])
    with pytest.raises(TypeError, match="chosen_lengths must be a real tensor"):
        d(loss_type="ipo_norm", chosen_lengths=[1, 2, 3, 4], rejected_lengths=n)
    with pytest.raises(ValueError, match="pair_weights must have the shape"):
        d(pair_weights=n[:3])
    x, m = torch.randn(4, 5, device=device), torch.ones(4, 5, device=device)
    t = lambda **kw: fastalign.dpo_loss_from_tokens(x, x, m, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"ld_alpha must be None or a number in \[0, 1\]"):
        t(ld_alpha=1.5)
    with pytest.raises(ValueError, match="use_weighting=True \\(WPO\\) needs log_sum_sq_probs"):
        t(use_weighting=True)
    with pytest.raises(ValueError, match="log_sum_sq_probs is only read with use_weighting=True"):
        t(log_sum_sq_probs=x)
    with pytest.raises(ValueError, match="log_sum_sq_probs must have the shape"):
        t(use_weighting=True, log_sum_sq_probs=x[:, :2])
    with pytest.raises(TypeError, match="use_weighting must be a bool"):
        t(use_weighting="yes")
    with pytest.raises(ValueError, match="'sft' needs summed log-probs"):
        t(loss_type=["sigmoid", "sft"], average_log_prob=True)


# ---- opcheck and torch.compile of the general ops ------------------------------------------------


@pytest.mark.parametrize("backend,device", FUSED_BACKENDS)
def test_opcheck_general_ops(backend, device):
    multi_f, multi_b = P._MULTI[backend]
    tok_f, tok_b = P._MULTI_TOK[backend]
    ins = [torch.randn(3, device=device, requires_grad=True) for _ in range(4)]
    lengths = torch.tensor([3.0, 5, 1, 2, 7, 4], device=device)
    args = (0.5, [0, 4, 5, 10, 11], [1.0, 0.5, 0.2, 0.3, 0.1], 0.1, 2, 0.5, 0.05)
    torch.library.opcheck(multi_f, (*ins, lengths, *args))
    torch.library.opcheck(multi_f, (*ins, None, 0.5, [6, 7, 8, 9], [1.0, 1.0, 1.0, 1.0], 0.0, 0, 0.5, 0.05))
    torch.library.opcheck(multi_b, (torch.randn(3, device=device), *(t.detach() for t in ins), lengths, *args))
    x = torch.randn(4, 6, device=device, requires_grad=True)
    q = torch.randn(4, 6, device=device)
    m = torch.rand(4, 6, device=device) > 0.3
    tl = torch.tensor([3.0, 5, 1, 2], device=device)
    torch.library.opcheck(tok_f, (x, q, m, tl, 0.5, [0, 12], [1.0, 0.5], 0.1, 3, 0.4, 0.05, False))
    torch.library.opcheck(tok_f, (x, q, m, None, 0.5, [1, 3], [1.0, 0.5], 0.1, 0, 0.5, 0.05, True))
    pseq, rseq = torch.randn(4, device=device), torch.randn(4, device=device)
    torch.library.opcheck(tok_b, (torch.randn(2, device=device), torch.randn(4, device=device), pseq, rseq,
                                  x.detach(), m, tl, 0.5, [11, 5], [1.0, 0.3], 0.1, 1, 0.5, 0.05, False))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph_general(backend, device):
    def step(pol, ref, mask):
        losses, cw, rw = fastalign.dpo_loss_from_tokens(
            pol, ref, mask, beta=0.1, loss_type=["sigmoid", "sft", "apo_zero", "sigmoid_norm"],
            loss_weights=[1.0, 0.1, 0.5, 0.5], ld_alpha=0.5, backend=backend)
        l2, _, _ = fastalign.dpo_loss(cw, rw, rw, cw, beta=0.5, loss_type=["exo_pair", "discopop"],
                                      label_smoothing=0.01, f_divergence_type="js_divergence", backend=backend)
        return losses.mean() + l2.mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    pol, ref, mask = _tokens(3, 11, torch.float32, device)
    got, want = compiled(pol, ref, mask), step(pol, ref, mask)
    (g1,) = torch.autograd.grad(got, pol)
    (g2,) = torch.autograd.grad(want, pol)
    if device == "cpu":  # aot_eager runs the same eager kernels in the same order: the same bits
        assert torch.equal(got, want) and torch.equal(g1, g2)
    else:  # inductor reorders the torch tail: a few ulps of O(1) values
        assert_within(got, want, 1e-5 * (1 + want.abs()), "compiled loss")
        assert_within(g1, g2, 1e-5 * (1 + g2.abs().max()), "compiled gradient")


# ---- the trainer's dpo algorithm and the TRL config mapping --------------------------------------


def test_trainer_dpo_with_type_list_and_ld_alpha_equals_the_op():
    from collections import Counter

    from fastalign.algorithms import get_algorithm
    from fastalign.algorithms.base import token_logps
    from tests.test_algorithms import TINY, _pairs as prefs

    from fastalign.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    policy, ref = tiny_model(tok, seed=0, **TINY), tiny_model(tok, seed=1, **TINY)
    for cfg in ({"beta": 0.2, "loss_type": ["sigmoid", "sft", "nca_pair", "sigmoid_norm", "aot"],
                 "loss_weights": [1.0, 0.5, 0.3, 0.2, 0.4]},
                {"beta": 0.2, "loss_type": ["robust", "sigmoid_norm", "discopop"], "loss_weights": [1.0, 0.5, 0.2],
                 "ld_alpha": 0.5, "label_smoothing": 0.1, "f_divergence_type": "js_divergence"}):
        dpo = get_algorithm("dpo")(cfg)
        batch = dpo.collate(dpo.encode(prefs(tok), tok, 64, Counter()), tok)
        loss_sum, metrics = dpo.loss({"policy": policy, "reference": ref}, batch)
        pl, mask = token_logps(policy, batch)
        with torch.no_grad():
            rl, _ = token_logps(ref, batch)
        op_kw = {k: v for k, v in cfg.items() if k != "beta"}
        want, _, _ = fastalign.dpo_loss_from_tokens(pl, rl, mask, beta=0.2, backend="torch", **op_kw)
        # the same token log-probs (the same forward), summed in other orders by the two paths
        # (sum_bound of each row), through O(1)-Lipschitz losses (beta <= 1, sft's 1/sum(n) <= 1)
        serr = sum_bound(pl.detach().double().abs().sum(-1) + rl.double().abs().sum(-1), pl.shape[1]).max()
        b = pl.shape[0] // 2
        tol = 4 * b * (serr + _OPS * _FN * (1 + want.detach().abs().max()))
        assert_within(loss_sum.detach(), want.detach().sum().double(), tol, f"trainer loss {cfg['loss_type']}")
        assert math.isfinite(metrics["loss"])


def test_trainer_dpo_config_errors():
    from fastalign.algorithms import get_algorithm
    from fastalign.errors import ConfigError

    with pytest.raises(ConfigError, match="loss_weights must be a list with one weight per loss type"):
        get_algorithm("dpo")({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]})
    with pytest.raises(ConfigError, match="only defined for the loss types"):
        get_algorithm("dpo")({"loss_type": ["bco_pair"], "f_divergence_type": "js_divergence"})
    with pytest.raises(ConfigError, match="use_weighting"):
        get_algorithm("dpo")({"use_weighting": True})
    with pytest.raises(ConfigError, match="ld_alpha"):
        get_algorithm("dpo")({"ld_alpha": 2.0})
    with pytest.raises(ConfigError, match="ld_alpha with loss type 'sft'"):
        get_algorithm("dpo")({"ld_alpha": 0.5, "loss_type": ["sigmoid", "sft"]})


def test_dpo_config_from_trl():
    pytest.importorskip("trl")
    import dataclasses

    from trl import DPOConfig as TRLConfig

    from fastalign.algorithms import get_algorithm
    from fastalign.integrations.trl import dpo_config_from_trl

    # the fields of TRL's DPOConfig (constructing one needs a bf16-capable device here)
    args = types.SimpleNamespace(loss_type=["ipo", "exo_pair", "sft"], loss_weights=[1.0, 0.5, 0.1],
                                 label_smoothing=0.01, f_divergence_type="alpha_divergence",
                                 f_alpha_divergence_coef=0.3, beta=0.2, ld_alpha=None, discopop_tau=0.05,
                                 use_weighting=False)
    assert set(vars(args)) <= {f.name for f in dataclasses.fields(TRLConfig)}
    cfg = dpo_config_from_trl(args)
    assert cfg["loss_type"] == ("ipo_norm", "exo_pair", "sft") and cfg["loss_weights"] == (1.0, 0.5, 0.1)
    assert cfg["f_divergence_type"] == "alpha_divergence" and cfg["f_alpha_divergence_coef"] == 0.3
    dpo = get_algorithm("dpo")(cfg)  # accepted as it is
    assert dpo.needs_lengths
    args.loss_type, args.loss_weights = ["sigmoid"], None
    with pytest.raises(ValueError, match="TRL's sigmoid / sigmoid_norm"):
        dpo_config_from_trl(args)
    args.label_smoothing, args.use_weighting = 0.0, True
    with pytest.raises(ValueError, match="use_weighting"):
        dpo_config_from_trl(args)


_COMPILE_SCRIPT = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from fastalign.kernels.triton import dpo_multi as K

def build(kernel, sig, consts, warps=4):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    sig = {name: sig[name] for name in kernel.arg_names}
    src = ASTSource(kernel, sig, constexprs=consts)
    assert compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["cubin"]

s = {n: "fp32" for n in ("beta", "eps", "half_inv_beta", "robust_scale", "exo_lpw", "exo_lpl", "tau", "am1")}
ALL = (1 << 13) - 1
for types, fdiv in ((ALL, 0), (ALL, 3), (1 | 2048, 1), (1024 | 16, 2)):
    for dt in ("fp32", "bf16"):
        p4 = {n: f"*{dt}" for n in ("c_ptr", "r_ptr", "rc_ptr", "rr_ptr")}
        for has_len in (False, True):
            c = {"TYPES": types, "FDIV": fdiv, "HAS_LEN": has_len}
            build(K._multi_fwd_kernel, dict(p4, len_ptr="*fp32", w_ptr="*fp32", loss_ptr="*fp32", cw_ptr="*fp32",
                  rw_ptr="*fp32", B="i32", **s), dict(c, BLOCK=1024))
            build(K._multi_bwd_kernel, dict(p4, go_ptr="*fp32", len_ptr="*fp32", w_ptr="*fp32", gc_ptr="*fp32",
                  gr_ptr="*fp32", B="i64", **s), dict(c, BLOCK=64))
            build(K._multi_tok_fwd_kernel, dict(p_ptr=f"*{dt}", q_ptr=f"*{dt}", m_ptr="*u8", len_ptr="*fp32",
                  w_ptr="*fp32", loss_ptr="*fp32", cw_ptr="*fp32", rw_ptr="*fp32", ps_ptr="*fp32", qs_ptr="*fp32",
                  B="i32", T="i64", **s), dict(c, MEAN=has_len, BLOCK=1024))
            build(K._multi_tok_bwd_kernel, dict(go_ptr="*fp32", gs_ptr="*fp32", ps_ptr="*fp32", qs_ptr="*fp32",
                  m_ptr="*u8", len_ptr="*fp32", w_ptr="*fp32", gx_ptr=f"*{dt}", B="i64", T="i32", **s),
                  dict(c, HAS_GS=has_len, MEAN=not has_len, BLOCK=256))
print("compiled")
"""


@pytest.mark.slow
def test_triton_general_kernels_compile_for_sm90_without_a_gpu():
    # the interpreter does not run Triton's compiler (constexpr bit tests, 1-lane pair math, scalar
    # where): compile each general kernel for a few type sets to a cubin for sm_90 in a subprocess
    from tests.conftest import nvidia_compiler_available, run_triton_compile_script

    if not nvidia_compiler_available():
        pytest.skip("Triton has no NVIDIA compiler backend here")
    run_triton_compile_script(_COMPILE_SCRIPT, timeout=900)
