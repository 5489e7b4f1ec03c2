"""Triton kernels for policy_loss's other fused types: fastalign_triton::pg_policy_loss_{fwd,bwd}.

Same contract, row pass, finalize and backward launch as the PPO losses (ppo.py, whose jit helpers
and launchers these kernels share: Triton resolves a kernel's helpers from this module's globals).
"""

import torch  # noqa: F401  (the launchers' annotations)
import triton
import triton.language as tl

from fastalign.kernels.triton.ppo import (_clip_dl, _clip_terms, _count, _inside, _launch_bwd, _launch_fwd,  # noqa: F401
                                          _min_share, _nan_max, _store_parts, _tmax, _tmin)

# ---- policy_loss's other fused types: fastalign_triton::pg_policy_loss_{fwd,bwd} -------------------
# KIND (fastalign/ops/policy_loss_fused.py): 0 reinforce / gpg: -A x; 1 cispo: -clamp(r, pa, pb) A x
# (the weight a constant of the gradient); 2 sapo: -sigmoid(tau (r - 1)) (4 / tau) A, tau = pa if
# A > 0 else pb (z clamped to [-20, 20] as the C++ kernel); 3 gspo: the clipped surrogate of the
# row's s = exp(min(L, 10)), L = mean of x - o over the row, [pa, pb] = [1 - clip_low, 1 + clip_high];
# 4 geo_mean: every token -Abar R, R = exp(mean m), m the sign-aware log-space clip to [-pa, pb].
# 3 and 4 sweep the row twice (the row's ratio first); their backward runs a program per row.


