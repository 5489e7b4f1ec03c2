"""FusedOp: the one description of a fused op, from which its custom ops, fakes, autograd and
backend table are all derived.

A fused op is a pair `<name>_fwd` / `<name>_bwd` (a forward-only op, e.g. gae, has no bwd). One
FusedOp(...) description, written next to the op's public function, defines at construction:

  fastalign::<name>_fwd/_bwd         the schema (here, once); the kernels are the C++/CUDA
                                     extension's (csrc/cpu, csrc/cuda: TORCH_LIBRARY_IMPL), loaded
                                     before or after this definition, or absent
  fastalign_triton::<name>_fwd/_bwd  the same schema; the CPU and CUDA kernels are the functions
                                     <name>_fwd/_bwd of the module `triton`, imported at the first
                                     call (Triton is never imported at `import fastalign`)
  fastalign_py::<name>_fwd/_bwd      instead of both, with `python` set: one pair implemented in
                                     Python for every device (e.g. a tiler over other fused ops)

and registers on each pair the same fake (meta) implementations and the same autograd formula,
so torch.compile, opcheck and autograd treat every backend alike. `op.kernels(backend)` answers
the (fwd, bwd) pair a backend runs. Adding a fused op means writing its description (schemas,
fakes, setup_context and backward math) and its kernels, never registration code; see docs/ops.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastalign import _backends

# The fastalign namespace's schemas are defined here; the extension only registers kernels for
# them (TORCH_LIBRARY_IMPL), which the dispatcher accepts before or after the definition.
# FRAGMENT: the namespace may also be opened elsewhere. Kept alive for the process (a Library
# drops its registrations when collected).
_CPP_LIBRARY = torch.library.Library("fastalign", "FRAGMENT")
FUSED_BACKENDS = ("cpp", "cuda", "triton")


def _lazy(module: str, attr: str) -> Callable:
    """A function that imports `module` at its first call and runs module.attr."""

    def run(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    run.__name__ = attr
    return run


def _mutated_args(schema: str) -> tuple:
    """Names of the arguments a schema marks as written, e.g. `Tensor(a!)? cache` -> ("cache",)."""
    args = schema[schema.index("(") + 1: schema.index("->")].rsplit(")", 1)[0]
    return tuple(a.split()[-1] for a in args.split(",") if "!" in a)


@dataclass(frozen=True)
class FusedOp:
    """The description of one fused op; constructing it registers everything (see the module).

    name: the op pair is <name>_fwd / <name>_bwd.
    fwd_schema, bwd_schema: the argument and return part of each schema, "(Tensor x, ...) -> Tensor"
        (bwd_schema None: a forward-only op, without autograd).
    fake_fwd, fake_bwd: shapes, dtypes and devices of the outputs from the inputs (meta tensors).
    setup_context(ctx, inputs, output): saves what the backward needs.
    backward(ctx, bwd, *grads) -> a gradient (or None) per fwd input; `bwd` is the backend's own
        bwd op, so one formula serves every backend.
    triton: module path of the Triton launchers <name>_fwd / <name>_bwd, or None.
    python: module path of a Python implementation <name>_fwd / <name>_bwd for every device (then
        the pair is fastalign_py::<name>_*, and no C++ or Triton kernels are looked for).
    """

    name: str
    fwd_schema: str
    fake_fwd: Callable
    bwd_schema: Optional[str] = None
    fake_bwd: Optional[Callable] = None
    setup_context: Optional[Callable] = None
    backward: Optional[Callable] = None
    triton: Optional[str] = None
    python: Optional[str] = None

    def __post_init__(self):
        if (self.bwd_schema is None) != (self.fake_bwd is None) or (self.bwd_schema is None) != (self.backward is None):
            raise ValueError(f"FusedOp {self.name}: bwd_schema, fake_bwd and backward go together")
        if self.python is not None:
            self._register(self._define_python("fastalign_py", self.python))
            return
        self._register(self._define_cpp())
        if self.triton is not None:
            self._register(self._define_python("fastalign_triton", self.triton, ("cpu", "cuda")))

    # ---- registration (once per namespace) ----------------------------------------------------

    def _schemas(self):
        return [(f"{self.name}_fwd", self.fwd_schema)] + (
            [(f"{self.name}_bwd", self.bwd_schema)] if self.bwd_schema is not None else [])

    def _define_cpp(self):
        for op_name, schema in self._schemas():
            _CPP_LIBRARY.define(op_name + schema)
        return tuple(getattr(torch.ops.fastalign, op_name).default for op_name, _ in self._schemas())

    def _define_python(self, namespace: str, module: str, device_types=None):
        # custom_op (not Library.impl): it supports autograd of ops that write an argument
        return tuple(
            torch.library.custom_op(f"{namespace}::{op_name}", _lazy(module, op_name), schema=schema,
                                    mutates_args=_mutated_args(schema), device_types=device_types)
            for op_name, schema in self._schemas())

    def _register(self, ops) -> None:
        torch.library.register_fake(ops[0])(self.fake_fwd)
        if self.bwd_schema is None:
            return
        fwd, bwd = ops
        backward = self.backward
        torch.library.register_fake(bwd)(self.fake_bwd)
        torch.library.register_autograd(
            fwd, lambda ctx, *grads: backward(ctx, bwd, *grads), setup_context=self.setup_context)

    # ---- the backend table --------------------------------------------------------------------

    def kernels(self, backend: str):
        """(fwd, bwd) ops that `backend` runs ("cpp", "cuda" or "triton"; bwd None for a forward-
        only op), or None where this process has none: cpp/cuda without the extension, triton
        without a Triton module. Whether the backend can serve a device is _backends.resolve's
        question. An op with `python` has one pair for every backend (its backend is an argument)."""
        if backend not in FUSED_BACKENDS:
            raise ValueError(f"{self.name}: fused backends are {FUSED_BACKENDS}, got {backend!r}")
        if self.python is not None:
            ns = torch.ops.fastalign_py
        elif backend == "triton":
            if self.triton is None:
                return None
            ns = torch.ops.fastalign_triton
        elif _backends.extension() is None:
            return None
        else:
            ns = torch.ops.fastalign  # one op pair for cpp and cuda, dispatched by device
        fwd = getattr(ns, f"{self.name}_fwd").default
        return fwd, getattr(ns, f"{self.name}_bwd").default if self.bwd_schema is not None else None

    def table(self) -> dict:
        """{backend: (fwd, bwd)} for the fused backends this process has kernels for."""
        return {b: k for b in FUSED_BACKENDS if (k := self.kernels(b)) is not None}
