"""Triton kernels for gather_logprobs: the ops fastalign_triton::gather_logprobs_{fwd,bwd}.

Same contract as the C++/CUDA ops fastalign::gather_logprobs_{fwd,bwd} (schemas in
fastalign/ops/logprobs.py):
  fwd(logits [N, V] (unit inner stride), labels [N] int64, temperature, ignore_index, with_entropy)
      -> (logprobs fp32 [N], entropy fp32 [N] or [0], row_stats fp32 [N, 2] = (m, log s))
  bwd(grad_logprobs, grad_entropy?, logits, labels, row_stats, entropy?, temperature, ignore_index)
      -> grad_logits [N, V] in the logits' dtype

Math, per row, with z_j = x_j / T and label y (as csrc/cpu/isa/logprobs_rows.h):
  m = max_j z_j,  s = sum_j exp(z_j - m),  t = sum_j exp(z_j - m) (z_j - m)
  logp_y = (z_y - m) - log s,   H = -sum_j p_j log p_j = log s - t / s
The forward is one program per row sweeping the vocabulary in BLOCK_V tiles with an online
log-sum-exp: a tile whose max raises m to m' rescales s and t by exp(m - m') (t also gains
(m - m') s). The entropy is measured relative to m, so it has no cancellation of large numbers.
The backward (one program per row, a second sweep) recomputes log p_j = (z_j - m) - log s from
row_stats and writes
  grad_x_j = (1/T) (g [j == y] - p_j (g + g_H (log p_j + H)))
Zero probabilities (z = -inf) contribute 0 to t and to the gradient, never 0 * inf. NaN in a
row makes that row's outputs NaN. Rows whose label is ignore_index output 0 and get zero
gradient without reading their logits; so do rows whose incoming gradients are both 0 (as the
C++ kernel). A label outside [0, V) never reads out of bounds: its logprob is NaN (the public
op rejects such labels before calling) and its gradient row NaN. Offsets are 64-bit (row index
cast to int64).
"""

import math

import torch
import triton
import triton.language as tl

from fastalign.kernels.triton._utils import device_guard, row_block, warps_for

# Clamp for log p (and z - m) before it multiplies anything: below log of the smallest fp32
# denormal (-103.3), so exp() of any clamped value is 0 anyway, and small enough in magnitude
# that g_H * (log p + H) cannot overflow (a clamp at -FLT_MAX would: g_H * -FLT_MAX = -inf, and
# then p * -inf = 0 * -inf = NaN for masked vocabulary entries).
_LOG_TINY = tl.constexpr(-200.0)

# Tile caps: 4096 fp32 / 8192 16-bit elements = 16 KiB per tile per sweep, 8 or 16 warps.
_CAP = {torch.float32: 4096, torch.bfloat16: 8192, torch.float16: 8192}


