"""Triton kernels of the reference-free paired losses (ORPO, CPO, SimPO; fastalign/ops/ref_free.py),
forward and backward, one launch each. Math as in csrc/cpu/ref_free.cpp and
fastalign/kernels/reference_ref_free.py:

    per row: S = masked sum, n = valid count, s = S / max(n, 1) (MEAN) or S; pair: c, r = s_i, s_{B+i}
    orpo     z = lo(c~) - lo(r~), lo(y) = y - log1mexp(y), y~ = min(y, -2^-24); pref = -beta logsig(z)
    sigmoid  z = beta (c - r) - gamma;  pref = -(1-eps) logsig(z) - eps logsig(-z)
    hinge    z = beta (c - r);          pref = relu(1 - z)
    ipo      z = c - r;                 pref = (z - 1/(2 beta))^2
    losses = pref + alpha nll,  nll = -S_c / max(n_c, 1)

The forward is one program per pair (both rows: sums and counts in one pass, BLOCK fp32 lanes and
one tree sum, as the DPO head's sequence_logps); the backward one program per row, writing its
scalar to its valid tokens from the saved row stats (no re-read of the log-probs).

Triton has no log1p/expm1 that runs both compiled and in the interpreter (libdevice is not
interpreted), so the few scalar calls per pair use the series below where exp/log alone would
cancel: expm1(y) for |y| <= 1/2 by its Taylor series to y^9/9! (the remainder is below 2^-27
relative), exp(y) - 1 beyond (|result| > 0.39: no cancellation); log1p(-e) for e < 1e-4 as
-e (1 + e/2) (remainder e^2/3 relative).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels.triton._utils import device_guard, row_block, warps_for
from fastalign.kernels.triton.preference import _log_sigmoid, _sigmoid  # the DPO head's stable forms

# (constexpr: a @triton.jit function may read only constexpr globals)
ODDS_FLOOR = tl.constexpr(5.9604644775390625e-08)  # 2^-24, as kernels/reference_ref_free.py
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _expm1_neg(y):
    # e^y - 1 for y <= 0 (see the module docstring)
    s = tl.maximum(y, -0.5)  # the series' argument, kept in its range (the other branch is taken)
    p = 1.0 + s / 9.0
    p = 1.0 + s / 8.0 * p
    p = 1.0 + s / 7.0 * p
    p = 1.0 + s / 6.0 * p
    p = 1.0 + s / 5.0 * p
    p = 1.0 + s / 4.0 * p
    p = 1.0 + s / 3.0 * p
    p = 1.0 + s / 2.0 * p
    return tl.where(y < -0.5, tl.exp(y) - 1.0, s * p)


@triton.jit
def _log1mexp(y):
    # log(1 - e^y), y < 0: log1p(-e^y) below -ln 2, log(-expm1(y)) above
    e = tl.exp(tl.minimum(y, -LN2))
    low = tl.where(e < 1e-4, -e * (1.0 + 0.5 * e), tl.log(1.0 - e))
    high = tl.log(-_expm1_neg(tl.maximum(y, -LN2)))
    return tl.where(y < -LN2, low, high)


@triton.jit
def _odds_floor(y):
    return tl.where(y > -ODDS_FLOOR, -ODDS_FLOOR, y)  # NaN stays NaN


@triton.jit
def _pair_logits(c, r, beta, gamma, KIND: tl.constexpr):
    if KIND == 0:
        cf = _odds_floor(c)
        rf = _odds_floor(r)
        z = (cf - rf) - (_log1mexp(cf) - _log1mexp(rf))
    elif KIND == 1:
        z = beta * (c - r) - gamma
    elif KIND == 2:
        z = beta * (c - r)
    else:
        z = c - r
    return z


@triton.jit
def _pair_loss(z, beta, eps, half_inv_beta, KIND: tl.constexpr):
    if KIND == 0:
        out = -beta * _log_sigmoid(z)
    elif KIND == 1:
        out = -(1.0 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
    elif KIND == 2:
        h = 1.0 - z
        out = tl.where((h > 0) | (h != h), h, 0.0)
    else:
        d = z - half_inv_beta
        out = d * d
    return out


@triton.jit
def _pair_grads(c, r, beta, gamma, eps, half_inv_beta, KIND: tl.constexpr):
    # (dpref/dc, dpref/dr)
    z = _pair_logits(c, r, beta, gamma, KIND)
    if KIND == 0:
        s = beta * _sigmoid(-z)
        gc = s / _expm1_neg(_odds_floor(c))
        gr = -s / _expm1_neg(_odds_floor(r))
    else:
        if KIND == 1:
            gc = beta * (-(1.0 - eps) * _sigmoid(-z) + eps * _sigmoid(z))
        elif KIND == 2:
            gc = tl.where((1.0 - z > 0) | (z != z), -beta, 0.0)
        else:
            gc = 2.0 * (z - half_inv_beta)
        gr = -gc
    return gc, gr


@triton.jit
def _row_sum_count(x_ptr, m_ptr, base, T, BLOCK: tl.constexpr):
    """(masked sum, valid count) of the row starting at offset `base`."""
    j = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, T, BLOCK):
        t = start + j
        inb = t < T
        valid = (tl.load(m_ptr + base + t, mask=inb, other=0) != 0) & inb
        acc += tl.load(x_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
        cnt += valid.to(tl.int32)
    return tl.sum(acc, axis=0), tl.sum(cnt, axis=0)


@triton.jit
def _fwd_kernel(x_ptr, m_ptr, loss_ptr, cw_ptr, rw_ptr, nll_ptr, z_ptr, st_ptr, B, T, beta, gamma, alpha, eps,
                half_inv_beta, KIND: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    # one program per pair i: rows i (chosen) and B + i (rejected)
    i = tl.program_id(0).to(tl.int64)
    sc, kc = _row_sum_count(x_ptr, m_ptr, i * T, T, BLOCK)
    sr, kr = _row_sum_count(x_ptr, m_ptr, (i + B) * T, T, BLOCK)
    nc = tl.maximum(kc, 1).to(tl.float32)
    nr = tl.maximum(kr, 1).to(tl.float32)
    if MEAN:
        c = sc / nc
        r = sr / nr
    else:
        c = sc
        r = sr
    z = _pair_logits(c, r, beta, gamma, KIND)
    nll = -(sc / nc)
    tl.store(loss_ptr + i, _pair_loss(z, beta, eps, half_inv_beta, KIND) + alpha * nll)
    tl.store(cw_ptr + i, beta * c)
    tl.store(rw_ptr + i, beta * r)
    tl.store(nll_ptr + i, nll)
    tl.store(z_ptr + i, z)
    tl.store(st_ptr + i, c)
    tl.store(st_ptr + B + i, r)
    tl.store(st_ptr + 2 * B + i, kc.to(tl.float32))
    tl.store(st_ptr + 3 * B + i, kr.to(tl.float32))


@triton.jit
def _bwd_kernel(go_ptr, st_ptr, m_ptr, gx_ptr, B, T, beta, gamma, alpha, eps, half_inv_beta, KIND: tl.constexpr,
                MEAN: tl.constexpr, BLOCK: tl.constexpr):
    # one program per row j of [chosen; rejected]; pair i = j mod B
    j = tl.program_id(0).to(tl.int64)
    is_chosen = j < B
    i = tl.where(is_chosen, j, j - B)
    c = tl.load(st_ptr + i)
    r = tl.load(st_ptr + B + i)
    nc = tl.maximum(tl.load(st_ptr + 2 * B + i), 1.0)
    nr = tl.maximum(tl.load(st_ptr + 3 * B + i), 1.0)
    gc, gr = _pair_grads(c, r, beta, gamma, eps, half_inv_beta, KIND)
    if MEAN:
        ac = gc / nc
        ar = gr / nr
    else:
        ac = gc
        ar = gr
    g = tl.load(go_ptr + i)
    v = tl.where(is_chosen, g * (ac - alpha / nc), g * ar)
    base = j * T
    k = tl.arange(0, BLOCK)
    for start in range(0, T, BLOCK):
        t = start + k
        inb = t < T
        valid = tl.load(m_ptr + base + t, mask=inb, other=0) != 0
        tl.store(gx_ptr + base + t, tl.where(valid, v, 0.0).to(gx_ptr.dtype.element_ty), mask=inb)


# ---- launchers (wrapped as fastalign_triton::ref_free_tokens_* by fastalign/ops/ref_free.py) ------

_ROW_CAP = 1024  # tile of a row; longer rows loop over tiles


def _check(op: str, pol: torch.Tensor, mask: torch.Tensor) -> None:
    # the raw-op contract (the kernels index rows as b * T + t: a smaller input would be read out
    # of bounds), as csrc/ref_free_checks.h checks it for the C++ ops
    if pol.dim() != 2 or pol.shape[0] % 2:
        raise ValueError(f"{op}: policy must be 2-D [2B, T] with an even number of rows, got {tuple(pol.shape)}")
    if pol.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: policy must be float32, bfloat16 or float16, got {pol.dtype}")
    if mask.shape != pol.shape or mask.device != pol.device or mask.dtype != torch.bool:
        raise ValueError(f"{op}: mask must be a bool tensor of policy's shape {tuple(pol.shape)} on {pol.device}, "
                         f"got {mask.dtype} {tuple(mask.shape)} on {mask.device}")


def _scalars(beta, gamma, alpha, eps):
    return float(beta), float(gamma), float(alpha), float(eps), float(1.0 / (2.0 * beta))


def ref_free_tokens_fwd(pol, mask, kind: int, beta: float, gamma: float, nll_weight: float, eps: float,
                        mean: bool):
    _check("ref_free_tokens_fwd", pol, mask)
    pol, mask = pol.contiguous(), mask.contiguous()
    rows, steps = pol.shape
    pairs = rows // 2
    f32 = dict(dtype=torch.float32, device=pol.device)
    outs = [torch.empty((pairs,), **f32) for _ in range(5)]
    stats = torch.empty((2, rows), **f32)
    if pairs > 0:
        block = row_block(steps, _ROW_CAP)
        with device_guard(pol):
            _fwd_kernel[(pairs,)](pol, mask.view(torch.uint8), *outs, stats, pairs, steps,
                                  *_scalars(beta, gamma, nll_weight, eps), KIND=int(kind), MEAN=bool(mean),
                                  BLOCK=block, num_warps=warps_for(block))
    return (*outs, stats)


def ref_free_tokens_bwd(grad, stats, pol, mask, kind: int, beta: float, gamma: float, nll_weight: float,
                        eps: float, mean: bool):
    _check("ref_free_tokens_bwd", pol, mask)
    mask = mask.contiguous()
    rows, steps = pol.shape
    if grad.shape != (rows // 2,) or stats.shape != (2, rows):
        raise ValueError(f"ref_free_tokens_bwd: grad must be [B] and row_stats [2, 2B] for 2B = {rows}, got "
                         f"{tuple(grad.shape)} and {tuple(stats.shape)}")
    gx = torch.empty((rows, steps), dtype=pol.dtype, device=pol.device)
    if rows == 0 or steps == 0:
        return gx
    block = row_block(steps, _ROW_CAP)
    with device_guard(pol):
        _bwd_kernel[(rows,)](grad.float().contiguous(), stats.float().contiguous(), mask.view(torch.uint8), gx,
                             rows // 2, steps, *_scalars(beta, gamma, nll_weight, eps), KIND=int(kind),
                             MEAN=bool(mean), BLOCK=block, num_warps=warps_for(block))
    return gx
