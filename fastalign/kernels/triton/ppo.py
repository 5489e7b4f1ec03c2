"""Triton kernels for the PPO losses: fastalign_triton::ppo_{policy,value}_loss_{fwd,bwd} (policy_loss's
other fused types, fastalign_triton::pg_policy_loss_{fwd,bwd}, are in pg_policy.py, on these helpers).

Same contract as the C++/CUDA ops (schemas in the descriptions of fastalign/ops/ppo.py):
  fwd(x, y, z, mask bool, <params>, agg, global_count, horizon) -> (out fp32 [8], row_weight fp32 [B])
  bwd(grad_out, x, y, z, mask, row_weight, <params>) -> grad w.r.t. x in x's dtype

Forward: one program per row sweeps the row in BLOCK tiles and writes the row's partial sums
(loss, valid count, six statistic sums, one statistic max) to a [B, 9] buffer; then one program reduces the
buffer in row order (no atomics: the result is deterministic) into out and the per-row weights.
Backward: a 2-D grid of (row, tile) programs, each token independent.
The per-token math mirrors csrc/cpu/ppo.cpp and kernels/reference.py: torch's NaN-propagating
max/min/clamp forward, and autograd's half shares at ties and inclusive clamp bounds backward.
"""

import torch
import triton
import triton.language as tl

from fastalign.kernels.triton._utils import check_row_vectors, check_rows, device_guard, row_block

_PARTS = 9  # per row: loss, count, six statistic sums, one statistic max (csrc/cpu/kernel_args.h)
_N_OUT = 8


@triton.jit
def _tmax(a, b):  # torch.maximum: NaN in a wins; else the larger
    return tl.where((a >= b) | (a != a), a, b)


@triton.jit
def _tmin(a, b):
    return tl.where((a <= b) | (a != a), a, b)


@triton.jit
def _max_share(s, o):  # share of d max(s, o) that goes to s (autograd of torch.maximum)
    return tl.where(s < o, 0.0, tl.where(s == o, 0.5, 1.0))


@triton.jit
def _min_share(s, o):
    return tl.where(s > o, 0.0, tl.where(s == o, 0.5, 1.0))


@triton.jit
def _inside(x, lo, hi):  # clamp passes the gradient on [lo, hi]
    return (x >= lo) & (x <= hi)


# ---- policy loss ------------------------------------------------------------------------------


@triton.jit
def _clip_terms(ratio, a, clip_lo, clip_hi):  # the two terms of the clipped surrogate
    na = -a
    return na * ratio, na * _tmin(_tmax(ratio, clip_lo), clip_hi)


@triton.jit
def _clip_dl(ratio, a, clip_lo, clip_hi, gm):  # gm * d max(l1, l2) / d ratio (autograd's shares)
    l1, l2 = _clip_terms(ratio, a, clip_lo, clip_hi)
    na = -a
    return na * (gm * _max_share(l1, l2)) + tl.where(_inside(ratio, clip_lo, clip_hi), na * (gm * _max_share(l2, l1)),
                                                      0.0)


@triton.jit
def _count(c):
    return tl.sum(tl.where(c, 1.0, 0.0), axis=0)


@triton.jit
def _nan_max(run, v, valid):  # running max of v >= 0 over valid lanes, NaN-propagating (torch's amax)
    vv = tl.where(valid, v, 0.0)
    m = tl.max(tl.where(vv != vv, 0.0, vv), axis=0)
    m = tl.where(_count(vv != vv) > 0.0, float("nan"), m)
    return _tmax(run, m)


@triton.jit
def _store_parts(parts_ptr, row, loss, n, s1, s2, s3, s4, s5, s6, s7):
    p = parts_ptr + row * 9
    tl.store(p + 0, loss)
    tl.store(p + 1, n)
    tl.store(p + 2, s1)
    tl.store(p + 3, s2)
    tl.store(p + 4, s3)
    tl.store(p + 5, s4)
    tl.store(p + 6, s5)
    tl.store(p + 7, s6)
    tl.store(p + 8, s7)


