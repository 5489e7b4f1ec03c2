"""Triton GAE: one program per row, the row scanned in chunks from its end with
tl.associative_scan over affine maps of the scan state.

The state after a step is (A, V): running advantage and value of the next valid step. Step t is
the affine map f_t(A, V) = (alpha*A + beta*V + k1, eps*V + k2) with
    valid t:  alpha = gamma*lam, beta = gamma, k1 = r_t - v_t, eps = 0, k2 = v_t
    masked t: the identity (1, 0, 0, 1, 0)
and A_t is the first component of f_t(f_{t+1}(... f_{T-1}(0, 0))). Composition g∘f is again of
this form, and associative, so a prefix scan over the time-reversed chunk gives every A_t at once;
the chunk's full composite carries the state to the next (earlier) chunk.

The chunk is loaded time-reversed and scanned forward (rather than reverse=True) so that the
combine's argument order is the documented forward one on every Triton version and the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.kernels.triton._utils import check_rows, device_guard


@triton.jit
def _compose(a_f, b_f, k1_f, e_f, k2_f, a_g, b_g, k1_g, e_g, k2_g):
    # g ∘ f: f holds the later time steps (earlier in the reversed scan order), applied first.
    return (
        a_g * a_f,
        a_g * b_f + b_g * e_f,
        a_g * k1_f + b_g * k2_f + k1_g,
        e_g * e_f,
        e_g * k2_f + k2_g,
    )


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, T, gamma, gamma_lam, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    j = tl.arange(0, BLOCK)
    carry_a = gamma * 0.0  # fp32 scalars
    carry_v = gamma * 0.0
    n_chunks = tl.cdiv(T, BLOCK)
    for c in range(0, n_chunks):
        t = T - 1 - c * BLOCK - j  # time index, decreasing along the block
        inb = t >= 0
        offs = base + t
        valid = tl.load(m_ptr + offs, mask=inb, other=0) != 0
        r = tl.load(r_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        alpha = tl.where(valid, gamma_lam, 1.0)
        beta = tl.where(valid, gamma, 0.0)
        k1 = tl.where(valid, r - v, 0.0)
        eps = tl.where(valid, 0.0, 1.0)
        k2 = tl.where(valid, v, 0.0)
        alpha, beta, k1, eps, k2 = tl.associative_scan((alpha, beta, k1, eps, k2), 0, _compose)
        a_t = alpha * carry_a + beta * carry_v + k1
        tl.store(adv_ptr + offs, tl.where(valid, a_t, 0.0), mask=inb)
        tl.store(ret_ptr + offs, tl.where(valid, a_t + v, 0.0), mask=inb)
        # the last scan entry is the whole chunk's composite (out-of-range steps are identities)
        last = j == BLOCK - 1
        v_t = eps * carry_v + k2
        carry_a = tl.sum(tl.where(last, a_t, 0.0), axis=0)
        carry_v = tl.sum(tl.where(last, v_t, 0.0), axis=0)


def _block_for(steps: int) -> int:
    # chunk length: the whole row up to 1024 steps, else 1024-step chunks carried serially
    return max(16, min(1024, triton.next_power_of_2(max(steps, 1))))


def _warps_for(block: int) -> int:
    # ~8 steps per thread for the 5-component scan; 1 warp for short rows, 4 for full chunks
    return max(1, min(4, block // 256))


def gae_fwd(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the kernel: rewards/values [B, T] (one float dtype), mask [B, T] bool; returns
    fp32 (advantages, returns). Wrapped as the custom op fastalign_triton::gae_fwd by
    fastalign/ops/gae.py."""
    check_rows("gae_fwd", (rewards, values), mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):  # as the C++ op checks
        raise ValueError(f"gae_fwd: gamma and lam must be in [0, 1], got {gamma}, {lam}")
    rewards, values, mask = rewards.contiguous(), values.contiguous(), mask.contiguous()
    batch, steps = rewards.shape
    adv = torch.empty((batch, steps), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if batch == 0 or steps == 0:
        return adv, ret
    block = _block_for(steps)
    with device_guard(rewards):
        _gae_kernel[(batch,)](
            rewards, values, mask.view(torch.uint8), adv, ret, steps, float(gamma), float(gamma * lam),
            BLOCK=block, num_warps=_warps_for(block),
        )
    return adv, ret
