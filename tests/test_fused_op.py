"""FusedOp (fastalign/ops/_fused.py): one description gives the custom ops, fakes, autograd and
the backend table; the C++ kernels meet the Python schemas in either load order."""

import subprocess
import sys
import textwrap

import pytest
import torch

from fastalign import _backends
from fastalign.ops._fused import FusedOp
from fastalign.ops.gae import GAE
from fastalign.ops.logprobs import GATHER_LOGPROBS
from fastalign.ops.policy_loss_fused import PG_POLICY_LOSS
from fastalign.ops.ppo import PPO_POLICY_LOSS, PPO_VALUE_LOSS
from fastalign.ops.preference import DPO_LOSS, DPO_TOKENS, SEQUENCE_LOGPS

DESCRIPTIONS = (GATHER_LOGPROBS, GAE, PPO_POLICY_LOSS, PPO_VALUE_LOSS, PG_POLICY_LOSS, SEQUENCE_LOGPS, DPO_LOSS, DPO_TOKENS)


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


# ---- a description written here: its Python implementation is this module's toy_square_* ------


def toy_square_fwd(x):
    return x * x


def toy_square_bwd(grad, x):
    return 2 * grad * x


SQUARE = FusedOp(
    name="toy_square",
    fwd_schema="(Tensor x) -> Tensor",
    bwd_schema="(Tensor grad, Tensor x) -> Tensor",
    fake_fwd=lambda x: torch.empty_like(x),
    fake_bwd=lambda grad, x: torch.empty_like(x),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]),
    backward=lambda ctx, bwd, grad: bwd(grad, *ctx.saved_tensors),
    python="tests.test_fused_op",
)


def test_a_description_is_all_an_op_needs():
    fwd, bwd = SQUARE.kernels("triton")
    assert SQUARE.kernels("cpp") == (fwd, bwd)  # a Python op: one pair for every backend
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = fwd(x)
    y.sum().backward()
    assert torch.equal(y, x.detach() ** 2) and torch.equal(x.grad, 2 * x.detach())
    torch.library.opcheck(fwd, (torch.randn(4, requires_grad=True),))
    compiled = torch.compile(lambda t: fwd(t).sum(), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x.detach()), (x.detach() ** 2).sum())


def test_description_pieces_go_together():
    with pytest.raises(ValueError, match="go together"):
        FusedOp(name="test_incomplete", fwd_schema="(Tensor x) -> Tensor", fake_fwd=lambda x: x,
                bwd_schema="(Tensor g, Tensor x) -> Tensor")


# ---- the backend table -------------------------------------------------------------------------


@pytest.mark.parametrize("op", DESCRIPTIONS, ids=lambda op: op.name)
def test_kernels_per_backend(op):
    has_bwd = op.bwd_schema is not None
    fwd, bwd = op.kernels("triton")
    assert fwd.name() == f"fastalign_triton::{op.name}_fwd"
    assert (bwd.name() == f"fastalign_triton::{op.name}_bwd") if has_bwd else bwd is None
    if _backends.extension() is None:
        assert op.kernels("cpp") is None and op.kernels("cuda") is None
    else:
        fwd, bwd = op.kernels("cpp")
        assert op.kernels("cuda") == (fwd, bwd)  # one pair, dispatched by device
        assert fwd.name() == f"fastalign::{op.name}_fwd"
    assert set(op.table()) <= {"cpp", "cuda", "triton"}
    with pytest.raises(ValueError, match="fused backends"):
        op.kernels("torch")


@pytest.mark.parametrize("op", DESCRIPTIONS, ids=lambda op: op.name)
def test_one_schema_for_both_namespaces(op):
    for suffix in ("fwd", "bwd") if op.bwd_schema is not None else ("fwd",):
        cpp = getattr(torch.ops.fastalign, f"{op.name}_{suffix}").default._schema
        tri = getattr(torch.ops.fastalign_triton, f"{op.name}_{suffix}").default._schema
        assert str(cpp).split("(", 1)[1] == str(tri).split("(", 1)[1]


# ---- load orders ---------------------------------------------------------------------------------


def test_import_fastalign_does_not_import_triton():
    assert _run("import sys, fastalign; print('triton' in sys.modules)").strip() == "False"


@pytest.mark.skipif(_backends.extension() is None, reason=str(_backends._C_ERROR))
def test_cpp_kernels_loaded_after_the_python_schemas():
    # fastalign imported without its extension (as a FASTALIGN_NO_EXTENSION=1 install): the
    # schemas exist, no cpp kernels; the extension loaded afterwards serves the same ops.
    out = _run("""
        import importlib, sys, torch
        sys.modules["fastalign._C"] = None  # the import fails: no extension
        import fastalign
        from fastalign.ops.logprobs import GATHER_LOGPROBS
        assert GATHER_LOGPROBS.kernels("cpp") is None and "triton" in GATHER_LOGPROBS.table()
        logits, labels = torch.randn(3, 7, requires_grad=True), torch.tensor([1, 6, 0])
        try:
            torch.ops.fastalign.gather_logprobs_fwd(logits, labels, 1.0, -100, False)
            raise AssertionError("ran without a kernel")
        except NotImplementedError:
            pass
        del sys.modules["fastalign._C"]
        importlib.import_module("fastalign._C")
        lp = torch.ops.fastalign.gather_logprobs_fwd(logits, labels, 1.0, -100, False)[0]
        lp.sum().backward()
        want = torch.log_softmax(logits.detach(), -1)[torch.arange(3), labels]
        torch.testing.assert_close(lp.detach(), want)
        assert logits.grad is not None
        print("ok")
    """)
    assert out.strip() == "ok"