@triton.jit
def _policy_fwd_kernel(x_ptr, o_ptr, a_ptr, m_ptr, parts_ptr, T, clip_lo, clip_hi, dual, USE_DUAL: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T  # 64-bit offsets
    zero = clip_lo * 0.0  # an fp32 scalar (a literal 0.0 would be a constexpr in the loop carry)
    loss = zero
    n = zero
    clip = zero
    lower = zero
    kl = zero
    clip_low = zero
    clip_high = zero
    rsum = zero
    rmax = zero
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        valid = tl.load(m_ptr + base + t, mask=t < T, other=0) != 0
        x = tl.load(x_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
        ratio = tl.exp(_tmin(_tmax(x - o, -20.0), 20.0))
        l1, l2 = _clip_terms(ratio, a, clip_lo, clip_hi)
        lt = _tmax(l1, l2)
        if USE_DUAL:
            l3 = -a * dual
            lower += _count(valid & (a < 0.0) & (lt > l3))
            lt = tl.where(a < 0.0, _tmin(lt, l3), lt)
        clipped = valid & (l2 > l1)
        loss += tl.sum(tl.where(valid, lt, 0.0), axis=0)
        n += _count(valid)
        clip += _count(clipped)
        kl += tl.sum(tl.where(valid, o - x, 0.0), axis=0)
        clip_low += _count(clipped & (a < 0.0))
        clip_high += _count(clipped & (a > 0.0))
        rsum += tl.sum(tl.where(valid, ratio, 0.0), axis=0)
        rmax = _nan_max(rmax, ratio, valid)
    _store_parts(parts_ptr, row, loss, n, clip, lower, kl, clip_low, clip_high, rsum, rmax)


@triton.jit
def _policy_bwd_kernel(g_ptr, x_ptr, o_ptr, a_ptr, m_ptr, w_ptr, gx_ptr, T, clip_lo, clip_hi, dual,
                       USE_DUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs = row * T + t
    inb = t < T
    valid = tl.load(m_ptr + offs, mask=inb, other=0) != 0
    gb = tl.load(g_ptr) * tl.load(w_ptr + row)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    d = x - o
    ratio = tl.exp(_tmin(_tmax(d, -20.0), 20.0))
    gm = tl.zeros([BLOCK], tl.float32) + gb
    if USE_DUAL:
        l1, l2 = _clip_terms(ratio, a, clip_lo, clip_hi)
        gm = tl.where(a < 0.0, gm * _min_share(_tmax(l1, l2), -a * dual), gm)
    gd = tl.where(_inside(d, -20.0, 20.0), _clip_dl(ratio, a, clip_lo, clip_hi, gm) * ratio, 0.0)
    gd = tl.where(valid, gd, 0.0)
    tl.store(gx_ptr + offs, gd.to(gx_ptr.dtype.element_ty), mask=inb)


# ---- value loss -------------------------------------------------------------------------------


@triton.jit
def _value_fwd_kernel(v_ptr, o_ptr, r_ptr, m_ptr, parts_ptr, T, clip, USE_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    zero = clip * 0.0  # an fp32 scalar
    loss = zero
    n = zero
    clipped = zero
    vsum = zero
    mse = zero
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        valid = tl.load(m_ptr + base + t, mask=t < T, other=0) != 0
        v = tl.load(v_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
        e1 = v - r
        s1 = e1 * e1
        lt = s1
        if USE_CLIP:
            vo = tl.load(o_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
            e2 = _tmin(_tmax(v, vo - clip), vo + clip) - r
            s2 = e2 * e2
            clipped += tl.sum(tl.where(valid & (s2 > s1), 1.0, 0.0), axis=0)
            lt = _tmax(s1, s2)
        loss += tl.sum(tl.where(valid, lt, 0.0), axis=0)
        n += tl.sum(tl.where(valid, 1.0, 0.0), axis=0)
        vsum += tl.sum(tl.where(valid, v, 0.0), axis=0)
        mse += tl.sum(tl.where(valid, s1, 0.0), axis=0)
    _store_parts(parts_ptr, row, loss, n, clipped, vsum, mse, zero, zero, zero, zero)


@triton.jit
def _value_bwd_kernel(g_ptr, v_ptr, o_ptr, r_ptr, m_ptr, w_ptr, gx_ptr, T, clip, USE_CLIP: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs = row * T + t
    inb = t < T
    valid = tl.load(m_ptr + offs, mask=inb, other=0) != 0
    gb = tl.load(g_ptr) * tl.load(w_ptr + row)
    v = tl.load(v_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    e1 = v - r
    if USE_CLIP:
        vo = tl.load(o_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        lo = vo - clip
        hi = vo + clip
        e2 = _tmin(_tmax(v, lo), hi) - r
        s1 = e1 * e1
        s2 = e2 * e2
        gv = gb * _max_share(s1, s2) * 2.0 * e1
        gv += tl.where(_inside(v, lo, hi), gb * _max_share(s2, s1) * 2.0 * e2, 0.0)
    else:
        gv = gb * 2.0 * e1
    gv = tl.where(valid, gv, 0.0)
    tl.store(gx_ptr + offs, gv.to(gx_ptr.dtype.element_ty), mask=inb)


# ---- shared aggregation -----------------------------------------------------------------------


@triton.jit
def _finalize_kernel(parts_ptr, out_ptr, w_ptr, B, agg, global_count, horizon, scale, BLOCK_B: tl.constexpr):
    # One program: reduces the [B, 9] row partials in a fixed order (deterministic) into out =
    # (loss, stat1..6 / N, max of stat7) and the row weights.
    # horizon: H of seq-mean-token-sum-norm (> 0, resolved by the launcher).
    zero = scale * 0.0  # an fp32 scalar
    n_tok = zero
    n_seq = zero
    total = zero
    st1 = zero
    st2 = zero
    st3 = zero
    st4 = zero
    st5 = zero
    st6 = zero
    st7 = zero
    for start in range(0, B, BLOCK_B):
        rows = (start + tl.arange(0, BLOCK_B)).to(tl.int64)
        inb = rows < B
        p = parts_ptr + rows * 9
        loss = tl.load(p + 0, mask=inb, other=0.0)
        n = tl.load(p + 1, mask=inb, other=0.0)
        n_tok += tl.sum(n, axis=0)
        n_seq += tl.sum(tl.where(n > 0.0, 1.0, 0.0), axis=0)
        # seq-mean-token-mean (agg 2) averages each row first
        total += tl.sum(tl.where(agg == 2, tl.where(n > 0.0, loss / tl.maximum(n, 1.0), 0.0), loss), axis=0)
        st1 += tl.sum(tl.load(p + 2, mask=inb, other=0.0), axis=0)
        st2 += tl.sum(tl.load(p + 3, mask=inb, other=0.0), axis=0)
        st3 += tl.sum(tl.load(p + 4, mask=inb, other=0.0), axis=0)
        st4 += tl.sum(tl.load(p + 5, mask=inb, other=0.0), axis=0)
        st5 += tl.sum(tl.load(p + 6, mask=inb, other=0.0), axis=0)
        st6 += tl.sum(tl.load(p + 7, mask=inb, other=0.0), axis=0)
        st7 = _nan_max(st7, tl.load(p + 8, mask=inb, other=0.0), inb)
    count = tl.where(global_count >= 0.0, global_count, tl.where(agg == 0, n_tok, n_seq))
    norm = tl.where(count > 0.0, scale / tl.maximum(count, 1e-30) / tl.where(agg == 3, horizon, 1.0), 0.0)
    inv_n = tl.where(n_tok > 0.0, 1.0 / tl.maximum(n_tok, 1.0), 0.0)
    tl.store(out_ptr + 0, total * norm)
    tl.store(out_ptr + 1, st1 * inv_n)
    tl.store(out_ptr + 2, st2 * inv_n)
    tl.store(out_ptr + 3, st3 * inv_n)
    tl.store(out_ptr + 4, st4 * inv_n)
    tl.store(out_ptr + 5, st5 * inv_n)
    tl.store(out_ptr + 6, st6 * inv_n)
    tl.store(out_ptr + 7, st7)
    for start in range(0, B, BLOCK_B):
        rows = (start + tl.arange(0, BLOCK_B)).to(tl.int64)
        inb = rows < B
        n = tl.load(parts_ptr + rows * 9 + 1, mask=inb, other=0.0)
        w = tl.where(n > 0.0, tl.where(agg == 2, norm / tl.maximum(n, 1.0), norm), 0.0)
        tl.store(w_ptr + rows, w, mask=inb)


# ---- launchers (wrapped as the custom ops fastalign_triton::ppo_* in fastalign/ops/ppo.py) -----

_BLOCK_CAP = 1024


def _block(steps: int) -> int:
    return max(16, row_block(steps, _BLOCK_CAP))


def _finish(parts, batch, steps, agg, global_count, horizon, scale):
    if agg not in (0, 1, 2, 3):  # as the C++ ops check
        raise ValueError(f"ppo loss: agg code must be in [0, 3], got {agg}")
    out = torch.empty(_N_OUT, dtype=torch.float32, device=parts.device)
    row_w = torch.empty(batch, dtype=torch.float32, device=parts.device)
    h = float(horizon) if horizon > 0 else float(max(steps, 1))  # T = 0: no tokens, any h > 0
    _finalize_kernel[(1,)](
        parts, out, row_w, batch, agg, float(global_count), h, float(scale), BLOCK_B=max(16, row_block(batch, 1024))
    )
    return out, row_w


def _launch_fwd(kernel, op, inputs, mask, params, flags, agg, global_count, horizon, scale):
    """Row pass (a program per row) then the one-program finalize; shared by both losses."""
    check_rows(op, inputs, mask)
    x, y, z, m = (t.contiguous() for t in inputs + (mask,))
    batch, steps = x.shape
    parts = torch.zeros(batch, _PARTS, dtype=torch.float32, device=x.device)
    with device_guard(x):
        if batch > 0 and steps > 0:
            kernel[(batch,)](x, y, z, m.view(torch.uint8), parts, steps, *params, **flags, BLOCK=_block(steps))
        return _finish(parts, batch, steps, agg, global_count, horizon, scale)


def _launch_bwd(kernel, op, grad_out, inputs, mask, row_weight, params, flags, per_row=False):
    """Backward over (row, tile) programs, or a program per row (per_row: the sequence-level
    losses, whose program sweeps its row); shared by every loss."""
    check_rows(op, inputs, mask)
    check_row_vectors(op, inputs[0].shape[0], inputs[0].device, grad_out, row_weight)
    x, y, z, m = (t.contiguous() for t in inputs + (mask,))
    batch, steps = x.shape
    grad = torch.empty_like(x)
    if grad.numel() == 0:
        return grad
    block = _block(steps)
    with device_guard(x):
        kernel[(batch, 1 if per_row else triton.cdiv(steps, block))](
            grad_out.float().contiguous(), x, y, z, m.view(torch.uint8), row_weight.float().contiguous(), grad,
            steps, *params, **flags, BLOCK=block,
        )
    return grad


def ppo_policy_loss_fwd(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    clip_lo: float, clip_hi: float, dual_clip: float, agg: int, global_count: float, horizon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(
        _policy_fwd_kernel, "ppo_policy_loss_fwd", (logprobs, old_logprobs, advantages), mask,
        (float(clip_lo), float(clip_hi), float(dual_clip)), dict(USE_DUAL=dual_clip > 0),
        agg, global_count, horizon, 1.0,
    )


def ppo_policy_loss_bwd(
    grad_out: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
    mask: torch.Tensor, row_weight: torch.Tensor, clip_lo: float, clip_hi: float, dual_clip: float,
) -> torch.Tensor:
    return _launch_bwd(
        _policy_bwd_kernel, "ppo_policy_loss_bwd", grad_out, (logprobs, old_logprobs, advantages), mask, row_weight,
        (float(clip_lo), float(clip_hi), float(dual_clip)), dict(USE_DUAL=dual_clip > 0),
    )


def ppo_value_loss_fwd(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    clip: float, agg: int, global_count: float, horizon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(
        _value_fwd_kernel, "ppo_value_loss_fwd", (values, old_values, returns), mask, (float(clip),),
        dict(USE_CLIP=clip > 0), agg, global_count, horizon, 0.5,  # loss = 0.5 * agg(...)
    )


def ppo_value_loss_bwd(
    grad_out: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
    mask: torch.Tensor, row_weight: torch.Tensor, clip: float,
) -> torch.Tensor:
    return _launch_bwd(
        _value_bwd_kernel, "ppo_value_loss_bwd", grad_out, (values, old_values, returns), mask, row_weight,
        (float(clip),), dict(USE_CLIP=clip > 0),
    )
