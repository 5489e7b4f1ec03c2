"""The one registration helper every fused kernel goes through.

A fused kernel is an op pair: `<name>_fwd` and `<name>_bwd`. The C++/CUDA pair is defined in
csrc/fastalign.cpp (namespace `fastalign`, dispatched by device); the Triton pair is defined
here from Python functions (namespace `fastalign_triton`). Both get the same fake (meta)
implementations and the same autograd formula from `register_fused`, so `torch.compile`,
`opcheck` and autograd treat every backend alike.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastalign import _backends


def cpp_op(name: str):
    """The overload torch.ops.fastalign.<name>.default if fastalign._C is loaded, else None."""
    if _backends.extension() is None:
        return None
    return getattr(torch.ops.fastalign, name).default


def triton_op(name: str, fn: Callable):
    """Wraps a Python (Triton-launching) function as the custom op fastalign_triton::<name>;
    the schema is inferred from fn's type hints."""
    return torch.library.custom_op(f"fastalign_triton::{name}", fn, mutates_args=())


def register_fused(
    fwd,
    bwd,
    *,
    fake_fwd: Callable,
    fake_bwd: Callable,
    setup_context: Callable,
    backward: Callable,
) -> None:
    """Registers fake implementations for `fwd` and `bwd` and autograd for `fwd`.

    `backward(ctx, bwd, *grads)` receives the bwd op to call, so one formula serves all backends.
    """
    if fwd is None:
        return
    torch.library.register_fake(fwd)(fake_fwd)
    torch.library.register_fake(bwd)(fake_bwd)
    torch.library.register_autograd(
        fwd, lambda ctx, *grads: backward(ctx, bwd, *grads), setup_context=setup_context
    )