@triton.jit
def _load_row_tile(x_ptr, o_ptr, a_ptr, m_ptr, base, t, T):
    valid = tl.load(m_ptr + base + t, mask=t < T, other=0) != 0
    x = tl.load(x_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
    return valid, x, o, a


@triton.jit
def _geo_terms(x, o, a, lo, hi):  # (d, clamped d, sign(A), m) of geo_mean
    d = _tmin(_tmax(x - o, -20.0), 20.0)
    dc = _tmin(_tmax(d, -lo), hi)
    sgn = tl.where(a > 0.0, 1.0, tl.where(a < 0.0, -1.0, a * 0.0))  # torch.sign: 0 -> 0, NaN -> NaN
    return d, dc, sgn, sgn * _tmin(sgn * d, sgn * dc)


@triton.jit
def _sapo_sigmoid(ratio, tau):
    z = _tmin(_tmax(tau * (ratio - 1.0), -20.0), 20.0)
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _seq_row(x_ptr, o_ptr, a_ptr, m_ptr, base, T, pa, pb, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """The row pass of gspo / geo_mean: (s or R, max(n, 1), L (gspo) or -Abar R (geo_mean))."""
    zero = pa * 0.0
    s1 = zero
    s2 = zero
    cnt = zero
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        valid, x, o, a = _load_row_tile(x_ptr, o_ptr, a_ptr, m_ptr, base, t, T)
        cnt += _count(valid)
        if KIND == 3:
            s1 += tl.sum(tl.where(valid, x - o, 0.0), axis=0)
        else:
            d, dc, sgn, m = _geo_terms(x, o, a, pa, pb)
            s1 += tl.sum(tl.where(valid, m, 0.0), axis=0)
            s2 += tl.sum(tl.where(valid, a, 0.0), axis=0)
    n = tl.maximum(cnt, 1.0)  # the reference's mean over max(n, 1)
    mean = s1 / n
    if KIND == 3:
        ratio = tl.exp(_tmin(mean, 10.0))
        extra = mean
    else:
        ratio = tl.exp(mean)
        extra = -(s2 / n) * ratio
    return ratio, n, extra


@triton.jit
def _pg_fwd_kernel(x_ptr, o_ptr, a_ptr, m_ptr, parts_ptr, T, pa, pb, KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    zero = pa * 0.0
    s_row = zero + 1.0
    l_row = zero
    if KIND >= 3:
        s_row, n_row, l_row = _seq_row(x_ptr, o_ptr, a_ptr, m_ptr, base, T, pa, pb, KIND, BLOCK)
    loss = zero
    n = zero
    clip = zero
    kl = zero
    clip_low = zero
    clip_high = zero
    rsum = zero
    rmax = zero
    for start in range(0, T, BLOCK):
        t = start + tl.arange(0, BLOCK)
        valid, x, o, a = _load_row_tile(x_ptr, o_ptr, a_ptr, m_ptr, base, t, T)
        if KIND == 0:
            lt = -a * x
        else:
            if KIND == 3:
                ratio = tl.zeros([BLOCK], tl.float32) + s_row
                l1, l2 = _clip_terms(ratio, a, pa, pb)
                lt = _tmax(l1, l2)
                clipped = valid & (l2 > l1)
                low = clipped & (a < 0.0)
                high = clipped & (a > 0.0)
            elif KIND == 4:
                ratio = tl.zeros([BLOCK], tl.float32) + s_row
                d, dc, sgn, m = _geo_terms(x, o, a, pa, pb)
                moved = valid & (d != dc)
                clipped = moved & (a != 0.0)
                low = moved & (a < 0.0)
                high = moved & (a > 0.0)
                lt = tl.zeros([BLOCK], tl.float32) + l_row
            else:
                ratio = tl.exp(_tmin(_tmax(x - o, -20.0), 20.0))
                if KIND == 1:
                    lt = (-_tmin(_tmax(ratio, pa), pb) * a) * x
                    low = valid & (ratio < pa)
                    high = valid & (ratio > pb)
                    clipped = low | high
                else:
                    tau = tl.where(a > 0.0, pa, pb)
                    lt = -(_sapo_sigmoid(ratio, tau) * (4.0 / tau)) * a
            if KIND != 2:  # sapo has no clip statistics
                clip += _count(clipped)
                clip_low += _count(low)
                clip_high += _count(high)
            rsum += tl.sum(tl.where(valid, ratio, 0.0), axis=0)
            rmax = _nan_max(rmax, ratio, valid)
        loss += tl.sum(tl.where(valid, lt, 0.0), axis=0)
        n += _count(valid)
        kl += tl.sum(tl.where(valid, o - x, 0.0), axis=0)
    _store_parts(parts_ptr, row, loss, n, clip, zero, kl, clip_low, clip_high, rsum, rmax)


@triton.jit
def _pg_bwd_tile(x_ptr, o_ptr, a_ptr, m_ptr, gx_ptr, base, start, T, pa, pb, gb, coef, KIND: tl.constexpr,
                 BLOCK: tl.constexpr):
    """The gradient of one tile of a row: gb = g w_b; coef the row's factor (gspo: g w_b S s / n,
    geo_mean: g w_b (-Abar R))."""
    t = start + tl.arange(0, BLOCK)
    inb = t < T
    valid, x, o, a = _load_row_tile(x_ptr, o_ptr, a_ptr, m_ptr, base, t, T)
    if KIND == 0:
        gd = -a * gb
    elif KIND == 3:
        gd = tl.zeros([BLOCK], tl.float32) + coef
    elif KIND == 4:
        d, dc, sgn, m = _geo_terms(x, o, a, pa, pb)
        u = sgn * d
        v = sgn * dc
        dm = (sgn * sgn) * (_min_share(u, v) + tl.where(_inside(d, -pa, pb), _min_share(v, u), 0.0))
        gd = tl.where(_inside(x - o, -20.0, 20.0), coef * dm, 0.0)
    else:
        dd = x - o
        ratio = tl.exp(_tmin(_tmax(dd, -20.0), 20.0))
        if KIND == 1:
            gd = (-_tmin(_tmax(ratio, pa), pb) * a) * gb
        else:
            tau = tl.where(a > 0.0, pa, pb)
            sg = _sapo_sigmoid(ratio, tau)
            gd = tl.where(_inside(dd, -20.0, 20.0), ((-a * gb) * (4.0 * sg * (1.0 - sg))) * ratio, 0.0)
    gd = tl.where(valid, gd, 0.0)
    tl.store(gx_ptr + base + t, gd.to(gx_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _pg_bwd_kernel(g_ptr, x_ptr, o_ptr, a_ptr, m_ptr, w_ptr, gx_ptr, T, pa, pb, KIND: tl.constexpr,
                   BLOCK: tl.constexpr):
    # grid (B, tiles) for the per-token kinds (a tile each); (B, 1) for gspo / geo_mean, whose
    # program sweeps its row: the row pass, gspo's S = sum_t d l_t / d s, then every tile
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    gb = tl.load(g_ptr) * tl.load(w_ptr + row)
    if KIND >= 3:
        s_row, n_row, extra = _seq_row(x_ptr, o_ptr, a_ptr, m_ptr, base, T, pa, pb, KIND, BLOCK)
        if KIND == 3:  # the clamp min(L, 10) passes the gradient where L <= 10
            ssum = pa * 0.0
            for start in range(0, T, BLOCK):
                t = start + tl.arange(0, BLOCK)
                valid = tl.load(m_ptr + base + t, mask=t < T, other=0) != 0
                a = tl.load(a_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
                ratio = tl.zeros([BLOCK], tl.float32) + s_row
                ssum += tl.sum(tl.where(valid, _clip_dl(ratio, a, pa, pb, 1.0), 0.0), axis=0)
            coef = tl.where(extra <= 10.0, ((gb * ssum) * s_row) / n_row, 0.0)
        else:
            coef = gb * extra
        for start in range(0, T, BLOCK):
            _pg_bwd_tile(x_ptr, o_ptr, a_ptr, m_ptr, gx_ptr, base, start, T, pa, pb, gb, coef, KIND, BLOCK)
    else:
        _pg_bwd_tile(x_ptr, o_ptr, a_ptr, m_ptr, gx_ptr, base, tl.program_id(1) * BLOCK, T, pa, pb, gb, gb,
                     KIND, BLOCK)


_PG_KINDS = (0, 1, 2, 3, 4)


def _pg_args(op, kind, a, b):
    if kind not in _PG_KINDS:  # as the C++ op checks
        raise ValueError(f"{op}: kind must be 0 (reinforce), 1 (cispo), 2 (sapo), 3 (gspo) or 4 (geo_mean), got {kind}")
    return (float(a), float(b)), dict(KIND=int(kind))


def pg_policy_loss_fwd(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    kind: int, a: float, b: float, agg: int, global_count: float, horizon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    params, flags = _pg_args("pg_policy_loss_fwd", kind, a, b)
    return _launch_fwd(_pg_fwd_kernel, "pg_policy_loss_fwd", (logprobs, old_logprobs, advantages), mask, params, flags,
                       agg, global_count, horizon, 1.0)


def pg_policy_loss_bwd(
    grad_out: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
    mask: torch.Tensor, row_weight: torch.Tensor, kind: int, a: float, b: float,
) -> torch.Tensor:
    params, flags = _pg_args("pg_policy_loss_bwd", kind, a, b)
    return _launch_bwd(_pg_bwd_kernel, "pg_policy_loss_bwd", grad_out, (logprobs, old_logprobs, advantages), mask,
                       row_weight, params, flags, per_row=kind >= 3)
