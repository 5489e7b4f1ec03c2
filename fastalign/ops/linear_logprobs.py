"""linear_gather_logprobs: token log-probabilities (and entropy) straight from the hidden states
and the LM head, without ever holding the [tokens, V] logits.

Design: the tokens are cut into tiles of `chunk_size` rows. Forward, per tile: logits_tile =
hidden_tile @ weight.T (+ bias) with torch.mm/addmm (MKL / oneDNN / cuBLAS) into one reused
buffer, then the backend's fused gather_logprobs forward op (fastalign/ops/logprobs.py) on the
tile; only the per-token outputs and row_stats (max z, log sum exp(z - max)) are kept. Backward,
per tile: the logits are recomputed (the only extra matmul), the backend's fused gather_logprobs
backward op turns them into grad_logits_tile, and

    grad_hidden_tile  = grad_logits_tile @ weight
    grad_weight      += grad_logits_tile.T @ hidden_tile   (fp32 accumulator)
    grad_bias        += grad_logits_tile.sum(0)            (fp32 accumulator)

Tiles whose labels are all ignore_index (prompt tokens) are skipped in both passes. Memory
beyond the inputs, outputs and gradients is two tiles (logits and grad_logits), whatever the
number of tokens. The tiling lives in one custom op pair (fastalign_py::linear_gather_logprobs_
{fwd,bwd}) with fake implementations, so torch.compile(fullgraph=True) and opcheck see it as
one opaque op; the backend ("cpp", "cuda", "triton") is an argument of the pair. The "torch"
backend is kernels/reference.linear_gather_logprobs (the eager math, checkpointed per tile).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastalign import _backends
from fastalign.kernels import reference
from fastalign.ops import logprobs as _lp
from fastalign.ops._register import register_fused

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUPPORTED = ("torch", "cpp", "cuda", "triton")

# Bytes of one tile of logits that the automatic chunk size aims at, (forward, backward). The
# backward holds two tiles (logits and grad_logits) next to the weight gradient, the forward one
# tile and nothing else, so the forward affords larger tiles. CPU: measured with MKL at H = 1024,
# V = 32k, the logits GEMM of a 256-row tile runs ~20% slower per FLOP than 1024 rows; the
# backward keeps 256 rows so that its extra peak stays ~1/10 of the eager path's. GPU: larger
# tiles feed the GEMMs better and are still far below the full logits.
_CPU_TILE_BYTES = (128 * 2**20, 32 * 2**20)
_GPU_TILE_BYTES = (512 * 2**20, 512 * 2**20)


def auto_chunk_size(tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, backward: bool = False) -> int:
    """Token rows per tile: the largest multiple of 64 (or all tokens) whose [rows, V] logits
    fit the device's tile budget for the forward (or `backward`) pass; at least 1."""
    budget = (_GPU_TILE_BYTES if device.type == "cuda" else _CPU_TILE_BYTES)[int(backward)]
    elem = torch.empty((), dtype=dtype).element_size()
    rows = max(1, budget // max(1, vocab * elem))
    if rows >= 64:
        rows -= rows % 64
    return int(max(1, min(rows, tokens)))


def _auto_cols(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Vocabulary columns of a CPU backward tile of `rows` tokens: a multiple of 64 with the fp32
    tile within the backward budget (64 MiB: one tile, no separate grad_logits), at most V."""
    cols = max(64, (2 * _CPU_TILE_BYTES[1] // 4) // max(1, rows))
    return int(max(1, min(vocab, cols - cols % 64)))


def _gather_ops(backend: str):
    return _lp._triton_ops() if backend == "triton" else _lp._FUSED[backend]


def _tiles(labels: torch.Tensor, chunk: int, ignore_index: int):
    """(start, end) of every tile that holds at least one label that is not ignore_index.
    One host sync for all tiles (not one per tile)."""
    n = labels.shape[0]
    if n == 0:
        return []
    starts = list(range(0, n, chunk))
    valid = labels != ignore_index
    pad = (-n) % chunk
    if pad:
        valid = torch.cat([valid, valid.new_zeros(pad)])
    keep = valid.view(-1, chunk).any(1).tolist()
    return [(s, min(s + chunk, n)) for s, k in zip(starts, keep) if k]


def _tile_logits(hidden, weight, bias, s, e, buf):
    """hidden[s:e] @ weight.T (+ bias) written into (a view of) the reused buffer."""
    out = buf[: e - s]
    if bias is None:
        return torch.mm(hidden[s:e], weight.t(), out=out)
    return torch.addmm(bias, hidden[s:e], weight.t(), out=out)


# ---- the custom op pair -----------------------------------------------------------------------


@torch.library.custom_op("fastalign_py::linear_gather_logprobs_fwd", mutates_args=())
def _fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    backend: str,
    chunk_size: int,
    bwd_chunk_size: int,
    vocab_chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 (valid). Returns fp32
    (logprobs [N], entropy [N] or [0], row_stats [N, 2]); 0 at skipped (all-ignored) tiles."""
    n, vocab = hidden.shape[0], weight.shape[0]
    fwd, _ = _gather_ops(backend)
    logprobs = hidden.new_zeros((n,), dtype=torch.float32)
    entropy = hidden.new_zeros((n if with_entropy else 0,), dtype=torch.float32)
    row_stats = hidden.new_zeros((n, 2), dtype=torch.float32)
    tiles = _tiles(labels, chunk_size, ignore_index)
    if tiles:
        buf = hidden.new_empty((min(chunk_size, n), vocab))
    for s, e in tiles:
        logits = _tile_logits(hidden, weight, bias, s, e, buf)
        lp, ent, rs = fwd(logits, labels[s:e], temperature, ignore_index, with_entropy)
        logprobs[s:e] = lp
        row_stats[s:e] = rs
        if with_entropy:
            entropy[s:e] = ent
    return logprobs, entropy, row_stats


@torch.library.custom_op("fastalign_py::linear_gather_logprobs_bwd", mutates_args=())
def _bwd(
    grad_logprobs: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    row_stats: torch.Tensor,
    entropy: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    backend: str,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    vocab_chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden [N, H] or [0], grad_weight [V, H] or [0], grad_bias [V] or [0]) in the dtypes
    of hidden/weight/bias; a gradient not asked for (need_* False) comes back empty."""
    if backend == "cpp":
        return _bwd_2d(grad_logprobs, grad_entropy, hidden, weight, bias, labels, row_stats, entropy, temperature,
                       ignore_index, chunk_size, vocab_chunk_size, need_hidden, need_weight, need_bias)
    n, vocab = hidden.shape[0], weight.shape[0]
    _, bwd = _gather_ops(backend)
    fp32 = weight.dtype == torch.float32
    grad_hidden = hidden.new_zeros(hidden.shape) if need_hidden else hidden.new_empty((0,))
    # fp32 accumulators across tiles; for fp32 inputs the result tensor is the accumulator.
    gw_acc = weight.new_zeros(weight.shape, dtype=torch.float32) if need_weight else None
    gb_acc = weight.new_zeros((vocab,), dtype=torch.float32) if need_bias else None
    tiles = _tiles(labels, chunk_size, ignore_index)
    if tiles:
        buf = hidden.new_empty((min(chunk_size, n), vocab))
    for s, e in tiles:
        logits = _tile_logits(hidden, weight, bias, s, e, buf)
        g_ent = grad_entropy[s:e] if grad_entropy is not None else None
        ent = entropy[s:e] if grad_entropy is not None else None
        # grad of the tile's logits, in the logits' dtype (as eager autograd would give it)
        grad_logits = bwd(grad_logprobs[s:e], g_ent, logits, labels[s:e], row_stats[s:e], ent, temperature, ignore_index)
        if need_hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[s:e])
        if need_weight:
            if fp32:
                gw_acc.addmm_(grad_logits.t(), hidden[s:e])
            else:  # low-precision GEMM (fp32 accumulation inside), summed across tiles in fp32
                gw_acc += torch.mm(grad_logits.t(), hidden[s:e])
        if need_bias:
            gb_acc += grad_logits.sum(0, dtype=torch.float32)
        del grad_logits
    grad_weight = gw_acc.to(weight.dtype) if need_weight else weight.new_empty((0,))
    grad_bias = gb_acc.to(bias.dtype) if need_bias else weight.new_empty((0,))
    return grad_hidden, grad_weight, grad_bias


def _bwd_2d(grad_logprobs, grad_entropy, hidden, weight, bias, labels, row_stats, entropy, temperature,
            ignore_index, rows_per_tile, cols_per_tile, need_hidden, need_weight, need_bias):
    """The CPU backward, tiled over tokens (rows of the non-ignored tokens) and vocabulary.

    With row_stats (max z, lse) saved by the forward, each [rows, cols] tile of the gradient of
    the logits is elementwise in its recomputed logits x (z = x / T, log p = z - max - lse):
        dL/dx_v = (g * [v == label] - p_v * (g + ge * (log p_v + H))) / T
    (g, ge: incoming grads of the logprob and entropy, H the entropy). A tile spanning all tokens
    (4096 rows) and a slice of the vocabulary keeps every GEMM large: the recompute and
    grad_hidden GEMMs have K = H and K = cols, grad_weight[v0:v1] = G.T @ hidden has K = tokens and
    is written once instead of being re-read and re-written per token tile. The elementwise step
    runs in place on the one reused fp32 tile buffer (no separate grad_logits tile).
    """
    n, hsize = hidden.shape
    vocab = weight.shape[0]
    dtype = weight.dtype
    fp32 = dtype == torch.float32
    inv_t = 1.0 / temperature
    grad_hidden = hidden.new_empty((0,))
    gw_acc = weight.new_zeros(weight.shape, dtype=torch.float32) if need_weight else None
    gb_acc = weight.new_zeros((vocab,), dtype=torch.float32) if need_bias else None
    # only the tokens with a label take part (prompt tokens are skipped entirely)
    valid = labels != ignore_index
    idx = valid.nonzero().squeeze(1)
    nv = idx.numel()
    compact = nv != n
    pick = (lambda t: t.index_select(0, idx)) if compact else (lambda t: t)  # noqa: E731
    if nv > 0:
        hv, lab = pick(hidden), pick(labels)
        g = pick(grad_logprobs).float()
        shift = pick(row_stats).sum(1)  # max + lse: log p = x / T - shift
        with_ent = grad_entropy is not None
        if with_ent:
            ge, ent = pick(grad_entropy).float(), pick(entropy)
        gh_acc = hv.new_zeros((nv, hsize), dtype=torch.float32) if need_hidden else None
        rows, cols = min(rows_per_tile, nv), min(cols_per_tile, vocab)
        buf = hv.new_empty((rows, cols))
        fbuf = buf if fp32 else hv.new_empty((rows, cols), dtype=torch.float32)
        for r0 in range(0, nv, rows):
            r1 = min(r0 + rows, nv)
            h_t, lab_t, g_t = hv[r0:r1], lab[r0:r1], g[r0:r1, None]
            for v0 in range(0, vocab, cols):
                v1 = min(v0 + cols, vocab)
                w_t = weight[v0:v1]
                x = buf[: r1 - r0, : v1 - v0]
                if bias is None:
                    torch.mm(h_t, w_t.t(), out=x)
                else:
                    torch.addmm(bias[v0:v1], h_t, w_t.t(), out=x)
                z = x if fp32 else fbuf[: r1 - r0, : v1 - v0].copy_(x)
                z.mul_(inv_t).sub_(shift[r0:r1, None])  # log p
                if with_ent:
                    p = z.exp()
                    # p * (g + ge * (log p + H)); entries with p == 0 (logit -inf) contribute 0
                    z.add_(ent[r0:r1, None]).mul_(ge[r0:r1, None]).add_(g_t).mul_(p)
                    z.masked_fill_(p == 0, 0.0).mul_(-inv_t)
                    del p
                else:
                    z.exp_().mul_(g_t * -inv_t)
                hit = ((lab_t >= v0) & (lab_t < v1)).nonzero().squeeze(1)
                if hit.numel():
                    z.index_put_((hit, lab_t[hit] - v0), g_t[hit, 0] * inv_t, accumulate=True)
                grad = z if fp32 else x.copy_(z)  # low precision: G rounded to the dtype, as eager's
                if need_hidden:
                    gh_acc[r0:r1].addmm_(grad, w_t) if fp32 else gh_acc[r0:r1].add_(grad @ w_t)
                if need_weight:
                    gw_acc[v0:v1].addmm_(grad.t(), h_t) if fp32 else gw_acc[v0:v1].add_(grad.t() @ h_t)
                if need_bias:
                    gb_acc[v0:v1] += z.sum(0)
        if need_hidden:
            gh = gh_acc.to(dtype)
            grad_hidden = hidden.new_zeros(hidden.shape).index_copy_(0, idx, gh) if compact else gh
    elif need_hidden:
        grad_hidden = hidden.new_zeros(hidden.shape)
    grad_weight = gw_acc.to(dtype) if need_weight else weight.new_empty((0,))
    grad_bias = gb_acc.to(bias.dtype) if need_bias else weight.new_empty((0,))
    return grad_hidden, grad_weight, grad_bias


def _fake_fwd(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend, chunk_size,
              bwd_chunk_size, vocab_chunk_size):
    n = hidden.shape[0]
    return (
        hidden.new_empty((n,), dtype=torch.float32),
        hidden.new_empty((n if with_entropy else 0,), dtype=torch.float32),
        hidden.new_empty((n, 2), dtype=torch.float32),
    )


def _fake_bwd(grad_logprobs, grad_entropy, hidden, weight, bias, labels, row_stats, entropy, temperature,
              ignore_index, backend, chunk_size, need_hidden, need_weight, need_bias, vocab_chunk_size):
    return (
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        weight.new_empty((weight.shape[0],) if need_bias else (0,), dtype=bias.dtype if bias is not None else weight.dtype),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend, _, bwd_rows, bwd_cols = inputs
    _, entropy, row_stats = output
    ctx.save_for_backward(hidden, weight, bias, labels, row_stats, entropy)
    ctx.args = (temperature, ignore_index, with_entropy, backend, bwd_rows, bwd_cols)


def _backward(ctx, bwd, grad_logprobs, grad_entropy, _grad_row_stats):
    hidden, weight, bias, labels, row_stats, entropy = ctx.saved_tensors
    temperature, ignore_index, with_entropy, backend, chunk_size, vocab_chunk_size = ctx.args
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    if not (need_h or need_w or need_b):
        return (None,) * 11
    if grad_logprobs is None:
        grad_logprobs = row_stats.new_zeros(row_stats.shape[0])
    if not with_entropy:
        grad_entropy = None
    gh, gw, gb = bwd(
        grad_logprobs, grad_entropy, hidden, weight, bias, labels, row_stats,
        entropy if grad_entropy is not None else None, temperature, ignore_index, backend, chunk_size,
        need_h, need_w, need_b, vocab_chunk_size,
    )
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + (None,) * 8


register_fused(_fwd, _bwd, fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward)


# ---- validation -------------------------------------------------------------------------------


def _check_inputs(hidden, weight, bias, labels, chunk_size):
    op = "linear_gather_logprobs"
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a tensor or None, got {type(bias).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"{op}: bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: labels must be int32 or int64, got {labels.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must have shape [..., H], got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{op}: labels must have the shape of hidden without its last dim: hidden {tuple(hidden.shape)} "
            f"needs labels {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias), ("labels", labels)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{op}: {name} is on {t.device} but hidden on {hidden.device}")
    def _pos_int(c):
        return isinstance(c, int) and not isinstance(c, bool) and c >= 1

    if chunk_size is not None and not (
        _pos_int(chunk_size)
        or (isinstance(chunk_size, tuple) and len(chunk_size) == 2 and all(_pos_int(c) for c in chunk_size))
    ):
        raise ValueError(
            f"{op}: chunk_size must be None (automatic), an int >= 1 or a pair of ints >= 1, got {chunk_size!r}"
        )
    if labels.numel() > 0 and weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has an empty vocabulary (V = 0)")


# ---- public op --------------------------------------------------------------------------------


def linear_gather_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size=None,
    backend: str = "auto",
):
    """`gather_logprobs(hidden @ weight.T + bias, labels, ...)` without the [tokens, V] logits.

    hidden `[..., H]` and weight `[V, H]` (and bias `[V]`) of one dtype, fp32/bf16/fp16; labels
    `[...]` int32/int64. Returns fp32 log-probabilities of shape labels.shape (and the entropy
    with `return_entropy=True`); positions whose label is `ignore_index` give 0 and no gradient.
    Gradients flow to hidden, weight and bias (in their dtypes) from both outputs. Inputs are
    never modified.

    The tokens are processed `chunk_size` at a time: peak memory beyond the inputs, outputs and
    gradients is one [chunk_size, V] tile in the forward and two in the backward.
    `chunk_size=None` picks it from V and the device (CPU: tiles of ~128 MiB forward, ~32 MiB
    backward; GPU: ~512 MiB; see `auto_chunk_size`); an int overrides the token rows of both
    passes; a pair (rows, cols) also sets the vocabulary columns of the CPU backward's tiles
    (the cpp backend's backward tiles tokens x vocabulary, see `_bwd_2d`). Each tile's
    logits are recomputed in the backward (one extra matmul). bf16/fp16 logits tiles are
    rounded to the input dtype, as in the eager `hidden @ weight.T`.

    FSDP / tensor-parallel weights: pass the full, unsharded [V, H] weight. With FSDP2
    (`fully_shard`), call this inside the forward of the module that owns the LM head (e.g. a
    wrapper module around `lm_head` whose forward takes the hidden states), where FSDP has
    all-gathered the parameter, and pass `self.lm_head.weight`; gradients then reduce-scatter as
    usual. Outside such a forward, a DTensor weight must be gathered explicitly with
    `weight.full_tensor()` (differentiable), which holds the full weight for the call.
    """
    _check_inputs(hidden, weight, bias, labels, chunk_size)
    _lp._check_inputs(hidden[..., :1], labels, temperature, ignore_index)  # temperature / ignore_index rules
    name = _backends.resolve(backend, hidden.device, supported=_SUPPORTED, op="linear_gather_logprobs")
    vocab, hsize = weight.shape
    n = labels.numel()
    labels64 = labels.to(torch.int64).reshape(n)
    rows = hidden.reshape(n, hsize)
    _lp.check_label_range(labels64, vocab, ignore_index)
    if isinstance(chunk_size, tuple):
        chunk = bwd_chunk = chunk_size[0]
        bwd_cols = chunk_size[1]
    elif chunk_size is not None:
        chunk = bwd_chunk = chunk_size
        bwd_cols = _auto_cols(bwd_chunk, vocab, hidden.dtype)
    else:
        chunk = auto_chunk_size(n, vocab, hidden.dtype, hidden.device)
        if name == "cpp":  # tiles of (up to) 4096 tokens x a slice of the vocabulary, see _bwd_2d
            bwd_chunk = min(max(n, 1), 4096)
            bwd_cols = _auto_cols(bwd_chunk, vocab, hidden.dtype)
        else:
            bwd_chunk, bwd_cols = auto_chunk_size(n, vocab, hidden.dtype, hidden.device, backward=True), vocab
    if name == "torch":
        res = reference.linear_gather_logprobs(
            rows, weight, bias, labels64, temperature, ignore_index, return_entropy, chunk_size=bwd_chunk
        )
        lp, ent = res if return_entropy else (res, None)
    else:
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        lp, ent, _ = _fwd(rows, weight, bias, labels64, float(temperature), int(ignore_index),
                          bool(return_entropy), name, int(chunk), int(bwd_chunk), int(bwd_cols))
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if return_entropy else lp
