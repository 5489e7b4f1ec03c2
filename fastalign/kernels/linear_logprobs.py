"""The Python kernels of linear_gather_logprobs: the token tiler and the CPU backward.

These implement the op pair fastalign_py::linear_gather_logprobs_{fwd,bwd} (schemas, fakes and
autograd: the LINEAR_GATHER_LOGPROBS description in fastalign/ops/linear_logprobs.py, which also
validates the arguments and picks the tile sizes).

Forward, per tile of `chunk_size` token rows: logits_tile = hidden_tile @ weight.T (+ bias) with
torch.mm/addmm (MKL / oneDNN / cuBLAS) into one reused buffer, then the backend's fused
gather_logprobs forward op on the tile; only the per-token outputs and row_stats (max z,
log sum exp(z - max)) are kept. Backward, per tile: the logits are recomputed (the only extra
matmul), the backend's fused gather_logprobs backward op turns them into G = grad_logits_tile, and

    grad_hidden_tile  = G @ weight
    grad_weight      += G.T @ hidden_tile   (fp32 accumulator)
    grad_bias        += G.sum(0)            (fp32 accumulator)

Tiles whose labels are all ignore_index (prompt tokens) are skipped in both passes. The cpp
backend's backward is its own (_bwd_2d): it starts from the forward's kept last logits tile and
tiles the other tokens over tokens and vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Bytes of one tile of logits that the automatic chunk size aims at, (forward, backward). The
# backward holds two tiles (logits and grad_logits) next to the weight gradient, the forward one
# tile and nothing else, so the forward affords larger tiles. CPU: small tiles run the logits GEMM
# slower per FLOP (MKL); the backward's smaller tiles keep its extra peak a fraction of the eager
# path's. GPU: larger tiles feed the GEMMs better and are still far below the full logits.
_CPU_TILE_BYTES = (128 * 2**20, 32 * 2**20)
_GPU_TILE_BYTES = (512 * 2**20, 512 * 2**20)
_BLOCK_BYTES = 16 * 2**20  # fp32 row blocks of the CPU backward's temporaries (entropy's p, bf16 -> fp32)


def auto_chunk_size(tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, backward: bool = False) -> int:
    """Token rows per tile: the largest multiple of 64 (or all tokens) whose [rows, V] logits
    fit the device's tile budget for the forward (or `backward`) pass; at least 1."""
    budget = (_GPU_TILE_BYTES if device.type == "cuda" else _CPU_TILE_BYTES)[int(backward)]
    elem = torch.empty((), dtype=dtype).element_size()
    rows = max(1, budget // max(1, vocab * elem))
    if rows >= 64:
        rows -= rows % 64
    return int(max(1, min(rows, tokens)))


def auto_cols(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Vocabulary columns of a CPU backward tile of `rows` tokens: a multiple of 64 with the fp32
    tile within the backward budget (64 MiB: one tile, no separate grad_logits), at most V."""
    cols = max(64, (2 * _CPU_TILE_BYTES[1] // 4) // max(1, rows))
    return int(max(1, min(vocab, cols - cols % 64)))


@dataclass(frozen=True)
class Head:
    """The LM head over its tokens: logits = hidden @ weight.T (+ bias), one label per row.
    hidden [N, H], weight [V, H], bias [V] or None (one dtype), labels [N] int64."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: torch.Tensor
    temperature: float
    ignore_index: int


@dataclass(frozen=True)
class Upstream:
    """What the backward gets from the forward and from the loss: the incoming gradients of the
    logprobs [N] and of the entropy [N] (None when it received none, then `entropy` is None too),
    and the forward's row_stats [N, 2] and entropy."""

    grad_logprobs: torch.Tensor
    grad_entropy: Optional[torch.Tensor]
    row_stats: torch.Tensor
    entropy: Optional[torch.Tensor]


@dataclass(frozen=True)
class Wanted:
    """Which gradients to compute (a gradient not wanted comes back empty)."""

    hidden: bool
    weight: bool
    bias: bool


def _gather_kernels(backend: str):
    """The fused gather_logprobs (fwd, bwd) ops of `backend`, as registered by their description
    (fastalign/ops/logprobs.py); cpp and cuda share one pair, dispatched by device."""
    ns = torch.ops.fastalign_triton if backend == "triton" else torch.ops.fastalign
    return ns.gather_logprobs_fwd.default, ns.gather_logprobs_bwd.default


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


# ---- the op pair's implementations ------------------------------------------------------------


def linear_gather_logprobs_fwd(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend,
                               chunk_size, bwd_chunk_size, vocab_chunk_size, keep_last):
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 (valid). Returns fp32
    (logprobs [N], entropy [N] or [0], row_stats [N, 2]); 0 at skipped (all-ignored) tiles; and
    with `keep_last` the tile buffer [min(chunk_size, N), V] (hidden's dtype) whose first rows
    hold the logits of the last non-skipped tile (else [0, V]): the CPU backward starts from
    them instead of recomputing that tile (see _bwd_2d). bwd_chunk_size and vocab_chunk_size are
    the backward's (the autograd context keeps them)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    fwd, _ = _gather_kernels(backend)
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


def linear_gather_logprobs_bwd(grad_logprobs, grad_entropy, hidden, weight, bias, labels, row_stats, entropy,
                               temperature, ignore_index, backend, chunk_size, need_hidden, need_weight, need_bias,
                               vocab_chunk_size, cache, fwd_chunk_size):
    """(grad_hidden [N, H] or [0], grad_weight [V, H] or [0], grad_bias [V] or [0]) in the dtypes
    of hidden/weight/bias; a gradient not asked for (need_* False) comes back empty. cpp: `cache`
    is the forward's kept tile buffer (or None: that tile is recomputed; it is overwritten),
    `fwd_chunk_size` the forward's tile rows; both unused by the other backends."""
    head = Head(hidden, weight, bias, labels, temperature, ignore_index)
    upstream = Upstream(grad_logprobs, grad_entropy, row_stats, entropy)
    need = Wanted(need_hidden, need_weight, need_bias)
    if backend == "cpp":
        return _bwd_2d(head, upstream, need, chunk_size, vocab_chunk_size, cache, fwd_chunk_size)
    return _tiled_bwd(_gather_kernels(backend)[1], head, upstream, need, chunk_size)


# the names the tests call the implementations by
_fwd, _bwd = linear_gather_logprobs_fwd, linear_gather_logprobs_bwd


def _tiled_bwd(bwd, head: Head, up: Upstream, need: Wanted, chunk_size: int):
    """The backward of the cuda and triton backends: token tiles, each recomputed, through the
    backend's fused gather_logprobs backward op `bwd`."""
    hidden, weight, bias, labels = head.hidden, head.weight, head.bias, head.labels
    n, vocab = hidden.shape[0], weight.shape[0]
    fp32 = weight.dtype == torch.float32
    grad_hidden = hidden.new_zeros(hidden.shape) if need.hidden else hidden.new_empty((0,))
    # fp32 accumulators across tiles; for fp32 inputs the result tensor is the accumulator.
    gw_acc = weight.new_zeros(weight.shape, dtype=torch.float32) if need.weight else None
    gb_acc = weight.new_zeros((vocab,), dtype=torch.float32) if need.bias else None
    tiles = _tiles(labels, chunk_size, head.ignore_index)
    if tiles:
        buf = hidden.new_empty((min(chunk_size, n), vocab))
    for s, e in tiles:
        logits = _tile_logits(hidden, weight, bias, s, e, buf)
        g_ent = up.grad_entropy[s:e] if up.grad_entropy is not None else None
        ent = up.entropy[s:e] if up.grad_entropy is not None else None
        # grad of the tile's logits, in the logits' dtype (as eager autograd would give it)
        grad_logits = bwd(up.grad_logprobs[s:e], g_ent, logits, labels[s:e], up.row_stats[s:e], ent,
                          head.temperature, head.ignore_index)
        if need.hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[s:e])
        if need.weight:
            if fp32:
                gw_acc.addmm_(grad_logits.t(), hidden[s:e])
            else:  # low-precision GEMM (fp32 accumulation inside), summed across tiles in fp32
                gw_acc += torch.mm(grad_logits.t(), hidden[s:e])
        if need.bias:
            gb_acc += grad_logits.sum(0, dtype=torch.float32)
        del grad_logits
    grad_weight = gw_acc.to(weight.dtype) if need.weight else weight.new_empty((0,))
    grad_bias = gb_acc.to(bias.dtype) if need.bias else weight.new_empty((0,))
    return grad_hidden, grad_weight, grad_bias


# ---- the CPU backward ---------------------------------------------------------------------------


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
        cols = auto_cols(rows, vocab, dtype)
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


def _opt(t, a, b):
    return None if t is None else t[a:b]


def _bwd_2d(head: Head, up: Upstream, need: Wanted, rows_per_tile, cols_per_tile, cache, fwd_chunk):
    """The CPU backward: first the forward's last tile from its kept logits, then the other
    tokens tiled over tokens and vocabulary.

    1. Kept tile (rows s:e, the last non-skipped forward tile): the forward's logits buffer
       `cache` is turned in place into G = dL/dlogits (_grad_logits_; rows with an ignored label
       zeroed), then grad_hidden[s:e] = G @ W, grad_weight = G.T @ hidden[s:e] (this GEMM writes
       grad_weight: no zero fill), grad_bias = G.sum(0). No recompute of that tile. Without
       `cache` (not kept, or consumed by an earlier backward through a retained graph) the tile
       is recomputed with the forward's GEMM shape, so a second backward gives the same
       gradients bit for bit.
    2. The other tokens with a label: tiles spanning all of them (up to `rows_per_tile`) and a
       slice of the vocabulary keep every GEMM large: the recompute and grad_hidden GEMMs have
       K = H and K = cols, grad_weight[v0:v1] += G.T @ hidden has K = tokens and is read and
       written once per slice. The tiles live in the kept buffer (freed-and-retouched memory
       costs page faults; the buffer is hot), the elementwise step runs in place.
    Extra memory beyond the gradients: the kept buffer (one forward tile), whatever N.
    """
    hidden, weight, bias, labels, ignore_index = head.hidden, head.weight, head.bias, head.labels, head.ignore_index
    n, hsize = hidden.shape
    vocab = weight.shape[0]
    dtype = weight.dtype
    fp32 = dtype == torch.float32
    f32 = torch.float32
    inv_t = 1.0 / head.temperature
    with_ent = up.grad_entropy is not None
    gh = hidden.new_zeros((n, hsize), dtype=f32) if need.hidden else None  # fp32: the result itself
    gw = gb = None
    g_all = up.grad_logprobs.float()
    shift_all = up.row_stats.sum(1)  # max + lse
    ge_all = up.grad_entropy.float() if with_ent else None
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
        ent = up.entropy[s:e] if with_ent else None
        ignored = (~valid).nonzero().squeeze(1)
        # fp32: in place in the whole tile; low precision: fp32 row blocks of <= ~16 MiB, G rounded
        # to the dtype in place (as eager's grad_logits)
        step = e - s if fp32 else max(1, _BLOCK_BYTES // (4 * max(1, vocab)))
        for r0 in range(0, e - s, step):
            r1 = min(r0 + step, e - s)
            z = x[r0:r1] if fp32 else x[r0:r1].to(f32)
            _grad_logits_(z, lab[r0:r1], g[r0:r1], shift_all[s + r0:s + r1], _opt(ge, r0, r1), _opt(ent, r0, r1),
                          inv_t, 0)
            if not fp32:
                x[r0:r1].copy_(z)
        if ignored.numel():
            x.index_fill_(0, ignored, 0.0)
        if need.hidden:
            if fp32:
                torch.mm(x, weight, out=gh[s:e])
            else:
                gh[s:e] = x @ weight
        if need.weight:
            gw = torch.mm(x.t(), hidden[s:e]) if fp32 else (x.t() @ hidden[s:e]).float()
        if need.bias:
            gb = x.sum(0, dtype=f32)
    if need.weight and gw is None:
        gw = weight.new_zeros(weight.shape, dtype=f32)
    if need.bias and gb is None:
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
        ge, ent = (pick(ge_all), pick(up.entropy)) if with_ent else (None, None)
        gh_v = (gh[a:a + nv] if contiguous else hv.new_zeros((nv, hsize), dtype=f32)) if need.hidden else None
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
                _grad_logits_(z, lab[r0:r1], g[r0:r1], shift[r0:r1], _opt(ge, r0, r1), _opt(ent, r0, r1), inv_t, v0)
                grad = z if fp32 else x.copy_(z)  # low precision: G rounded to the dtype, as eager's
                if need.hidden:
                    gh_v[r0:r1].addmm_(grad, w_t) if fp32 else gh_v[r0:r1].add_(grad @ w_t)
                if need.weight:
                    gw[v0:v1].addmm_(grad.t(), h_t) if fp32 else gw[v0:v1].add_(grad.t() @ h_t)
                if need.bias:
                    gb[v0:v1] += z.sum(0)
        if need.hidden and not contiguous:
            gh.index_copy_(0, idx, gh_v)
    grad_hidden = (gh if fp32 else gh.to(dtype)) if need.hidden else hidden.new_empty((0,))
    grad_weight = (gw if fp32 else gw.to(dtype)) if need.weight else weight.new_empty((0,))
    grad_bias = gb.to(bias.dtype) if need.bias else weight.new_empty((0,))
    return grad_hidden, grad_weight, grad_bias