@triton.jit
def _fwd_kernel(
    logits_ptr,
    row_stride,
    labels_ptr,
    logprobs_ptr,
    entropy_ptr,
    stats_ptr,
    V,
    inv_t,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    x_row = logits_ptr + row * row_stride
    # Ignored rows sweep nothing: their logits are never read.
    v_end = tl.where(ignored, 0, V)

    m = -float("inf")  # running max of z
    s = 0.0  # sum exp(z - m)
    t = 0.0  # sum exp(z - m) (z - m)
    for start in range(0, v_end, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # all -inf so far: subtract 0 instead of -inf, so exp(-inf - 0) = 0 rather than NaN
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        scale = tl.exp(m - m_ref)
        d = z - m_ref
        e = tl.exp(d)
        if WITH_ENTROPY:
            # rescale t from m to m_new; s == 0 means nothing accumulated yet (m may be -inf)
            t = (t + tl.where(s > 0.0, m - m_ref, 0.0) * s) * scale
            t += tl.sum(e * tl.maximum(d, _LOG_TINY), axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new

    log_s = tl.log(tl.where(ignored, 1.0, s))  # (ignored rows: no log 0 and 0 / 0 below)
    s = tl.where(ignored, 1.0, s)
    # the label's logit; an out-of-range label gives NaN instead of reading out of bounds
    in_range = (label >= 0) & (label < V) & (~ignored)
    z_y = tl.load(x_row + label, mask=in_range, other=float("nan")).to(tl.float32) * inv_t
    tl.store(logprobs_ptr + row, tl.where(ignored, 0.0, (z_y - m) - log_s))
    tl.store(stats_ptr + 2 * row, tl.where(ignored, 0.0, m))
    tl.store(stats_ptr + 2 * row + 1, tl.where(ignored, 0.0, log_s))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(ignored, 0.0, log_s - t / s))


@triton.jit
def _bwd_kernel(
    grad_lp_ptr,
    grad_ent_ptr,
    logits_ptr,
    row_stride,
    labels_ptr,
    stats_ptr,
    entropy_ptr,
    grad_ptr,
    V,
    inv_t,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    g = tl.load(grad_lp_ptr + row)
    # Rows that get no gradient write zeros without reading their logits.
    if WITH_ENTROPY:
        gh = tl.load(grad_ent_ptr + row)
        h = tl.load(entropy_ptr + row)
        active = (label != ignore_index) & ((g != 0.0) | (gh != 0.0))
    else:
        active = (label != ignore_index) & (g != 0.0)
    # An out-of-range label (only a direct op call can pass one) makes the row's gradient NaN, as
    # its logprob is and as the CUDA kernel does, rather than a finite gradient without the
    # one-hot term. (After `active`: rows with no incoming gradient still get zeros.)
    g = tl.where((label >= 0) & (label < V), g, float("nan"))
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    x_row = logits_ptr + row * row_stride
    g_row = grad_ptr + row * V  # the gradient is allocated contiguous
    # columns to read: all of them, or none for inactive rows (an int bound rather than a
    # broadcast bool, which the interpreter mishandles)
    read_end = tl.where(active, V, 0)

    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < V
        read = offs < read_end
        z = tl.load(x_row + offs, mask=read, other=-float("inf")).to(tl.float32) * inv_t
        logp = (z - m) - log_s
        p = tl.exp(logp)
        if WITH_ENTROPY:
            # log p clamped so that p = 0 gives 0, not 0 * -inf
            coef = g + gh * (tl.maximum(logp, _LOG_TINY) + h)
        else:
            coef = g
        grad = -p * coef
        grad = tl.where(offs == label, grad + g, grad) * inv_t  # the one-hot term, in fp32
        grad = tl.where(read, grad, 0.0)
        tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _check_2d(logits: torch.Tensor, labels: torch.Tensor, temperature: float, op: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _CAP:
        raise TypeError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{op}: labels must be [N] = [{logits.shape[0]}], got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{op}: labels must be int64 here, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels are on {labels.device} but logits on {logits.device}")
    if not (temperature > 0 and math.isfinite(temperature)):  # as the C++/CUDA ops check
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")


def _unit_inner(logits: torch.Tensor) -> torch.Tensor:
    # The kernels index a row as base + j; any other inner stride gets a (rare) contiguous copy.
    return logits if logits.stride(1) == 1 or logits.shape[1] <= 1 else logits.contiguous()


def forward(logits, labels, temperature, ignore_index, with_entropy, block_v=None):
    """Launches the forward kernel; block_v overrides the tile length (tests use small tiles)."""
    _check_2d(logits, labels, temperature, "gather_logprobs_fwd")
    n, vocab = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    logprobs = torch.empty(n, **f32)
    entropy = torch.empty(n if with_entropy else 0, **f32)
    row_stats = torch.empty(n, 2, **f32)
    if n == 0:
        return logprobs, entropy, row_stats
    if vocab == 0:
        raise ValueError("gather_logprobs_fwd: the vocabulary dim of logits is empty")
    logits, labels = _unit_inner(logits), labels.contiguous()
    block = block_v or row_block(vocab, _CAP[logits.dtype])
    with device_guard(logits):
        _fwd_kernel[(n,)](
            logits, logits.stride(0), labels, logprobs, entropy if with_entropy else logprobs, row_stats,
            vocab, 1.0 / temperature, ignore_index,
            WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=warps_for(block),
        )  # fmt: skip
    return logprobs, entropy, row_stats


def backward(grad_logprobs, grad_entropy, logits, labels, row_stats, entropy, temperature, ignore_index, block_v=None):
    _check_2d(logits, labels, temperature, "gather_logprobs_bwd")
    n, vocab = logits.shape
    grad_logits = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
    if n == 0 or vocab == 0:
        return grad_logits
    if row_stats.shape != (n, 2) or row_stats.dtype != torch.float32:
        raise ValueError(
            f"gather_logprobs_bwd: row_stats must be fp32 [{n}, 2], got {row_stats.dtype} {tuple(row_stats.shape)}"
        )
    if grad_logprobs.numel() != n:
        raise ValueError(f"gather_logprobs_bwd: grad_logprobs must have {n} elements, got {grad_logprobs.numel()}")
    with_entropy = grad_entropy is not None
    if with_entropy and (entropy is None or entropy.numel() != n or grad_entropy.numel() != n):
        raise ValueError(f"gather_logprobs_bwd: grad_entropy needs entropy, both with {n} elements")
    g = grad_logprobs.reshape(n).to(torch.float32).contiguous()
    gh = grad_entropy.reshape(n).to(torch.float32).contiguous() if with_entropy else g
    h = entropy.reshape(n).to(torch.float32).contiguous() if with_entropy else g
    logits, labels, stats = _unit_inner(logits), labels.contiguous(), row_stats.contiguous()
    block = block_v or row_block(vocab, _CAP[logits.dtype])
    with device_guard(logits):
        _bwd_kernel[(n,)](
            g, gh, logits, logits.stride(0), labels, stats, h, grad_logits,
            vocab, 1.0 / temperature, ignore_index,
            WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=warps_for(block),
        )  # fmt: skip
    return grad_logits


# The launcher names the op's description (fastalign/ops/logprobs.py, triton=...) looks up.
gather_logprobs_fwd, gather_logprobs_bwd = forward, backward
