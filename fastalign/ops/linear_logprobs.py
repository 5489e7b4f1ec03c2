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
number of tokens. The cpp backend differs (see _bwd_2d): its forward keeps the last tile's logits
buffer for the backward, which turns them into their gradient in place (no recompute of that
tile) and then reuses the buffer for its [tokens, vocab-slice] tiles: one forward tile of extra
memory in both passes. The tiling lives in one custom op pair (fastalign_py::linear_gather_logprobs_
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
from fastalign.ops._checks import check_flag, same_device
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
    keep_last: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 (valid). Returns fp32
    (logprobs [N], entropy [N] or [0], row_stats [N, 2]); 0 at skipped (all-ignored) tiles; and
    with `keep_last` the tile buffer [min(chunk_size, N), V] (hidden's dtype) whose first rows
    hold the logits of the last non-skipped tile (else [0, V]): the CPU backward starts from
    them instead of recomputing that tile (see _bwd_2d)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    fwd, _ = _gather_ops(backend)
    logprobs = hidden.new_zeros((n,), dtype=torch.float32)
    entropy = hidden.new_zeros((n if with_entropy else 0,), dtype=torch.float32)
    row_stats = hidden.new_zeros((n, 2), dtype=torch.float32)
    tiles = _tiles(labels, chunk_size, ignore_index)
    # allocated even with no tile to compute (then never touched: no memory is committed), so
    # that the kept buffer's shape does not depend on the labels' values (fake implementation)
    buf = hidden.new_empty((min(chunk_size, n) if (tiles or keep_last) else 0, vocab))
    for s, e in tiles:
        logits = _tile_logits(hidden, weight, bias, s, e, buf)
        lp, ent, rs = fwd(logits, labels[s:e], temperature, ignore_index, with_entropy)
        logprobs[s:e] = lp
        row_stats[s:e] = rs
        if with_entropy:
            entropy[s:e] = ent
    if keep_last:  # rows past the last tile's are zeroed: an op's outputs are deterministic
        buf[tiles[-1][1] - tiles[-1][0] if tiles else 0:].zero_()
    kept = buf if keep_last else hidden.new_empty((0, vocab))
    return logprobs, entropy, row_stats, kept


# `cache` (the forward's kept tile buffer) is overwritten: the backward turns the kept logits into
# their gradient in place and then reuses the buffer for its other tiles (no second allocation).
@torch.library.custom_op("fastalign_py::linear_gather_logprobs_bwd", mutates_args=("cache",))
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
    cache: Optional[torch.Tensor],
    fwd_chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden [N, H] or [0], grad_weight [V, H] or [0], grad_bias [V] or [0]) in the dtypes
    of hidden/weight/bias; a gradient not asked for (need_* False) comes back empty. cpp: `cache`
    is the forward's kept tile buffer (or None: that tile is recomputed), `fwd_chunk_size` the
    forward's tile rows; both unused by the other backends."""
    if backend == "cpp":
        return _bwd_2d(grad_logprobs, grad_entropy, hidden, weight, bias, labels, row_stats, entropy, temperature,
                       ignore_index, chunk_size, vocab_chunk_size, need_hidden, need_weight, need_bias,
                       cache, fwd_chunk_size)
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


_BLOCK_BYTES = 16 * 2**20  # fp32 row blocks of the CPU backward's temporaries (entropy's p, bf16 -> fp32)


def _step2_tile(rows_per_tile, n_rows, vocab, cols_per_tile, cap, fp32, dtype):
    """(rows, cols) of the CPU backward's step-2 tiles over n_rows recomputed rows. With automatic
    columns (cols_per_tile 0) and fp32, as many columns as the kept buffer of `cap` elements holds,
    balanced over the vocabulary slices (no thin last slice), so the tiles live in that buffer."""
    rows = min(rows_per_tile, n_rows)
    if cols_per_tile > 0:
        cols = cols_per_tile
    elif fp32 and cap >= rows * 64:
        most = cap // rows
        k = -(-vocab // most)
        while -(-vocab // k) > most:  # ceil(V / k) may exceed `most` by rounding
            k += 1
        cols = -(-vocab // k)
    else:
        cols = _auto_cols(rows, vocab, dtype)
    return rows, min(cols, vocab)


def _grad_logits_(z, lab, g, shift, ge, ent, inv_t, v0):
    """In place: fp32 logits z [r, c] of vocabulary columns v0.. -> dL/dz for one tile.

    With row_stats (max z, lse) saved by the forward, log p = x / T - (max + lse) = x / T - shift
    and (g, ge: incoming grads of the logprob and entropy, H the entropy)
        dL/dx_v = (g * [v == label] - p_v * (g + ge * (log p_v + H))) / T
    g, shift, ge, ent: [r] fp32 (ge, ent None without entropy)."""
    if inv_t != 1.0:
        z.mul_(inv_t)
    z.sub_(shift[:, None])  # log p
    if ge is not None:
        # p * (g + ge * (log p + H)); entries with p == 0 (logit -inf) contribute 0. In row blocks
        # of <= 16 MiB: the temporary p stays small next to the tile.
        step = max(1, _BLOCK_BYTES // (4 * max(1, z.shape[1])))
        for r0 in range(0, z.shape[0], step):
            zb, r1 = z[r0:r0 + step], r0 + step
            p = zb.exp()
            zb.add_(ent[r0:r1, None]).mul_(ge[r0:r1, None]).add_(g[r0:r1, None]).mul_(p)
            zb.masked_fill_(p == 0, 0.0).mul_(-inv_t)
            del p
    else:
        z.exp_().mul_(g[:, None] * -inv_t)
    hit = ((lab >= v0) & (lab < v0 + z.shape[1])).nonzero().squeeze(1)
    if hit.numel():
        z.index_put_((hit, lab[hit] - v0), g[hit] * inv_t, accumulate=True)


def _bwd_2d(grad_logprobs, grad_entropy, hidden, weight, bias, labels, row_stats, entropy, temperature,
            ignore_index, rows_per_tile, cols_per_tile, need_hidden, need_weight, need_bias, cache, fwd_chunk):
    """The CPU backward: first the forward's last tile from its kept logits, then the other
    tokens tiled over tokens and vocabulary.

    1. Kept tile (rows s:e, the last non-skipped forward tile): the forward's logits buffer
       `cache` is turned in place into G = dL/dlogits (_grad_logits_; rows with an ignored label
       zeroed), then grad_hidden[s:e] = G @ W, grad_weight = G.T @ hidden[s:e] (this GEMM writes
       grad_weight: no zero fill), grad_bias = G.sum(0). No recompute: at N = 4096, 1024-row forward
       tiles, a quarter of the recompute GEMM is saved. Without `cache` (not kept, or consumed by
       an earlier backward through a retained graph) the tile is recomputed with the forward's
       GEMM shape, so a second backward gives the same gradients bit for bit.
    2. The other tokens with a label: tiles spanning all of them (up to `rows_per_tile`) and a
       slice of the vocabulary keep every GEMM large: the recompute and grad_hidden GEMMs have
       K = H and K = cols, grad_weight[v0:v1] += G.T @ hidden has K = tokens and is read and
       written once per slice. The tiles live in the kept buffer (freed-and-retouched memory
       costs page faults; the buffer is hot), the elementwise step runs in place.
    Extra memory beyond the gradients: the kept buffer (one forward tile), whatever N.
    """
    n, hsize = hidden.shape
    vocab = weight.shape[0]
    dtype = weight.dtype
    fp32 = dtype == torch.float32
    f32 = torch.float32
    inv_t = 1.0 / temperature
    with_ent = grad_entropy is not None
    gh = hidden.new_zeros((n, hsize), dtype=f32) if need_hidden else None  # fp32: the result itself
    gw = gb = None
    g_all = grad_logprobs.float()
    shift_all = row_stats.sum(1)  # max + lse
    ge_all = grad_entropy.float() if with_ent else None
    tiles = _tiles(labels, fwd_chunk, ignore_index)
    rest = labels != ignore_index  # rows for step 2
    if tiles:
        s, e = tiles[-1]
        rest[s:e] = False
        if cache is None or cache.dim() != 2 or cache.shape[0] < e - s or cache.shape[1] != vocab:
            cache = hidden.new_empty((min(fwd_chunk, n), vocab))
            _tile_logits(hidden, weight, bias, s, e, cache)
        x = cache[: e - s]
        lab = labels[s:e]
        valid = lab != ignore_index
        g = torch.where(valid, g_all[s:e], 0.0)
        ge = torch.where(valid, ge_all[s:e], 0.0) if with_ent else None
        ent = entropy[s:e] if with_ent else None
        ignored = (~valid).nonzero().squeeze(1)
        # fp32: in place in the whole tile; low precision: fp32 row blocks of <= ~16 MiB, G rounded
        # to the dtype in place (as eager's grad_logits)
        step = e - s if fp32 else max(1, _BLOCK_BYTES // (4 * max(1, vocab)))
        for r0 in range(0, e - s, step):
            r1 = min(r0 + step, e - s)
            z = x[r0:r1] if fp32 else x[r0:r1].to(f32)
            _grad_logits_(z, lab[r0:r1], g[r0:r1], shift_all[s + r0:s + r1], None if ge is None else ge[r0:r1],
                          None if ent is None else ent[r0:r1], inv_t, 0)
            if not fp32:
                x[r0:r1].copy_(z)
        if ignored.numel():
            x.index_fill_(0, ignored, 0.0)
        if need_hidden:
            if fp32:
                torch.mm(x, weight, out=gh[s:e])
            else:
                gh[s:e] = x @ weight
        if need_weight:
            gw = torch.mm(x.t(), hidden[s:e]) if fp32 else (x.t() @ hidden[s:e]).float()
        if need_bias:
            gb = x.sum(0, dtype=f32)
    if need_weight and gw is None:
        gw = weight.new_zeros(weight.shape, dtype=f32)
    if need_bias and gb is None:
        gb = weight.new_zeros((vocab,), dtype=f32)
    idx = rest.nonzero().squeeze(1)
    nv = idx.numel()
    if nv > 0:
        # contiguous rows (the usual case: no prompt tokens): slices, no gathers or scatters
        contiguous = int(idx[-1]) - int(idx[0]) + 1 == nv
        a = int(idx[0])
        if contiguous:
            pick = lambda t: t[a:a + nv]  # noqa: E731
        else:
            pick = lambda t: t.index_select(0, idx)  # noqa: E731
        hv, lab, g, shift = pick(hidden), pick(labels), pick(g_all), pick(shift_all)
        ge, ent = (pick(ge_all), pick(entropy)) if with_ent else (None, None)
        gh_v = (gh[a:a + nv] if contiguous else hv.new_zeros((nv, hsize), dtype=f32)) if need_hidden else None
        cap = cache.numel()  # the kept buffer, free now: step 2's tiles live in it
        rows, cols = _step2_tile(rows_per_tile, nv, vocab, cols_per_tile, cap, fp32, dtype)
        flat = cache.view(-1)
        buf = flat[: rows * cols].view(rows, cols) if cap >= rows * cols else hv.new_empty((rows, cols))
        fbuf = buf if fp32 else hv.new_empty((rows, cols), dtype=f32)
        for r0 in range(0, nv, rows):
            r1 = min(r0 + rows, nv)
            h_t = hv[r0:r1]
            for v0 in range(0, vocab, cols):
                v1 = min(v0 + cols, vocab)
                w_t = weight[v0:v1]
                x = buf[: r1 - r0, : v1 - v0]
                if bias is None:
                    torch.mm(h_t, w_t.t(), out=x)
                else:
                    torch.addmm(bias[v0:v1], h_t, w_t.t(), out=x)
                z = x if fp32 else fbuf[: r1 - r0, : v1 - v0].copy_(x)
                _grad_logits_(z, lab[r0:r1], g[r0:r1], shift[r0:r1], None if ge is None else ge[r0:r1],
                              None if ent is None else ent[r0:r1], inv_t, v0)
                grad = z if fp32 else x.copy_(z)  # low precision: G rounded to the dtype, as eager's
                if need_hidden:
                    gh_v[r0:r1].addmm_(grad, w_t) if fp32 else gh_v[r0:r1].add_(grad @ w_t)
                if need_weight:
                    gw[v0:v1].addmm_(grad.t(), h_t) if fp32 else gw[v0:v1].add_(grad.t() @ h_t)
                if need_bias:
                    gb[v0:v1] += z.sum(0)
        if need_hidden and not contiguous:
            gh.index_copy_(0, idx, gh_v)
    grad_hidden = (gh if fp32 else gh.to(dtype)) if need_hidden else hidden.new_empty((0,))
    grad_weight = (gw if fp32 else gw.to(dtype)) if need_weight else weight.new_empty((0,))
    grad_bias = gb.to(bias.dtype) if need_bias else weight.new_empty((0,))
    return grad_hidden, grad_weight, grad_bias


def _fake_fwd(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend, chunk_size,
              bwd_chunk_size, vocab_chunk_size, keep_last):
    same_device("linear_gather_logprobs_fwd", hidden=hidden, weight=weight, bias=bias, labels=labels)
    n = hidden.shape[0]
    return (
        hidden.new_empty((n,), dtype=torch.float32),
        hidden.new_empty((n if with_entropy else 0,), dtype=torch.float32),
        hidden.new_empty((n, 2), dtype=torch.float32),
        hidden.new_empty((min(chunk_size, n) if keep_last else 0, weight.shape[0])),
    )


def _fake_bwd(grad_logprobs, grad_entropy, hidden, weight, bias, labels, row_stats, entropy, temperature,
              ignore_index, backend, chunk_size, need_hidden, need_weight, need_bias, vocab_chunk_size, cache,
              fwd_chunk_size):
    return (
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        weight.new_empty((weight.shape[0],) if need_bias else (0,), dtype=bias.dtype if bias is not None else weight.dtype),
    )


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend, fwd_rows, bwd_rows, bwd_cols,
     keep_last) = inputs
    _, entropy, row_stats, kept = output
    ctx.save_for_backward(hidden, weight, bias, labels, row_stats, entropy)
    ctx.args = (temperature, ignore_index, with_entropy, backend, bwd_rows, bwd_cols, fwd_rows)
    # The kept logits tile is held on ctx, not saved: the backward overwrites it (see _bwd_2d) and
    # drops it here, so that a second backward through a retained graph recomputes the tile
    # instead of reading gradients (saved tensors would refuse the second backward). detach():
    # no reference from ctx to an output carrying this node (a reference cycle).
    # Plain tensors only: while torch.compile / opcheck trace the graph (fake or functional tensor
    # subclasses), an op overwriting a forward output in the backward cannot be partitioned, so
    # traced graphs recompute the tile instead.
    ctx.kept = kept.detach() if keep_last and type(kept) is torch.Tensor else None
    # No zero-filled gradients for the outputs that received none (row_stats, the kept tile: a
    # [rows, V] zero tensor would double the backward's extra memory); _backward takes None.
    ctx.mark_non_differentiable(row_stats, kept)
    ctx.set_materialize_grads(False)


def _backward(ctx, bwd, grad_logprobs, grad_entropy, _grad_row_stats, _grad_kept):
    hidden, weight, bias, labels, row_stats, entropy = ctx.saved_tensors
    temperature, ignore_index, with_entropy, backend, chunk_size, vocab_chunk_size, fwd_chunk = ctx.args
    kept, ctx.kept = ctx.kept, None  # used once (overwritten by the backward), see _setup_context
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    if not (need_h or need_w or need_b):
        return (None,) * 12
    if grad_logprobs is None:
        grad_logprobs = row_stats.new_zeros(row_stats.shape[0])
    if not with_entropy:
        grad_entropy = None
    gh, gw, gb = bwd(
        grad_logprobs, grad_entropy, hidden, weight, bias, labels, row_stats,
        entropy if grad_entropy is not None else None, temperature, ignore_index, backend, chunk_size,
        need_h, need_w, need_b, vocab_chunk_size, kept, fwd_chunk,
    )
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + (None,) * 9


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
    gradients is one [chunk_size, V] tile in the forward and two in the backward (cpp: one; the
    last forward tile's logits stay alive from the forward to the backward, which starts from
    them instead of recomputing that tile; they live as long as the autograd graph, so compute
    log-probabilities that no backward follows under `torch.no_grad()`).
    `chunk_size=None` picks it from V and the device (CPU: tiles of ~128 MiB forward, ~32 MiB
    backward; GPU: ~512 MiB; see `auto_chunk_size`); an int overrides the token rows of both
    passes; a pair (rows, cols) also sets the vocabulary columns of the CPU backward's tiles
    (the cpp backend's backward tiles tokens x vocabulary, see `_bwd_2d`). Each tile's
    logits are recomputed in the backward (one extra matmul; cpp: all but the last tile's). bf16/fp16 logits tiles are
    rounded to the input dtype, as in the eager `hidden @ weight.T`.

    FSDP / tensor-parallel weights: pass the full, unsharded [V, H] weight. With FSDP2
    (`fully_shard`), call this inside the forward of the module that owns the LM head (e.g. a
    wrapper module around `lm_head` whose forward takes the hidden states), where FSDP has
    all-gathered the parameter, and pass `self.lm_head.weight`; gradients then reduce-scatter as
    usual. Outside such a forward, a DTensor weight must be gathered explicitly with
    `weight.full_tensor()` (differentiable), which holds the full weight for the call.
    """
    op = "linear_gather_logprobs"
    _check_inputs(hidden, weight, bias, labels, chunk_size)
    # temperature / ignore_index rules, on a stand-in for the logits [..., V] (stride 0: no memory;
    # not hidden[..., :1], which reads as an empty vocabulary when H = 0)
    _lp._check_inputs(hidden.new_empty(1).expand(*labels.shape, 1), labels, temperature, ignore_index, op=op)
    temperature, ignore_index = float(temperature), int(ignore_index)  # the torch path took 2**70 as an int
    return_entropy = check_flag(op, "return_entropy", return_entropy)
    name = _backends.resolve(backend, hidden.device, supported=_SUPPORTED, op=op)
    vocab, hsize = weight.shape
    n = labels.numel()
    labels64 = labels.to(torch.int64).reshape(n)
    rows = hidden.reshape(n, hsize)
    _lp.check_label_range(labels64, vocab, ignore_index, op=op)
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
            bwd_cols = 0  # automatic: as many as the kept forward tile buffer holds
        else:
            bwd_chunk, bwd_cols = auto_chunk_size(n, vocab, hidden.dtype, hidden.device, backward=True), vocab
    # a tile never needs more rows than there are tokens (nor columns than V); an int beyond int64
    # would also fail the op schema with a confusing "expected int, found int"
    chunk, bwd_chunk, bwd_cols = (min(c, max(lim, 1)) for c, lim in ((chunk, n), (bwd_chunk, n), (bwd_cols, vocab)))
    if name == "torch":
        res = reference.linear_gather_logprobs(
            rows, weight, bias, labels64, temperature, ignore_index, return_entropy, chunk_size=bwd_chunk
        )
        lp, ent = res if return_entropy else (res, None)
    else:
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        # cpp: keep the forward's last logits tile for the backward when a gradient will be asked
        keep = name == "cpp" and torch.is_grad_enabled() and (
            hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        lp, ent, _, _ = _fwd(rows, weight, bias, labels64, float(temperature), int(ignore_index),
                             bool(return_entropy), name, int(chunk), int(bwd_chunk), int(bwd_cols), bool(keep))
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if return_entropy else lp
