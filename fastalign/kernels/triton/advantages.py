"""Triton advantage estimators: the launchers of fastalign_triton::outcome_advantage_fwd and
fastalign_triton::return_advantage_fwd (contracts and formulas: fastalign/ops/advantage_ops.py).

outcome_advantage_fwd, three kernels:
  _row_kernel    a program per row: the score s_i = sum_k r_ik and the response length |y_i|;
  _group_kernel  a program per group bucket g: its members, in batch order (a stable sort of the
                 group ids, done with torch in the launcher: O(B log B) on B ints), are read in
                 tiles of MEMBERS; sums accumulate tile by tile (a fixed tree per tile, tiles in
                 order: deterministic, no atomics); a second sweep sums the squared deviations and
                 finds the first maximum and the second maximum; a third writes A_i;
  _fill_kernel   a program per (row, tile of T): adv = A_i * m.
  reinforce_plus_plus_baseline's batch whitening over the tiled entries is the |y_i|-weighted
  mean / variance of the B advantages: O(B) torch reductions on the device (no host sync,
  deterministic), applied to A before the fill.
return_advantage_fwd:
  _scan_kernel   a program per row, the row scanned in chunks from its end with
                 tl.associative_scan over the affine maps R_t = a_t R_{t+1} + b_t
                 (reinforce_plus_plus: a_t = gamma m_{t+1}, b_t = r_t; remax: a_t = 1,
                 b_t = r_t m_t), as kernels/triton/gae.py scans GAE; it writes the returns and
                 (remax) the advantages, or (reinforce_plus_plus) the row's sum of valid returns;
  _sqdev_kernel  reinforce_plus_plus: a program per row, the sum of squared deviations from the
                 batch mean over the valid returns;
  _whiten_kernel reinforce_plus_plus: adv = (R - mean) * scale * m.
  The O(B) sums over rows of the per-row partial sums are torch reductions on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels.triton._utils import device_guard, row_block

MEMBERS = 32  # group members per tile (groups of 8-16 take one tile)


@triton.jit
def _row_kernel(r_ptr, m_ptr, score_ptr, len_ptr, K, T, NEED_LEN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        acc += tl.load(r_ptr + row * K + k0 + j, mask=k0 + j < K, other=0.0).to(tl.float32)
    tl.store(score_ptr + row, tl.sum(acc, axis=0))
    if NEED_LEN:
        cnt = tl.zeros((BLOCK,), dtype=tl.int32)
        for t0 in range(0, T, BLOCK):
            cnt += (tl.load(m_ptr + row * T + t0 + j, mask=t0 + j < T, other=0) != 0).to(tl.int32)
        tl.store(len_ptr + row, tl.sum(cnt, axis=0).to(tl.float32))


@triton.jit
def _group_kernel(score_ptr, len_ptr, order_ptr, start_ptr, count_ptr, a_ptr, eps, B, KIND: tl.constexpr,
                  NORM: tl.constexpr, MEMBERS: tl.constexpr):
    g = tl.program_id(0)
    n = tl.load(count_ptr + g)
    start = tl.load(start_ptr + g)
    j = tl.arange(0, MEMBERS)
    zero = tl.sum(tl.zeros((MEMBERS,), dtype=tl.float32), axis=0)  # fp32 scalars
    neg_inf = tl.max(tl.full((MEMBERS,), float("-inf"), tl.float32), axis=0)
    total = zero
    wsum = zero
    lsum = zero
    best = neg_inf
    for c in range(0, n, MEMBERS):
        inb = c + j < n
        idx = tl.load(order_ptr + start + c + j, mask=inb, other=0)
        s = tl.load(score_ptr + idx, mask=inb, other=0.0)
        total += tl.sum(tl.where(inb, s, 0.0), axis=0)
        best = tl.maximum(best, tl.max(tl.where(inb, s, float("-inf")), axis=0))
        if KIND == 2:  # opo
            ln = tl.load(len_ptr + idx, mask=inb, other=0.0)
            lsum += tl.sum(ln, axis=0)
            wsum += tl.sum(ln * s, axis=0)
    nf = n.to(tl.float32)
    mean = total / tl.maximum(nf, 1.0)
    sq = zero
    second = neg_inf
    winner = n * 0 + B  # the smallest batch position holding the max (B: none)
    if KIND == 0 or KIND == 3:
        for c in range(0, n, MEMBERS):
            inb = c + j < n
            idx = tl.load(order_ptr + start + c + j, mask=inb, other=0)
            s = tl.load(score_ptr + idx, mask=inb, other=0.0)
            d = s - mean
            sq += tl.sum(tl.where(inb, d * d, 0.0), axis=0)
            if KIND == 3:
                winner = tl.minimum(winner, tl.min(tl.where(inb & (s == best), idx, B), axis=0))
    if KIND == 3:
        for c in range(0, n, MEMBERS):
            inb = c + j < n
            idx = tl.load(order_ptr + start + c + j, mask=inb, other=0)
            s = tl.load(score_ptr + idx, mask=inb, other=0.0)
            second = tl.maximum(second, tl.max(tl.where(inb & (idx != winner), s, float("-inf")), axis=0))
    # unbiased std; NaN for a group of one (grpo treats it apart; passk refuses it), as 0 / 0
    std = tl.sqrt(tl.where(n > 1, sq / tl.maximum(nf - 1.0, 1.0), float("nan")))
    for c in range(0, n, MEMBERS):
        inb = c + j < n
        idx = tl.load(order_ptr + start + c + j, mask=inb, other=0)
        s = tl.load(score_ptr + idx, mask=inb, other=0.0)
        if KIND == 0:  # grpo; verl: a group of one has mean 0, std 1
            if NORM:
                a = tl.where(n > 1, (s - mean) / (std + eps), s / (1.0 + eps))
            else:
                a = tl.where(n > 1, s - mean, s)
        elif KIND == 1:  # rloo
            a = tl.where(n > 1, (s - mean) * (nf / tl.maximum(nf - 1.0, 1.0)), s)
        elif KIND == 2:  # opo
            a = tl.where((n > 1) & (lsum > 0.0), s - wsum / tl.maximum(lsum, 1.0), s)
        elif KIND == 3:  # grpo_passk
            gap = best - second
            if NORM:
                gap = gap / (std + eps)
            a = tl.where(idx == winner, gap, 0.0)
        else:  # reinforce_plus_plus_baseline, before the batch whitening
            a = tl.where(n > 1, s - mean, s)
        tl.store(a_ptr + idx, a, mask=inb)


@triton.jit
def _fill_kernel(a_ptr, m_ptr, out_ptr, T, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = t < T
    m = tl.load(m_ptr + row * T + t, mask=inb, other=0) != 0
    a = tl.load(a_ptr + row)
    tl.store(out_ptr + row * T + t, a * m.to(tl.float32), mask=inb)


def _whiten_rows(a: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """masked_whiten of the tiled entries (A_i repeated |y_i| times), from the B row values."""
    valid = lengths > 0
    count = lengths.sum()
    zero = a.new_zeros(())
    mu = torch.where(valid, lengths * a, zero).sum() / count.clamp(min=1)
    d = a - mu
    var = torch.where(valid, lengths * (d * d), zero).sum() / (count - 1).clamp(min=1)
    scale = torch.where(count >= 2, torch.rsqrt(var + 1e-8), torch.ones_like(var))
    return d * scale


def outcome_advantage_fwd(rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, kind: int,
                          epsilon: float, norm: bool) -> torch.Tensor:
    """rewards [B, K] float, mask [B, T] bool, group [B] int64 dense ids in [0, B); fp32 adv [B, T]."""
    if mask.dim() != 2 or rewards.dim() != 2 or rewards.shape[0] != mask.shape[0] or group.shape != mask.shape[:1]:
        raise ValueError(f"outcome_advantage_fwd: rewards [B, K], mask [B, T] and group [B] expected, got "
                         f"{tuple(rewards.shape)}, {tuple(mask.shape)}, {tuple(group.shape)}")
    if mask.dtype != torch.bool or group.dtype != torch.int64 or not rewards.dtype.is_floating_point:
        raise TypeError(f"outcome_advantage_fwd: float rewards, bool mask and int64 group expected, got "
                        f"{rewards.dtype}, {mask.dtype}, {group.dtype}")
    if not 0 <= kind <= 4:
        raise ValueError(f"outcome_advantage_fwd: kind must be 0..4, got {kind}")
    batch, steps = mask.shape
    width = rewards.shape[1]
    rewards, mask, group = rewards.contiguous(), mask.contiguous(), group.contiguous()
    adv = torch.empty((batch, steps), dtype=torch.float32, device=mask.device)
    if batch == 0:
        return adv
    need_len = kind in (2, 4)
    scores = torch.empty(batch, dtype=torch.float32, device=mask.device)
    lengths = torch.zeros(batch, dtype=torch.float32, device=mask.device)
    a = torch.full((batch,), float("nan"), dtype=torch.float32, device=mask.device)
    order = torch.sort(group, stable=True).indices  # members of each group in batch order
    counts = torch.bincount(group, minlength=batch)[:batch]
    starts = counts.cumsum(0) - counts
    m8 = mask.view(torch.uint8)
    with device_guard(mask):
        block = row_block(max(width, steps if need_len else 1), 1024)
        _row_kernel[(batch,)](rewards, m8, scores, lengths, width, steps, NEED_LEN=need_len, BLOCK=block)
        _group_kernel[(batch,)](scores, lengths, order, starts, counts, a, float(epsilon), batch, KIND=kind,
                                NORM=bool(norm), MEMBERS=MEMBERS)
        if kind == 4:
            a = _whiten_rows(a, lengths)
        if steps:
            block = row_block(steps, 1024)
            _fill_kernel[(batch, triton.cdiv(steps, block))](a, m8, adv, steps, BLOCK=block)
    return adv


# ---- return_advantage -------------------------------------------------------------------------------


@triton.jit
def _compose(a_f, b_f, a_g, b_g):
    # g ∘ f: f holds the later time steps (earlier in the reversed scan order), applied first
    return a_g * a_f, a_g * b_f + b_g


@triton.jit
def _scan_kernel(r_ptr, m_ptr, base_ptr, ret_ptr, adv_ptr, rowsum_ptr, T, gamma, REMAX: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    carry = gamma * 0.0  # R of the first step of the later chunk (0 past the end)
    acc = carry
    if REMAX:
        bl = tl.load(base_ptr + row)
    for c in range(0, tl.cdiv(T, BLOCK)):
        t = T - 1 - c * BLOCK - j  # time, decreasing along the block
        inb = t >= 0
        r = tl.load(r_ptr + row * T + t, mask=inb, other=0.0).to(tl.float32)
        m = (tl.load(m_ptr + row * T + t, mask=inb, other=0) != 0).to(tl.float32)
        if REMAX:
            a = r * 0.0 + 1.0
            b = r * m
        else:
            m_next = (tl.load(m_ptr + row * T + t + 1, mask=inb & (t + 1 < T), other=0) != 0).to(tl.float32)
            a = tl.where(inb, gamma * m_next, 1.0)  # out of range: the identity
            b = r
        a, b = tl.associative_scan((a, b), 0, _compose)
        big_r = a * carry + b
        tl.store(ret_ptr + row * T + t, big_r, mask=inb)
        if REMAX:
            tl.store(adv_ptr + row * T + t, big_r - bl * m, mask=inb)
        else:
            acc += tl.sum(tl.where(inb & (m != 0.0), big_r, 0.0), axis=0)
        carry = tl.sum(tl.where(j == BLOCK - 1, big_r, 0.0), axis=0)
    if not REMAX:
        tl.store(rowsum_ptr + row, acc)


@triton.jit
def _sqdev_kernel(ret_ptr, m_ptr, mean_ptr, out_ptr, T, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    mu = tl.load(mean_ptr)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK):
        inb = t0 + j < T
        x = tl.load(ret_ptr + row * T + t0 + j, mask=inb, other=0.0)
        ok = (tl.load(m_ptr + row * T + t0 + j, mask=inb, other=0) != 0) & inb
        d = x - mu
        acc += tl.where(ok, d * d, 0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _whiten_kernel(ret_ptr, m_ptr, stats_ptr, adv_ptr, T, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = t < T
    mu = tl.load(stats_ptr)
    scale = tl.load(stats_ptr + 1)
    x = tl.load(ret_ptr + row * T + t, mask=inb, other=0.0)
    m = (tl.load(m_ptr + row * T + t, mask=inb, other=0) != 0).to(tl.float32)
    tl.store(adv_ptr + row * T + t, ((x - mu) * scale) * m, mask=inb)


def return_advantage_fwd(rewards: torch.Tensor, mask: torch.Tensor, baselines, gamma: float, kind: int):
    """rewards [B, T] float, mask [B, T] bool, baselines [B] fp32 (remax) or None; fp32 (adv, returns)."""
    if rewards.dim() != 2 or mask.shape != rewards.shape or mask.device != rewards.device:
        raise ValueError(f"return_advantage_fwd: rewards and mask [B, T] on one device expected, got "
                         f"{tuple(rewards.shape)}, {tuple(mask.shape)}")
    if mask.dtype != torch.bool or not rewards.dtype.is_floating_point:
        raise TypeError(f"return_advantage_fwd: float rewards and a bool mask expected, got {rewards.dtype}, {mask.dtype}")
    if kind not in (0, 1) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"return_advantage_fwd: kind 0 or 1 and gamma in [0, 1] expected, got {kind}, {gamma}")
    remax = kind == 1
    if remax and (baselines is None or baselines.shape != rewards.shape[:1] or baselines.dtype != torch.float32):
        raise ValueError("return_advantage_fwd: remax needs fp32 baselines [B]")
    batch, steps = rewards.shape
    rewards, mask = rewards.contiguous(), mask.contiguous()
    adv = torch.empty((batch, steps), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if batch == 0 or steps == 0:
        return adv, ret
    m8 = mask.view(torch.uint8)
    row_sum = torch.empty(batch, dtype=torch.float32, device=rewards.device)
    base = baselines.contiguous() if remax else row_sum
    block = row_block(steps, 1024)
    with device_guard(rewards):
        _scan_kernel[(batch,)](rewards, m8, base, ret, adv, row_sum, steps, float(gamma), REMAX=remax, BLOCK=block,
                               num_warps=max(1, min(4, block // 256)))
        if remax:
            return adv, ret
        # masked_whiten of the returns; fewer than 2 valid entries: scale 1 (mean 0 when none)
        count = mask.sum()
        mean = (row_sum.sum() / count.clamp(min=1)).reshape(1)
        row_sq = torch.empty_like(row_sum)
        _sqdev_kernel[(batch,)](ret, m8, mean, row_sq, steps, BLOCK=block)
        var = row_sq.sum() / (count - 1).clamp(min=1)
        scale = torch.where(count >= 2, torch.rsqrt(var + 1e-8), torch.ones_like(var))
        stats = torch.cat([mean, scale.reshape(1)])
        _whiten_kernel[(batch, triton.cdiv(steps, block))](ret, m8, stats, adv, steps, BLOCK=block)
    return adv, ret
