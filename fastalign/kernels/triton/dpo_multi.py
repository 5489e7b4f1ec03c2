"""Triton kernels of the general DPO ops (fastalign/ops/dpo_multi.py): dpo_multi (from sequence
log-probs) and dpo_multi_tokens (the fused head from token log-probs), forward and backward, one
launch each. Math as in csrc/cpu/dpo_multi.cpp and fastalign/kernels/reference_dpo_types.py; the
original four types' pair math and the row sums are preference.py's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels.triton._utils import device_guard, row_block, warps_for
from fastalign.kernels.triton.preference import (_PAIR_BLOCK, _ROW_CAP, _load_f32, _log_sigmoid, _pair_grad,
                                                 _pair_loss, _params, _row_sum, _sigmoid, _write_row_grad)

# ---- the general DPO ops (dpo_multi, dpo_multi_tokens): weighted per-pair types, f-divergence ----
# Math as in csrc/cpu/preference.cpp (pair_terms) and fastalign/kernels/reference_dpo_types.py.
# TYPES is a constexpr bitmask of the type ids present (one specialisation per set of types), the
# weights come per type id from a small fp32 tensor (a type listed twice has its weights summed).
# FDIV is the f-divergence id (0 reverse KL, 1 forward KL, 2 JS, 3 alpha), a constexpr too.

_LOG2 = tl.constexpr(0.6931471805599453)
_EXP_CLAMP = tl.constexpr(80.0)


@triton.jit
def _sig_prod(x):
    # sig(x) sig(-x) = e / (1 + e)^2 with e = exp(-|x|) <= 1: no overflow, 0 at the extremes
    e = tl.exp(-tl.abs(x))
    return e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _score(t, am1, FDIV: tl.constexpr):
    # (F(t), F'(t)) of the f-divergence; the exponents clamped at 80 (gradient 0 beyond, as clamp's)
    if FDIV == 0:
        s = t
        ds = tl.full(t.shape, 1.0, tl.float32)
    elif FDIV == 1:
        u = -t
        e = tl.exp(tl.minimum(u, _EXP_CLAMP))
        s = 1.0 - e
        ds = tl.where(u <= _EXP_CLAMP, e, 0.0)
    elif FDIV == 2:
        s = _LOG2 + _log_sigmoid(t)
        ds = _sigmoid(-t)
    else:
        u = am1 * t
        e = tl.exp(tl.minimum(u, _EXP_CLAMP))
        s = (e - 1.0) / am1
        ds = tl.where(u <= _EXP_CLAMP, e, 0.0)
    return s, ds


@triton.jit
def _pair_terms(cr, rr, inc, inr, w_ptr, beta, eps, half_inv_beta, robust_scale, exo_lpw, exo_lpl, tau, am1,
                TYPES: tl.constexpr, FDIV: tl.constexpr):
    """(loss, dL/dcr, dL/drr) of sum_k w_k L_k for the log-ratios cr, rr and inverse counts inc, inr."""
    sc, dsc = _score(cr, am1, FDIV)
    sr, dsr = _score(rr, am1, FDIV)
    d = sc - sr
    dn = sc * inc - sr * inr
    a = beta * cr
    b = beta * rr
    zero = tl.zeros(cr.shape, tl.float32)
    loss = zero
    gd = zero  # dL/dd (score difference)
    gn = zero  # dL/ddn (normalised score difference)
    gc = zero  # dL/dcr of the types on the raw log-ratios
    gr = zero
    if TYPES & 1:  # sigmoid
        w = tl.load(w_ptr + 0)
        loss += w * _pair_loss(d, beta, eps, half_inv_beta, robust_scale, 0)
        gd += w * _pair_grad(d, beta, eps, half_inv_beta, robust_scale, 0)
    if TYPES & 2:  # ipo
        w = tl.load(w_ptr + 1)
        loss += w * _pair_loss(d, beta, eps, half_inv_beta, robust_scale, 1)
        gd += w * _pair_grad(d, beta, eps, half_inv_beta, robust_scale, 1)
    if TYPES & 4:  # hinge
        w = tl.load(w_ptr + 2)
        loss += w * _pair_loss(d, beta, eps, half_inv_beta, robust_scale, 2)
        gd += w * _pair_grad(d, beta, eps, half_inv_beta, robust_scale, 2)
    if TYPES & 8:  # robust
        w = tl.load(w_ptr + 3)
        loss += w * _pair_loss(d, beta, eps, half_inv_beta, robust_scale, 3)
        gd += w * _pair_grad(d, beta, eps, half_inv_beta, robust_scale, 3)
    if TYPES & 16:  # exo_pair: sig(x)(ls(x) - lpw) + sig(-x)(ls(-x) - lpl); dL/dx = sig sig' (x - (lpw - lpl))
        w = tl.load(w_ptr + 4)
        x = beta * d
        loss += w * (_sigmoid(x) * (_log_sigmoid(x) - exo_lpw) + _sigmoid(-x) * (_log_sigmoid(-x) - exo_lpl))
        gd += w * beta * _sig_prod(x) * (x - (exo_lpw - exo_lpl))
    if TYPES & 32:  # nca_pair: -ls(a) - ls(-a)/2 - ls(-b)/2
        w = tl.load(w_ptr + 5)
        loss += w * (-_log_sigmoid(a) - 0.5 * _log_sigmoid(-a) - 0.5 * _log_sigmoid(-b))
        gc += w * beta * (-_sigmoid(-a) + 0.5 * _sigmoid(a))
        gr += w * beta * 0.5 * _sigmoid(b)
    if TYPES & 64:  # bco_pair: -ls(a) - ls(-b)
        w = tl.load(w_ptr + 6)
        loss += w * (-_log_sigmoid(a) - _log_sigmoid(-b))
        gc += w * beta * -_sigmoid(-a)
        gr += w * beta * _sigmoid(b)
    if TYPES & 128:  # sppo_hard: (cr - 1/(2 beta))^2 + (rr + 1/(2 beta))^2
        w = tl.load(w_ptr + 7)
        pc = cr - half_inv_beta
        pr = rr + half_inv_beta
        loss += w * (pc * pc + pr * pr)
        gc += w * 2.0 * pc
        gr += w * 2.0 * pr
    if TYPES & 256:  # apo_zero: 1 - sig(a) + sig(b)
        w = tl.load(w_ptr + 8)
        loss += w * (1.0 - _sigmoid(a) + _sigmoid(b))
        gc += w * beta * -_sig_prod(a)
        gr += w * beta * _sig_prod(b)
    if TYPES & 512:  # apo_down: sig(a) + 1 - sig(a - b)
        w = tl.load(w_ptr + 9)
        u = a - b
        loss += w * (_sigmoid(a) + 1.0 - _sigmoid(u))
        gc += w * beta * (_sig_prod(a) - _sig_prod(u))
        gr += w * beta * _sig_prod(u)
    if TYPES & 1024:  # discopop: -ls(x) sig(-x/tau) + exp(-x + ls(x/tau))
        w = tl.load(w_ptr + 10)
        x = beta * d
        xt = x / tau
        m1 = _sigmoid(-xt)
        ex = tl.exp(-x + _log_sigmoid(xt))
        loss += w * (-_log_sigmoid(x) * m1 + ex)
        gd += w * beta * (-_sigmoid(-x) * m1 + _log_sigmoid(x) * _sig_prod(xt) / tau + ex * (m1 / tau - 1.0))
    if TYPES & 2048:  # sigmoid_norm: sigmoid of the per-token scores
        w = tl.load(w_ptr + 11)
        loss += w * _pair_loss(dn, beta, eps, half_inv_beta, robust_scale, 0)
        gn += w * _pair_grad(dn, beta, eps, half_inv_beta, robust_scale, 0)
    if TYPES & 4096:  # ipo_norm: ipo of the per-token scores
        w = tl.load(w_ptr + 12)
        loss += w * _pair_loss(dn, beta, eps, half_inv_beta, robust_scale, 1)
        gn += w * _pair_grad(dn, beta, eps, half_inv_beta, robust_scale, 1)
    dcr = (gd + gn * inc) * dsc + gc
    drr = -(gd + gn * inr) * dsr + gr
    return loss, dcr, drr


@triton.jit
def _inv_len(len_ptr, j, inb, HAS_LEN: tl.constexpr):
    if HAS_LEN:
        return 1.0 / tl.maximum(tl.load(len_ptr + j, mask=inb, other=1.0), 1.0)
    else:
        return tl.full(j.shape, 1.0, tl.float32)


@triton.jit
def _multi_fwd_kernel(c_ptr, r_ptr, rc_ptr, rr_ptr, len_ptr, w_ptr, loss_ptr, cw_ptr, rw_ptr, B, beta, eps,
                      half_inv_beta, robust_scale, exo_lpw, exo_lpl, tau, am1, TYPES: tl.constexpr,
                      FDIV: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = i < B
    dc = _load_f32(c_ptr, i, inb) - _load_f32(rc_ptr, i, inb)
    dr = _load_f32(r_ptr, i, inb) - _load_f32(rr_ptr, i, inb)
    loss, _gc, _gr = _pair_terms(dc, dr, _inv_len(len_ptr, i, inb, HAS_LEN), _inv_len(len_ptr, i + B, inb, HAS_LEN),
                                 w_ptr, beta, eps, half_inv_beta, robust_scale, exo_lpw, exo_lpl, tau, am1, TYPES, FDIV)
    tl.store(loss_ptr + i, loss, mask=inb)
    tl.store(cw_ptr + i, beta * dc, mask=inb)
    tl.store(rw_ptr + i, beta * dr, mask=inb)


@triton.jit
def _multi_bwd_kernel(go_ptr, c_ptr, r_ptr, rc_ptr, rr_ptr, len_ptr, w_ptr, gc_ptr, gr_ptr, B, beta, eps,
                      half_inv_beta, robust_scale, exo_lpw, exo_lpl, tau, am1, TYPES: tl.constexpr,
                      FDIV: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = i < B
    dc = _load_f32(c_ptr, i, inb) - _load_f32(rc_ptr, i, inb)
    dr = _load_f32(r_ptr, i, inb) - _load_f32(rr_ptr, i, inb)
    _loss, gc, gr = _pair_terms(dc, dr, _inv_len(len_ptr, i, inb, HAS_LEN), _inv_len(len_ptr, i + B, inb, HAS_LEN),
                                w_ptr, beta, eps, half_inv_beta, robust_scale, exo_lpw, exo_lpl, tau, am1, TYPES, FDIV)
    go = tl.load(go_ptr + i, mask=inb, other=0.0)
    tl.store(gc_ptr + i, go * gc, mask=inb)
    tl.store(gr_ptr + i, go * gr, mask=inb)


@triton.jit
def _multi_tok_fwd_kernel(p_ptr, q_ptr, m_ptr, len_ptr, w_ptr, loss_ptr, cw_ptr, rw_ptr, ps_ptr, qs_ptr, B, T, beta,
                          eps, half_inv_beta, robust_scale, exo_lpw, exo_lpl, tau, am1, TYPES: tl.constexpr,
                          FDIV: tl.constexpr, HAS_LEN: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    # one program per pair; the pair math on a 1-lane vector (the row sums are scalars)
    i = tl.program_id(0).to(tl.int64)
    bc, br = i * T, (i + B) * T
    pc = _row_sum(p_ptr, m_ptr, bc, T, MEAN, BLOCK)
    qc = _row_sum(q_ptr, m_ptr, bc, T, MEAN, BLOCK)
    pr = _row_sum(p_ptr, m_ptr, br, T, MEAN, BLOCK)
    qr = _row_sum(q_ptr, m_ptr, br, T, MEAN, BLOCK)
    tl.store(ps_ptr + i, pc)
    tl.store(ps_ptr + B + i, pr)
    tl.store(qs_ptr + i, qc)
    tl.store(qs_ptr + B + i, qr)
    one = tl.arange(0, 1)
    ii = i + one
    inb = one == 0
    dc = tl.full((1,), 0.0, tl.float32) + (pc - qc)
    dr = tl.full((1,), 0.0, tl.float32) + (pr - qr)
    loss, _gc, _gr = _pair_terms(dc, dr, _inv_len(len_ptr, ii, inb, HAS_LEN), _inv_len(len_ptr, ii + B, inb, HAS_LEN),
                                 w_ptr, beta, eps, half_inv_beta, robust_scale, exo_lpw, exo_lpl, tau, am1, TYPES, FDIV)
    tl.store(loss_ptr + ii, loss)
    tl.store(cw_ptr + ii, beta * dc)
    tl.store(rw_ptr + ii, beta * dr)


@triton.jit
def _multi_tok_bwd_kernel(go_ptr, gs_ptr, ps_ptr, qs_ptr, m_ptr, len_ptr, w_ptr, gx_ptr, B, T, beta, eps,
                          half_inv_beta, robust_scale, exo_lpw, exo_lpl, tau, am1, HAS_GS: tl.constexpr,
                          TYPES: tl.constexpr, FDIV: tl.constexpr, HAS_LEN: tl.constexpr, MEAN: tl.constexpr,
                          BLOCK: tl.constexpr):
    # one program per row j of [chosen; rejected]; pair i = j mod B: dL/dcr for a chosen row, dL/drr else
    j = tl.program_id(0).to(tl.int64)
    is_chosen = j < B
    i = tl.where(is_chosen, j, j - B)
    one = tl.arange(0, 1)
    ii = i + one
    inb = one == 0
    dc = tl.load(ps_ptr + ii) - tl.load(qs_ptr + ii)
    dr = tl.load(ps_ptr + B + ii) - tl.load(qs_ptr + B + ii)
    _loss, gc, gr = _pair_terms(dc, dr, _inv_len(len_ptr, ii, inb, HAS_LEN), _inv_len(len_ptr, ii + B, inb, HAS_LEN),
                                w_ptr, beta, eps, half_inv_beta, robust_scale, exo_lpw, exo_lpl, tau, am1, TYPES, FDIV)
    go = tl.load(go_ptr + ii)
    s = tl.sum(go * tl.where(is_chosen, gc, gr), axis=0)
    if HAS_GS:
        s += tl.load(gs_ptr + j)
    _write_row_grad(gx_ptr, m_ptr, j * T, T, s, MEAN, BLOCK)


_NUM_TYPES = 13


def _multi_params(t: torch.Tensor, beta, loss_types, loss_weights, eps, f_divergence, f_alpha, tau):
    """The kernel arguments of the general ops: the weight per type id (device tensor), the
    constexpr type bitmask, and the fp32 scalars."""
    import math

    w = [0.0] * _NUM_TYPES
    mask = 0
    for k, wk in zip(loss_types, loss_weights):
        if not 0 <= int(k) < _NUM_TYPES:
            raise ValueError(f"dpo_multi: loss type id must be 0..{_NUM_TYPES - 1}, got {k}")
        w[int(k)] += float(wk)
        mask |= 1 << int(k)
    if mask & 16 and not eps > 0:
        raise ValueError(f"dpo_multi: exo_pair needs label_smoothing > 0, got {eps}")
    weights = torch.tensor(w, dtype=torch.float32).to(t.device)
    exo_lpw = math.log1p(-eps) if eps > 0 else 0.0
    exo_lpl = math.log(eps) if eps > 0 else 0.0
    am1 = float(f_alpha) - 1.0 if int(f_divergence) == 3 else 1.0
    scalars = (*_params(beta, eps), exo_lpw, exo_lpl, float(tau), am1)
    return weights, mask, scalars


def dpo_multi_fwd(c, r, rc, rr, lengths, beta: float, loss_types, loss_weights, eps: float, f_divergence: int,
                  f_alpha: float, tau: float):
    c, r, rc, rr = (t.contiguous() for t in (c, r, rc, rr))
    n = c.shape[0]
    loss, cw, rw = (torch.empty((n,), dtype=torch.float32, device=c.device) for _ in range(3))
    if n == 0:
        return loss, cw, rw
    weights, types, scalars = _multi_params(c, beta, loss_types, loss_weights, eps, f_divergence, f_alpha, tau)
    lens = lengths.float().contiguous() if lengths is not None else weights  # unread without HAS_LEN
    block = row_block(n, _PAIR_BLOCK)
    with device_guard(c):
        _multi_fwd_kernel[(triton.cdiv(n, block),)](c, r, rc, rr, lens, weights, loss, cw, rw, n, *scalars,
                                                    TYPES=types, FDIV=int(f_divergence),
                                                    HAS_LEN=lengths is not None, BLOCK=block,
                                                    num_warps=warps_for(block))
    return loss, cw, rw


def dpo_multi_bwd(grad, c, r, rc, rr, lengths, beta: float, loss_types, loss_weights, eps: float, f_divergence: int,
                  f_alpha: float, tau: float):
    c, r, rc, rr = (t.contiguous() for t in (c, r, rc, rr))
    n = c.shape[0]
    gc, gr = (torch.empty((n,), dtype=torch.float32, device=c.device) for _ in range(2))
    if n == 0:
        return gc, gr
    weights, types, scalars = _multi_params(c, beta, loss_types, loss_weights, eps, f_divergence, f_alpha, tau)
    lens = lengths.float().contiguous() if lengths is not None else weights
    block = row_block(n, _PAIR_BLOCK)
    with device_guard(c):
        _multi_bwd_kernel[(triton.cdiv(n, block),)](grad.float().contiguous(), c, r, rc, rr, lens, weights, gc, gr,
                                                    n, *scalars, TYPES=types, FDIV=int(f_divergence),
                                                    HAS_LEN=lengths is not None, BLOCK=block,
                                                    num_warps=warps_for(block))
    return gc, gr


def dpo_multi_tokens_fwd(pol, ref, mask, lengths, beta: float, loss_types, loss_weights, eps: float,
                         f_divergence: int, f_alpha: float, tau: float, mean: bool):
    pol, ref, mask = pol.contiguous(), ref.contiguous(), mask.contiguous()
    rows, steps = pol.shape
    pairs = rows // 2
    f32 = dict(dtype=torch.float32, device=pol.device)
    loss, cw, rw = (torch.empty((pairs,), **f32) for _ in range(3))
    pseq, rseq = torch.empty((rows,), **f32), torch.empty((rows,), **f32)
    if pairs == 0:
        return loss, cw, rw, pseq, rseq
    weights, types, scalars = _multi_params(pol, beta, loss_types, loss_weights, eps, f_divergence, f_alpha, tau)
    lens = lengths.float().contiguous() if lengths is not None else weights
    block = row_block(steps, _ROW_CAP)
    with device_guard(pol):
        _multi_tok_fwd_kernel[(pairs,)](pol, ref, mask.view(torch.uint8), lens, weights, loss, cw, rw, pseq, rseq,
                                        pairs, steps, *scalars, TYPES=types, FDIV=int(f_divergence),
                                        HAS_LEN=lengths is not None, MEAN=bool(mean), BLOCK=block,
                                        num_warps=warps_for(block))
    return loss, cw, rw, pseq, rseq


def dpo_multi_tokens_bwd(grad, grad_seq, pseq, rseq, pol, mask, lengths, beta: float, loss_types, loss_weights,
                         eps: float, f_divergence: int, f_alpha: float, tau: float, mean: bool):
    mask = mask.contiguous()
    rows, steps = pol.shape
    gx = torch.empty((rows, steps), dtype=pol.dtype, device=pol.device)
    if rows == 0 or steps == 0:
        return gx
    weights, types, scalars = _multi_params(pol, beta, loss_types, loss_weights, eps, f_divergence, f_alpha, tau)
    lens = lengths.float().contiguous() if lengths is not None else weights
    block = row_block(steps, _ROW_CAP)
    gs = grad_seq.float().contiguous() if grad_seq is not None else pseq  # unread when HAS_GS is False
    with device_guard(pol):
        _multi_tok_bwd_kernel[(rows,)](grad.float().contiguous(), gs, pseq.float().contiguous(),
                                       rseq.float().contiguous(), mask.view(torch.uint8), lens, weights, gx,
                                       rows // 2, steps, *scalars, HAS_GS=grad_seq is not None, TYPES=types,
                                       FDIV=int(f_divergence), HAS_LEN=lengths is not None, MEAN=bool(mean),
                                       BLOCK=block, num_warps=warps_for(block))
    return gx
