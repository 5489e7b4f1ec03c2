"""gather_logprobs: fp32 token log-probabilities (and entropy) from logits, fused.

Backends: torch (eager reference), cpp and cuda (fastalign._C: fastalign::gather_logprobs_{fwd,bwd}),
triton (fastalign_triton::gather_logprobs_{fwd,bwd}), all derived from the one description
GATHER_LOGPROBS below (fastalign/ops/_fused.py). Every fused forward returns, per row,
(logprobs [N], entropy [N] or [0], row_stats [N, 2] = (max z, log sum exp(z - max)) for z =
logits / T); the backward recomputes softmax from row_stats, so nothing of size tokens x vocabulary
is saved besides the caller's own logits.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastalign import _backends
from fastalign.kernels import reference
from fastalign.ops._checks import FP32_MAX, FP32_TINY, check_flag, same_device
from fastalign.ops._fused import FusedOp

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LABEL_DTYPES = (torch.int32, torch.int64)


# ---- autograd and fake implementations, shared by every fused backend -------------------------


def _fake_fwd(logits, labels, temperature, ignore_index, with_entropy):
    same_device("gather_logprobs_fwd", logits=logits, labels=labels)
    n = logits.shape[0]
    out = logits.new_empty((n,), dtype=torch.float32)
    ent = logits.new_empty((n if with_entropy else 0,), dtype=torch.float32)
    return out, ent, logits.new_empty((n, 2), dtype=torch.float32)


def _fake_bwd(grad_logprobs, grad_entropy, logits, labels, row_stats, entropy, temperature, ignore_index):
    same_device("gather_logprobs_bwd", logits=logits, grad_logprobs=grad_logprobs, grad_entropy=grad_entropy,
                labels=labels, row_stats=row_stats, entropy=entropy)
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy = inputs
    logprobs, entropy, row_stats = output
    ctx.save_for_backward(logits, labels, row_stats, entropy)
    ctx.temperature, ctx.ignore_index, ctx.with_entropy = temperature, ignore_index, with_entropy


def _backward(ctx, bwd, grad_logprobs, grad_entropy, _grad_row_stats):
    logits, labels, row_stats, entropy = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = row_stats.new_zeros(row_stats.shape[0])
    if not ctx.with_entropy:
        grad_entropy = None
    grad = bwd(
        grad_logprobs, grad_entropy, logits, labels, row_stats, entropy if grad_entropy is not None else None,
        ctx.temperature, ctx.ignore_index,
    )
    return grad, None, None, None, None


GATHER_LOGPROBS = FusedOp(
    name="gather_logprobs",
    # logits [N, V] (row stride free, unit inner stride), labels [N] int64. Returns fp32 (logprobs
    # [N], entropy [N] or [0] when with_entropy is false, row_stats [N, 2]). row_stats = (m, log
    # sum_j exp(z_j - m)) with z = logits / T and m = max_j z_j, so that the backward recomputes
    # log p_j = (z_j - m) - row_stats[1] without the rounding of m + log s.
    fwd_schema="(Tensor logits, Tensor labels, float temperature, int ignore_index, bool with_entropy) "
               "-> (Tensor, Tensor, Tensor)",
    # The gradient w.r.t. logits [N, V] in the logits' dtype; grad_entropy and entropy are absent
    # when the entropy output received no gradient.
    bwd_schema="(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, Tensor row_stats, "
               "Tensor? entropy, float temperature, int ignore_index) -> Tensor",
    fake_fwd=_fake_fwd,
    fake_bwd=_fake_bwd,
    setup_context=_setup_context,
    backward=_backward,
    triton="fastalign.kernels.triton.logprobs",
)
_FUSED = GATHER_LOGPROBS.table()  # backend -> (fwd, bwd): the tests run the raw ops from it


def _triton_ops():
    return GATHER_LOGPROBS.kernels("triton")


# ---- validation -------------------------------------------------------------------------------


def _check_inputs(logits, labels, temperature, ignore_index, op="gather_logprobs"):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a tensor, got {type(logits).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a tensor, got {type(labels).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"{op}: labels must be int32 or int64, got {labels.dtype}")
    if logits.dim() < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{op}: labels must have the shape of logits without its last (vocabulary) dim: "
            f"logits {tuple(logits.shape)} needs labels {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels are on {labels.device} but logits on {logits.device}")
    # bool is an int subclass: temperature=True would silently mean 1.0. The kernels run with
    # 1/T in fp32, so a T whose reciprocal overflows fp32 would turn every logprob into NaN, and
    # one whose reciprocal rounds to 0 (T > ~8.5e37) too on Triton (its padding lanes, -inf, times 0).
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)  # numpy scalars too, as gae/ppo accept
        or not (temperature > 0 and math.isfinite(temperature) and FP32_TINY <= 1.0 / temperature <= FP32_MAX)
    ):
        raise ValueError(
            f"{op}: temperature must be a finite number > 0 (with 1/temperature a finite, nonzero fp32 number), "
            f"got {temperature!r}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"{op}: ignore_index must fit in int64, got {ignore_index}")
    if labels.numel() > 0 and logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits have an empty vocabulary (last) dim")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int, op: str = "gather_logprobs") -> None:
    """Raises IndexError naming the first label outside [0, vocab) that is not ignore_index.
    Synchronises with the device; skipped while torch.compile traces (then the C++ CPU kernel
    raises its own IndexError, the CUDA and Triton kernels give NaN for such a row)."""
    # meta tensors have no values to check (and .item() on them raises an internal error)
    if labels.numel() == 0 or labels.device.type == "meta" or torch.compiler.is_compiling():
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise IndexError(
            f"{op}: labels{list(idx)} = {int(labels[idx])} is outside [0, {vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )


# ---- public op --------------------------------------------------------------------------------


def gather_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """fp32 `log_softmax(logits / temperature)[labels]`, shape of labels, without materialising
    the [tokens, V] log-softmax; with `return_entropy=True` returns `(logprobs, entropy)`.

    logits `[..., V]` fp32/bf16/fp16; labels `[...]` int32/int64. Positions whose label is
    `ignore_index` give 0 and receive no gradient. Gradients flow to logits (in their dtype) from
    both outputs. Inputs are never modified.
    """
    _check_inputs(logits, labels, temperature, ignore_index)
    return_entropy = check_flag("gather_logprobs", "return_entropy", return_entropy)
    temperature, ignore_index = float(temperature), int(ignore_index)
    name = _backends.resolve(backend, logits.device, op="gather_logprobs")
    # Compare labels with ignore_index in int64 on every backend: an int32 comparison would wrap
    # an ignore_index outside int32 (2**40 == 0 in int32) and silently ignore real labels.
    labels64 = labels.to(torch.int64)
    # One check for every backend, on the caller's shape, so the error names the same index
    # everywhere (the C++ kernels' own check would name the flattened row); O(tokens), not O(tokens x V).
    check_label_range(labels64, logits.shape[-1], ignore_index)
    if name == "torch":
        return reference.gather_logprobs(logits, labels64, temperature, ignore_index, return_entropy)

    fwd, _ = GATHER_LOGPROBS.kernels(name)
    vocab = logits.shape[-1]
    rows = logits.reshape(labels.numel(), vocab)  # not (-1, vocab): ambiguous when both are 0
    if rows.stride(-1) != 1 and vocab > 1:
        rows = rows.contiguous()
    flat_labels = labels64.reshape(-1)
    logprobs, entropy, _ = fwd(rows, flat_labels, float(temperature), int(ignore_index), bool(return_entropy))
    logprobs = logprobs.view(labels.shape)
    return (logprobs, entropy.view(labels.shape)) if return_entropy else logprobs
