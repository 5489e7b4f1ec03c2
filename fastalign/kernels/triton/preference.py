"""Triton preference kernels: sequence_logps, dpo_loss and the fused DPO head (dpo_tokens),
forward and backward, one launch each. Math as in csrc/cpu/preference.cpp:

    x = beta * delta, delta = (c - ref_c) - (r - ref_r), eps = label smoothing
    sigmoid: L = -(1-eps) logsig(x) - eps logsig(-x)          dL/dx = -(1-eps) sig(-x) + eps sig(x)
    ipo:     L = (delta - 1/(2 beta))^2                         dL/ddelta = 2 (delta - 1/(2 beta))
    hinge:   L = relu(1 - x)                                    dL/dx = -1 where x < 1
    robust:  L = (-(1-eps) logsig(x) + eps logsig(-x))/(1-2eps)  dL/dx = (-(1-eps) sig(-x) - eps sig(x))/(1-2eps)

logsig(x) = min(x, 0) - log1p(exp(-|x|)): exp of a non-positive number, finite for any finite x.
The loss type is a constexpr (one specialisation per type). Row sums: BLOCK fp32 lanes, then one
tree sum, identical in sequence_logps and dpo_tokens so the fused head equals the composed ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels.triton._utils import device_guard, row_block, warps_for

SIGMOID, IPO, HINGE, ROBUST = 0, 1, 2, 3


@triton.jit
def _log1p_small(e):
    # log1p for e in [0, 1]: log(1 + e) loses e below fp32 resolution of 1; the series does not
    return tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - _log1p_small(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _pair_loss(delta, beta, eps, half_inv_beta, robust_scale, LOSS: tl.constexpr):
    x = beta * delta
    if LOSS == 0:
        out = -(1.0 - eps) * _log_sigmoid(x) - eps * _log_sigmoid(-x)
    elif LOSS == 1:
        d = delta - half_inv_beta
        out = d * d
    elif LOSS == 2:
        h = 1.0 - x
        out = tl.where((h > 0) | (h != h), h, 0.0)
    else:
        out = (-(1.0 - eps) * _log_sigmoid(x) + eps * _log_sigmoid(-x)) * robust_scale
    return out


@triton.jit
def _pair_grad(delta, beta, eps, half_inv_beta, robust_scale, LOSS: tl.constexpr):
    # d loss / d delta
    x = beta * delta
    if LOSS == 0:
        out = beta * (-(1.0 - eps) * _sigmoid(-x) + eps * _sigmoid(x))
    elif LOSS == 1:
        out = 2.0 * (delta - half_inv_beta)
    elif LOSS == 2:
        out = tl.where((1.0 - x > 0) | (x != x), -beta, 0.0)
    else:
        out = beta * (-(1.0 - eps) * _sigmoid(-x) - eps * _sigmoid(x)) * robust_scale
    return out


@triton.jit
def _row_sum(x_ptr, m_ptr, base, T, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """Masked sum (or mean, count >= 1) of the row starting at offset `base`."""
    j = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, T, BLOCK):
        t = start + j
        inb = t < T
        valid = (tl.load(m_ptr + base + t, mask=inb, other=0) != 0) & inb
        acc += tl.load(x_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
        cnt += valid.to(tl.int32)
    s = tl.sum(acc, axis=0)
    if MEAN:
        s = s / tl.maximum(tl.sum(cnt, axis=0), 1).to(tl.float32)
    return s


@triton.jit
def _write_row_grad(g_ptr, m_ptr, base, T, gr, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.arange(0, BLOCK)
    if MEAN:
        cnt = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(0, T, BLOCK):
            t = start + j
            inb = t < T
            cnt += ((tl.load(m_ptr + base + t, mask=inb, other=0) != 0) & inb).to(tl.int32)
        gr = gr / tl.maximum(tl.sum(cnt, axis=0), 1).to(tl.float32)
    for start in range(0, T, BLOCK):
        t = start + j
        inb = t < T
        valid = tl.load(m_ptr + base + t, mask=inb, other=0) != 0
        tl.store(g_ptr + base + t, tl.where(valid, gr, 0.0).to(g_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _seq_fwd_kernel(x_ptr, m_ptr, out_ptr, T, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tl.store(out_ptr + row, _row_sum(x_ptr, m_ptr, row * T, T, MEAN, BLOCK))


@triton.jit
def _seq_bwd_kernel(g_ptr, m_ptr, gx_ptr, T, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _write_row_grad(gx_ptr, m_ptr, row * T, T, tl.load(g_ptr + row), MEAN, BLOCK)


@triton.jit
def _load_f32(ptr, i, inb):
    return tl.load(ptr + i, mask=inb, other=0.0).to(tl.float32)


@triton.jit
def _dpo_fwd_kernel(c_ptr, r_ptr, rc_ptr, rr_ptr, loss_ptr, cw_ptr, rw_ptr, B, beta, eps, half_inv_beta,
                    robust_scale, LOSS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = i < B
    dc = _load_f32(c_ptr, i, inb) - _load_f32(rc_ptr, i, inb)
    dr = _load_f32(r_ptr, i, inb) - _load_f32(rr_ptr, i, inb)
    tl.store(loss_ptr + i, _pair_loss(dc - dr, beta, eps, half_inv_beta, robust_scale, LOSS), mask=inb)
    tl.store(cw_ptr + i, beta * dc, mask=inb)
    tl.store(rw_ptr + i, beta * dr, mask=inb)


@triton.jit
def _dpo_bwd_kernel(go_ptr, c_ptr, r_ptr, rc_ptr, rr_ptr, g_ptr, B, beta, eps, half_inv_beta, robust_scale,
                    LOSS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = i < B
    dc = _load_f32(c_ptr, i, inb) - _load_f32(rc_ptr, i, inb)
    dr = _load_f32(r_ptr, i, inb) - _load_f32(rr_ptr, i, inb)
    go = tl.load(go_ptr + i, mask=inb, other=0.0)
    tl.store(g_ptr + i, go * _pair_grad(dc - dr, beta, eps, half_inv_beta, robust_scale, LOSS), mask=inb)


@triton.jit
def _tok_fwd_kernel(p_ptr, q_ptr, m_ptr, loss_ptr, cw_ptr, rw_ptr, ps_ptr, qs_ptr, B, T, beta, eps, half_inv_beta,
                    robust_scale, LOSS: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    # one program per pair i: rows i (chosen) and B + i (rejected), policy p and reference q
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
    dc = pc - qc
    dr = pr - qr
    tl.store(loss_ptr + i, _pair_loss(dc - dr, beta, eps, half_inv_beta, robust_scale, LOSS))
    tl.store(cw_ptr + i, beta * dc)
    tl.store(rw_ptr + i, beta * dr)


@triton.jit
def _tok_bwd_kernel(go_ptr, gs_ptr, ps_ptr, qs_ptr, m_ptr, gx_ptr, B, T, beta, eps, half_inv_beta, robust_scale,
                    HAS_GS: tl.constexpr, LOSS: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    # one program per row j of [chosen; rejected]; pair i = j mod B; sign + for chosen, - for rejected
    j = tl.program_id(0).to(tl.int64)
    is_chosen = j < B
    i = tl.where(is_chosen, j, j - B)
    delta = (tl.load(ps_ptr + i) - tl.load(qs_ptr + i)) - (tl.load(ps_ptr + B + i) - tl.load(qs_ptr + B + i))
    g = tl.load(go_ptr + i) * _pair_grad(delta, beta, eps, half_inv_beta, robust_scale, LOSS)
    s = tl.where(is_chosen, g, -g)
    if HAS_GS:
        s += tl.load(gs_ptr + j)
    _write_row_grad(gx_ptr, m_ptr, j * T, T, s, MEAN, BLOCK)


# ---- launchers (wrapped as fastalign_triton::* custom ops by fastalign/ops/preference.py) ------

_ROW_CAP = 1024  # tile of a row; longer rows loop over tiles
_PAIR_BLOCK = 1024


def _params(beta: float, eps: float):
    return float(beta), float(eps), float(1.0 / (2.0 * beta)), float(1.0 / (1.0 - 2.0 * eps))


def sequence_logps_fwd(x: torch.Tensor, mask: torch.Tensor, mean: bool) -> torch.Tensor:
    x, mask = x.contiguous(), mask.contiguous()
    rows, steps = x.shape
    out = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return out
    block = row_block(steps, _ROW_CAP)
    with device_guard(x):
        _seq_fwd_kernel[(rows,)](x, mask.view(torch.uint8), out, steps, MEAN=bool(mean), BLOCK=block,
                                 num_warps=warps_for(block))
    return out


def sequence_logps_bwd(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, mean: bool) -> torch.Tensor:
    mask = mask.contiguous()
    rows, steps = x.shape
    gx = torch.empty((rows, steps), dtype=x.dtype, device=x.device)
    if rows == 0 or steps == 0:
        return gx
    block = row_block(steps, _ROW_CAP)
    with device_guard(x):
        _seq_bwd_kernel[(rows,)](grad.float().contiguous(), mask.view(torch.uint8), gx, steps, MEAN=bool(mean),
                                 BLOCK=block, num_warps=warps_for(block))
    return gx


def dpo_loss_fwd(c, r, rc, rr, beta: float, loss_type: int, eps: float):
    c, r, rc, rr = (t.contiguous() for t in (c, r, rc, rr))
    n = c.shape[0]
    loss, cw, rw = (torch.empty((n,), dtype=torch.float32, device=c.device) for _ in range(3))
    if n == 0:
        return loss, cw, rw
    block = row_block(n, _PAIR_BLOCK)
    with device_guard(c):
        _dpo_fwd_kernel[(triton.cdiv(n, block),)](c, r, rc, rr, loss, cw, rw, n, *_params(beta, eps),
                                                  LOSS=int(loss_type), BLOCK=block, num_warps=warps_for(block))
    return loss, cw, rw


def dpo_loss_bwd(grad, c, r, rc, rr, beta: float, loss_type: int, eps: float):
    c, r, rc, rr = (t.contiguous() for t in (c, r, rc, rr))
    n = c.shape[0]
    g = torch.empty((n,), dtype=torch.float32, device=c.device)
    if n == 0:
        return g
    block = row_block(n, _PAIR_BLOCK)
    with device_guard(c):
        _dpo_bwd_kernel[(triton.cdiv(n, block),)](grad.float().contiguous(), c, r, rc, rr, g, n, *_params(beta, eps),
                                                  LOSS=int(loss_type), BLOCK=block, num_warps=warps_for(block))
    return g


def dpo_tokens_fwd(pol, ref, mask, beta: float, loss_type: int, eps: float, mean: bool):
    pol, ref, mask = pol.contiguous(), ref.contiguous(), mask.contiguous()
    rows, steps = pol.shape
    pairs = rows // 2
    f32 = dict(dtype=torch.float32, device=pol.device)
    loss, cw, rw = (torch.empty((pairs,), **f32) for _ in range(3))
    pseq, rseq = torch.empty((rows,), **f32), torch.empty((rows,), **f32)
    if pairs == 0:
        return loss, cw, rw, pseq, rseq
    block = row_block(steps, _ROW_CAP)
    with device_guard(pol):
        _tok_fwd_kernel[(pairs,)](pol, ref, mask.view(torch.uint8), loss, cw, rw, pseq, rseq, pairs, steps,
                                  *_params(beta, eps), LOSS=int(loss_type), MEAN=bool(mean), BLOCK=block,
                                  num_warps=warps_for(block))
    return loss, cw, rw, pseq, rseq


def dpo_tokens_bwd(grad, grad_seq, pseq, rseq, pol, mask, beta: float, loss_type: int, eps: float, mean: bool):
    mask = mask.contiguous()
    rows, steps = pol.shape
    gx = torch.empty((rows, steps), dtype=pol.dtype, device=pol.device)
    if rows == 0 or steps == 0:
        return gx
    block = row_block(steps, _ROW_CAP)
    gs = grad_seq.float().contiguous() if grad_seq is not None else pseq  # unread when HAS_GS is False
    with device_guard(pol):
        _tok_bwd_kernel[(rows,)](grad.float().contiguous(), gs, pseq.float().contiguous(), rseq.float().contiguous(),
                                 mask.view(torch.uint8), gx, rows // 2, steps, *_params(beta, eps),
                                 HAS_GS=grad_seq is not None, LOSS=int(loss_type), MEAN=bool(mean), BLOCK=block,
                                 num_warps=warps_for(block))
    return gx

