"""linear_gather_logprobs: token log-probabilities (and entropy) straight from the hidden states
and the LM head, without ever holding the [tokens, V] logits.

This module validates the arguments, picks the tile sizes and the backend, and describes the op
pair fastalign_py::linear_gather_logprobs_{fwd,bwd} (LINEAR_GATHER_LOGPROBS: schemas, fakes,
autograd). The kernels are Python, in fastalign/kernels/linear_logprobs.py: a tiler that runs
hidden_tile @ weight.T per `chunk_size` token rows and then the backend's fused gather_logprobs
ops (fastalign/ops/logprobs.py) on the tile, and the cpp backend's own backward. Memory beyond
the inputs, outputs and gradients is two [chunk_size, V] tiles (logits and grad_logits) whatever
the number of tokens; cpp: one, the forward's last logits tile, kept for the backward, which
starts from it instead of recomputing it and then reuses the buffer for its [tokens, vocab-slice]
tiles. Tiles whose labels are all ignore_index (prompt tokens) are skipped in both passes. The
pair is one opaque op for torch.compile(fullgraph=True) and opcheck; the backend ("cpp", "cuda",
"triton") is an argument of the pair. The "torch" backend is kernels/reference.
linear_gather_logprobs (the eager math, checkpointed per tile).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastalign import _backends
from fastalign.kernels import reference
from fastalign.kernels.linear_logprobs import auto_chunk_size, auto_cols
from fastalign.ops import logprobs as _lp
from fastalign.ops._checks import check_flag, same_device
from fastalign.ops._fused import FusedOp

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUPPORTED = ("torch", "cpp", "cuda", "triton")


# ---- the op pair: fastalign_py::linear_gather_logprobs_{fwd,bwd} --------------------------------


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
    # The kept logits tile is held on ctx, not saved: the backward overwrites it (see _bwd_2d in
    # fastalign/kernels/linear_logprobs.py) and drops it here, so that a second backward through a
    # retained graph recomputes the tile instead of reading gradients (saved tensors would refuse the second backward). detach():
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


LINEAR_GATHER_LOGPROBS = FusedOp(
    name="linear_gather_logprobs",
    # hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 (valid). Returns fp32
    # (logprobs [N], entropy [N] or [0], row_stats [N, 2]) and, with keep_last, the forward's
    # last logits tile for the cpp backward ([min(chunk_size, N), V], else [0, V]).
    fwd_schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float temperature, int ignore_index, "
               "bool with_entropy, str backend, int chunk_size, int bwd_chunk_size, int vocab_chunk_size, "
               "bool keep_last) -> (Tensor, Tensor, Tensor, Tensor)",
    # (grad_hidden, grad_weight, grad_bias), each [0] when not needed. `cache` (the kept tile) is
    # overwritten: the cpp backward turns it into its gradient in place and reuses the buffer.
    bwd_schema="(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, "
               "Tensor labels, Tensor row_stats, Tensor? entropy, float temperature, int ignore_index, str backend, "
               "int chunk_size, bool need_hidden, bool need_weight, bool need_bias, int vocab_chunk_size, "
               "Tensor(a!)? cache, int fwd_chunk_size) -> (Tensor, Tensor, Tensor)",
    fake_fwd=_fake_fwd,
    fake_bwd=_fake_bwd,
    setup_context=_setup_context,
    backward=_backward,
    python="fastalign.kernels.linear_logprobs",
)
# One pair for every backend (the backend is an argument)
_fwd, _bwd = LINEAR_GATHER_LOGPROBS.kernels("cpp")


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
    (the cpp backend's backward tiles tokens x vocabulary, see `_bwd_2d` in
    fastalign/kernels/linear_logprobs.py). Each tile's
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
        bwd_cols = auto_cols(bwd_chunk, vocab, hidden.dtype)
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
