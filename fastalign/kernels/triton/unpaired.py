"""Triton kernels of the unpaired preference losses (KTO, BCO), forward and backward, one launch
each. Math as in csrc/cpu/unpaired.cpp and fastalign/kernels/reference_unpaired.py: with
lr = policy - ref, s = +1 (desirable) / -1 (undesirable), w the label's weight, z the point,
    KTO (KIND 0)  u = beta (lr - z)   L = w sigmoid(-s u)    dL/dlr = -w s beta sig(x) sig(-x), x = s u
    BCO (KIND 1)  u = beta lr - z     L = -w logsig(s u)     dL/dlr = -w s beta sig(-x)
sig(x) sig(-x) = e / (1 + e)^2 with e = exp(-|x|) <= 1: finite for any finite x.

The fused token forward with a KL batch needs its mean before any loss: programs 0..N-1 reduce
the N example rows, programs N..N+M-1 the M KL rows (into a scratch vector); each then takes a
ticket from a counter (an acq_rel atomic after a CTA barrier, so its stores are released), and
the program that draws the last ticket computes z0 = max(0, mean) and every loss, then resets the
counter for the next launch (a per-device, per-stream int32 that stays zero between launches).
Row sums use preference.py's _row_sum, so the fused head equals sequence_logps + the loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels.triton._utils import device_guard, row_block, warps_for
from fastalign.kernels.triton.preference import _log_sigmoid, _row_sum, _sigmoid, _write_row_grad


@triton.jit
def _loss(lr, d, z, beta, wd, wu, KIND: tl.constexpr):
    if KIND == 0:
        u = beta * (lr - z)
    else:
        u = beta * lr - z
    x = tl.where(d, u, -u)
    w = tl.where(d, wd, wu)
    if KIND == 0:
        out = w * _sigmoid(-x)
    else:
        out = -w * _log_sigmoid(x)
    return out


@triton.jit
def _grad(lr, d, z, beta, wd, wu, KIND: tl.constexpr):
    # d loss / d lr
    if KIND == 0:
        u = beta * (lr - z)
    else:
        u = beta * lr - z
    x = tl.where(d, u, -u)
    wsb = tl.where(d, wd * beta, -(wu * beta))
    if KIND == 0:
        e = tl.exp(-tl.abs(x))
        out = -wsb * (e / ((1.0 + e) * (1.0 + e)))
    else:
        out = -wsb * _sigmoid(-x)
    return out


@triton.jit
def _point(pt_ptr, point, HAS_PT: tl.constexpr):
    if HAS_PT:
        z = tl.load(pt_ptr).to(tl.float32)
    else:
        z = point
    return z


@triton.jit
def _loss_fwd_kernel(p_ptr, q_ptr, d_ptr, pt_ptr, loss_ptr, rw_ptr, N, point, beta, wd, wu, HAS_PT: tl.constexpr,
                     KIND: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = i < N
    lr = tl.load(p_ptr + i, mask=inb, other=0.0).to(tl.float32) - tl.load(q_ptr + i, mask=inb, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + i, mask=inb, other=0) != 0
    z = _point(pt_ptr, point, HAS_PT)
    tl.store(loss_ptr + i, _loss(lr, d, z, beta, wd, wu, KIND), mask=inb)
    tl.store(rw_ptr + i, beta * lr, mask=inb)


@triton.jit
def _loss_bwd_kernel(go_ptr, p_ptr, q_ptr, d_ptr, pt_ptr, g_ptr, N, point, beta, wd, wu, HAS_PT: tl.constexpr,
                     KIND: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = i < N
    lr = tl.load(p_ptr + i, mask=inb, other=0.0).to(tl.float32) - tl.load(q_ptr + i, mask=inb, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + i, mask=inb, other=0) != 0
    z = _point(pt_ptr, point, HAS_PT)
    go = tl.load(go_ptr + i, mask=inb, other=0.0)
    tl.store(g_ptr + i, go * _grad(lr, d, z, beta, wd, wu, KIND), mask=inb)


@triton.jit
def _tok_fwd_kernel(p_ptr, q_ptr, m_ptr, d_ptr, kp_ptr, kq_ptr, km_ptr, pt_ptr, loss_ptr, rw_ptr, z_ptr, ps_ptr,
                    qs_ptr, kl_ptr, cnt_ptr, N, T, M, TK, point, beta, wd, wu, HAS_KL: tl.constexpr,
                    HAS_PT: tl.constexpr, KIND: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr,
                    FBLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    if HAS_KL:
        if pid < N:
            tl.store(ps_ptr + pid, _row_sum(p_ptr, m_ptr, pid * T, T, MEAN, BLOCK))
            tl.store(qs_ptr + pid, _row_sum(q_ptr, m_ptr, pid * T, T, MEAN, BLOCK))
        else:
            k = pid - N
            kp = _row_sum(kp_ptr, km_ptr, k * TK, TK, MEAN, BLOCK)
            kq = _row_sum(kq_ptr, km_ptr, k * TK, TK, MEAN, BLOCK)
            tl.store(kl_ptr + k, kp - kq)
        tl.debug_barrier()  # every thread's stores precede the ticket (release is cumulative)
        ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if ticket == N + M - 1:  # the last program: every row is reduced
            j = tl.arange(0, FBLOCK)
            acc = tl.zeros((FBLOCK,), dtype=tl.float32)
            for start in range(0, M, FBLOCK):
                t = start + j
                acc += tl.load(kl_ptr + t, mask=t < M, other=0.0, cache_modifier=".cg")
            z = tl.maximum(tl.sum(acc, axis=0) / M, 0.0)
            tl.store(z_ptr, z)
            for start in range(0, N, FBLOCK):
                i = start + j
                inb = i < N
                lr = tl.load(ps_ptr + i, mask=inb, other=0.0, cache_modifier=".cg") - tl.load(
                    qs_ptr + i, mask=inb, other=0.0, cache_modifier=".cg")
                d = tl.load(d_ptr + i, mask=inb, other=0) != 0
                tl.store(loss_ptr + i, _loss(lr, d, z, beta, wd, wu, KIND), mask=inb)
                tl.store(rw_ptr + i, beta * lr, mask=inb)
            tl.atomic_xchg(cnt_ptr, 0)  # zero again for the next launch
    else:
        ps = _row_sum(p_ptr, m_ptr, pid * T, T, MEAN, BLOCK)
        qs = _row_sum(q_ptr, m_ptr, pid * T, T, MEAN, BLOCK)
        tl.store(ps_ptr + pid, ps)
        tl.store(qs_ptr + pid, qs)
        z = _point(pt_ptr, point, HAS_PT)
        lr = ps - qs
        d = tl.load(d_ptr + pid) != 0
        tl.store(loss_ptr + pid, _loss(lr, d, z, beta, wd, wu, KIND))
        tl.store(rw_ptr + pid, beta * lr)
        if pid == 0:
            tl.store(z_ptr, z)


@triton.jit
def _tok_bwd_kernel(go_ptr, gs_ptr, ps_ptr, qs_ptr, z_ptr, m_ptr, d_ptr, gx_ptr, T, beta, wd, wu,
                    HAS_GS: tl.constexpr, KIND: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    # one program per row j: its scalar gradient at its valid tokens
    j = tl.program_id(0).to(tl.int64)
    lr = tl.load(ps_ptr + j) - tl.load(qs_ptr + j)
    d = tl.load(d_ptr + j) != 0
    s = tl.load(go_ptr + j) * _grad(lr, d, tl.load(z_ptr), beta, wd, wu, KIND)
    if HAS_GS:
        s += tl.load(gs_ptr + j)
    _write_row_grad(gx_ptr, m_ptr, j * T, T, s, MEAN, BLOCK)


# ---- launchers (wrapped as fastalign_triton::* custom ops by fastalign/ops/unpaired.py) --------

_ROW_CAP = 1024  # tile of a row; longer rows loop over tiles
_VEC_BLOCK = 1024
_COUNTERS: dict = {}  # (device, stream) -> int32 [1], zero between launches


def _counter(device: torch.device) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def unpaired_loss_fwd(pol, ref, labels, point_t, point: float, beta: float, wd: float, wu: float, kind: int):
    pol, ref = pol.contiguous(), ref.contiguous()
    n = pol.shape[0]
    losses, rewards = (torch.empty((n,), dtype=torch.float32, device=pol.device) for _ in range(2))
    if n == 0:
        return losses, rewards
    block = row_block(n, _VEC_BLOCK)
    pt = point_t.float().contiguous() if point_t is not None else losses  # unread without HAS_PT
    with device_guard(pol):
        _loss_fwd_kernel[(triton.cdiv(n, block),)](pol, ref, _u8(labels), pt, losses, rewards, n, float(point),
                                                   float(beta), float(wd), float(wu), HAS_PT=point_t is not None,
                                                   KIND=int(kind), BLOCK=block, num_warps=warps_for(block))
    return losses, rewards


def unpaired_loss_bwd(grad, pol, ref, labels, point_t, point: float, beta: float, wd: float, wu: float, kind: int):
    pol, ref = pol.contiguous(), ref.contiguous()
    n = pol.shape[0]
    g = torch.empty((n,), dtype=torch.float32, device=pol.device)
    if n == 0:
        return g
    block = row_block(n, _VEC_BLOCK)
    pt = point_t.float().contiguous() if point_t is not None else g
    with device_guard(pol):
        _loss_bwd_kernel[(triton.cdiv(n, block),)](grad.float().contiguous(), pol, ref, _u8(labels), pt, g, n,
                                                   float(point), float(beta), float(wd), float(wu),
                                                   HAS_PT=point_t is not None, KIND=int(kind), BLOCK=block,
                                                   num_warps=warps_for(block))
    return g


def unpaired_tokens_fwd(pol, ref, mask, labels, kl_pol, kl_ref, kl_mask, point_t, point: float, beta: float,
                        wd: float, wu: float, kind: int, mean: bool):
    pol, ref = pol.contiguous(), ref.contiguous()
    rows, steps = pol.shape
    f32 = dict(dtype=torch.float32, device=pol.device)
    losses, rewards, pseq, rseq = (torch.empty((rows,), **f32) for _ in range(4))
    z = torch.empty((), **f32)
    has_kl = kl_pol is not None
    kl_rows = kl_pol.shape[0] if has_kl else 0
    if rows == 0 and not has_kl:
        z.fill_(float(point) if point_t is None else float(point_t.reshape(())))
        return losses, rewards, z, pseq, rseq
    kl_steps = kl_pol.shape[1] if has_kl else 0
    block = row_block(max(steps, kl_steps), _ROW_CAP)
    scratch = torch.empty((max(kl_rows, 1),), **f32)
    pt = point_t.float().contiguous() if point_t is not None else z
    kp, kq, km = (kl_pol.contiguous(), kl_ref.contiguous(), _u8(kl_mask)) if has_kl else (pol, ref, _u8(mask))
    with device_guard(pol):
        _tok_fwd_kernel[(rows + kl_rows,)](
            pol, ref, _u8(mask), _u8(labels), kp, kq, km, pt, losses, rewards, z, pseq, rseq, scratch,
            _counter(pol.device), rows, steps, kl_rows, kl_steps, float(point), float(beta), float(wd), float(wu),
            HAS_KL=has_kl, HAS_PT=point_t is not None, KIND=int(kind), MEAN=bool(mean), BLOCK=block,
            FBLOCK=row_block(max(rows, kl_rows), _VEC_BLOCK), num_warps=warps_for(block))
    return losses, rewards, z, pseq, rseq


def unpaired_tokens_bwd(grad, grad_seq, pseq, rseq, point, pol, mask, labels, beta: float, wd: float, wu: float,
                        kind: int, mean: bool):
    rows, steps = pol.shape
    gx = torch.empty((rows, steps), dtype=pol.dtype, device=pol.device)
    if rows == 0 or steps == 0:
        return gx
    block = row_block(steps, _ROW_CAP)
    gs = grad_seq.float().contiguous() if grad_seq is not None else pseq  # unread when HAS_GS is False
    with device_guard(pol):
        _tok_bwd_kernel[(rows,)](grad.float().contiguous(), gs, pseq.float().contiguous(), rseq.float().contiguous(),
                                 point.float().reshape(1), _u8(mask), _u8(labels), gx, steps, float(beta), float(wd),
                                 float(wu), HAS_GS=grad_seq is not None, KIND=int(kind), MEAN=bool(mean), BLOCK=block,
                                 num_warps=warps_for(block))
    return gx
