"""Triton gather_logprobs kernels beyond tests/test_logprobs.py: tile boundaries and the online
log-sum-exp across several tiles (small BLOCK_V through the module's launchers), masked
vocabularies, out-of-range labels, skipped rows, 16-bit inputs, strides and launch geometry.
On the CPU these run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small.

Bounds: outputs, row stats and gradients are compared with float64 values of the same inputs
within tests/test_logprobs.py's logprob_bounds (the worst-case error of a fp32 log-sum-exp over
the V logits in any summation order, with one rescale per BLOCK_V tile after the first, as this
kernel's online log-sum-exp does); 16-bit gradients add one rounding to their dtype. Recomputing
with the same inputs (with / without entropy, a strided copy) is deterministic and stays exact.
"""

import pytest
import torch

import fastalign
from fastalign import _backends
from tests.conftest import requires_nvidia_compiler, run_triton_compile_script
from tests.numerics import assert_within
from tests.test_logprobs import check_huge_rows, logprob_bounds, rescales

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_reason = _backends.unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(_reason is not None, reason=str(_reason))

if _reason is None:
    from fastalign.kernels.triton import _utils
    from fastalign.kernels.triton import logprobs as K


def _check(logits, labels, *, temperature=1.0, ignore_index=-100, block_v=None, entropy_grad=True):
    n = logits.shape[0]
    g = torch.randn(n, device=logits.device)
    gh = torch.randn(n, device=logits.device) * 3 if entropy_grad else None  # |g_H| > 1 often
    lp, ent, stats = K.forward(logits, labels, temperature, ignore_index, True, block_v=block_v)
    grad = K.backward(g, gh, logits, labels, stats, ent if entropy_grad else None, temperature, ignore_index,
                  block_v=block_v)  # fmt: skip
    # the interpreter's fp32 -> bf16 cast truncates (triton/runtime/interpreter.py, cast_impl ->
    # _convert_float without a rounding mode): up to 1 ulp, 2 u_bf16; compiled kernels round to nearest
    truncated = _utils.interpreting() and logits.dtype == torch.bfloat16
    ex = logprob_bounds(logits, labels, temperature, ignore_index, g, gh, grad_dtype=logits.dtype,
                        grad_truncated=truncated, rescales=rescales("triton", logits.shape[1], logits.dtype, block_v))
    assert_within(lp, ex.lp, ex.lp_err, "logprobs")
    assert_within(ent, ex.ent, ex.ent_err, "entropy")
    # (m, log s): rows with a NaN / inf logit store whatever their sweep left; their outputs are NaN
    finite, stats_cpu = ex.m.isfinite() & ex.log_s.isfinite(), stats.cpu()
    assert_within(stats_cpu[finite, 0], ex.m[finite], ex.m_err[finite], "row max")
    assert_within(stats_cpu[finite, 1], ex.log_s[finite], ex.log_s_err[finite], "row log-sum")
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert_within(grad, ex.grad, ex.grad_err, "grad")
    # without entropy: logprobs only, no entropy output
    lp2, ent2, _ = K.forward(logits, labels, temperature, ignore_index, False, block_v=block_v)
    assert ent2.numel() == 0
    torch.testing.assert_close(lp2, lp, rtol=0, atol=0, equal_nan=True)
    return lp, ent, grad


@pytest.mark.parametrize("vocab", [1, 2, 15, 16, 17, 31, 32, 33, 50])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_tile_boundaries(vocab, temperature):
    logits = torch.randn(5, vocab, device=DEVICE) * 4
    labels = torch.randint(0, vocab, (5,), device=DEVICE)
    labels[1] = -100
    labels[2] = vocab - 1  # the label in the last (partial) tile
    _check(logits, labels, temperature=temperature, block_v=16)
    _check(logits, labels, temperature=temperature, block_v=16, entropy_grad=False)


def test_online_rescaling_across_tiles():
    vocab = 40  # 5 tiles of 8
    base = torch.randn(8, vocab, device=DEVICE)
    base[0] = torch.linspace(-30, 30, vocab)  # max rises in every tile: rescale each time
    base[1] = torch.linspace(30, -30, vocab)  # max in the first tile, never rescaled
    base[2, :17] = float("-inf")  # leading all -inf tiles, then finite
    base[3, :-1] = float("-inf")  # only the last element is finite
    base[3, -1] = 2.0
    base[4, ::2] = float("-inf")  # masked every other entry
    base[5] += 1e4  # large offset
    base[6] *= 1e3  # nearly one-hot
    base[7, 30:] += 50.0  # a late jump of the max by exp(50)
    labels = torch.tensor([0, 39, 20, 39, 5, 7, 11, 33], device=DEVICE)
    lp, ent, grad = _check(base, labels, block_v=8)
    assert lp.isfinite().all() and ent.isfinite().all() and grad.isfinite().all()
    assert lp[3] == 0 and ent[3] == 0  # one finite entry: probability 1
    assert (grad[2, :17] == 0).all() and (grad[4, ::2] == 0).all()  # zero probability, zero gradient


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the interpreter: inf - inf, log 0
def test_nan_and_inf_in_later_tiles():
    vocab = 33
    logits = torch.randn(4, vocab, device=DEVICE)
    logits[0, 25] = float("nan")  # NaN in the 4th tile of 8
    logits[1, 30] = float("inf")  # +inf after the first tiles: undefined softmax, NaN
    logits[2, :] = float("-inf")  # all -inf: NaN like log_softmax
    labels = torch.tensor([3, 2, 4, 6], device=DEVICE)
    lp, ent, grad = _check(logits, labels, block_v=8)
    assert lp[:3].isnan().all() and ent[:3].isnan().all() and grad[:3].isnan().all()
    assert lp[3].isfinite() and grad[3].isfinite().all()


def test_masked_vocabulary_with_large_entropy_gradient():
    # Regression: clamping log 0 at -FLT_MAX overflows g_H * log p to -inf and 0 * -inf = NaN.
    logits = torch.randn(3, 70, device=DEVICE)
    logits[:, :20] = float("-inf")
    labels = torch.tensor([25, 40, 69], device=DEVICE)
    x = logits.clone().requires_grad_()
    lp, ent = fastalign.gather_logprobs(x, labels, return_entropy=True, backend="triton")
    (lp.sum() + 1e6 * ent.sum()).backward()
    assert x.grad.isfinite().all() and (x.grad[:, :20] == 0).all()


def test_out_of_range_labels_give_nan_without_reading_out_of_bounds():
    # The public op rejects these; the kernels themselves must still never read past the row.
    logits = torch.randn(5, 12, device=DEVICE)
    labels = torch.tensor([12, -1, 2**40, -100, 3], device=DEVICE)
    lp, ent, stats = fastalign.ops.logprobs._triton_ops()[0](logits, labels, 1.0, -100, True)
    assert lp[:3].isnan().all() and lp[3] == 0 and lp[4].isfinite()
    assert ent.isfinite().all()  # the entropy does not depend on the label
    # the backward: NaN rows for the bad labels (as the CUDA kernel), zeros for the ignored row;
    # it used to return a finite gradient without the one-hot term for them
    g = torch.ones(5, device=DEVICE)
    grad = fastalign.ops.logprobs._triton_ops()[1](g, None, logits, labels, stats, None, 1.0, -100)
    assert grad[:3].isnan().all() and (grad[3] == 0).all() and grad[4].isfinite().all()
    g[1] = 0.0  # no incoming gradient: zeros without reading, whatever the label
    grad = fastalign.ops.logprobs._triton_ops()[1](g, None, logits, labels, stats, None, 1.0, -100)
    assert (grad[1] == 0).all() and grad[0].isnan().all()


def test_rows_without_gradient_are_zero_and_skip_reading():
    logits = torch.randn(4, 30, device=DEVICE)
    logits[0, 3] = float("nan")  # rows 0 and 1 get no gradient: their logits are never read,
    logits[1, 4] = float("nan")  # so even NaN logits give an exact zero gradient
    labels = torch.tensor([1, -100, 2, 3], device=DEVICE)
    lp, ent, stats = K.forward(logits, labels, 1.0, -100, True, block_v=8)
    g = torch.tensor([0.0, 1.0, 1.0, 0.0], device=DEVICE)
    gh = torch.tensor([0.0, 1.0, 0.0, 2.0], device=DEVICE)
    grad = K.backward(g, gh, logits, labels, stats, ent, 1.0, -100, block_v=8)
    assert (grad[:2] == 0).all() and grad[2:].isfinite().all() and (grad[2:] != 0).any(-1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_logits(dtype):
    logits = (torch.randn(2, 3, 45, device=DEVICE) * 3).to(dtype)
    labels = torch.randint(0, 45, (2, 3), device=DEVICE)
    labels[0, 1] = -100
    flat, flat_labels = logits.reshape(-1, 45), labels.reshape(-1)
    for block_v in (16, None):
        _check(flat, flat_labels, temperature=0.8, block_v=block_v)
    # and through the public op and autograd
    x = logits.clone().requires_grad_()
    lp, ent = fastalign.gather_logprobs(x, labels, return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()
    assert lp.dtype == torch.float32 and x.grad.dtype == dtype


def test_strided_rows_and_non_unit_inner_stride():
    base = torch.randn(7, 100, device=DEVICE)
    rows = base[::2, 5:55]  # row stride 200, offset start
    labels = torch.randint(0, 50, (4,), device=DEVICE)
    before = base.clone()
    lp, ent, grad = _check(rows, labels, block_v=16)
    assert grad.is_contiguous() and torch.equal(base, before)
    cols = torch.randn(50, 4, device=DEVICE).t()  # inner stride 4: the op copies it
    out = K.forward(cols, labels, 1.0, -100, True)
    ref = K.forward(cols.contiguous(), labels, 1.0, -100, True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_op_argument_errors():
    fwd, bwd = fastalign.ops.logprobs._triton_ops()
    logits, labels = torch.randn(3, 8, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        fwd(logits[0], labels, 1.0, -100, False)
    with pytest.raises(TypeError, match="labels must be int64"):
        fwd(logits, labels.int(), 1.0, -100, False)
    with pytest.raises(ValueError, match="labels must be \\[N\\]"):
        fwd(logits, labels[:2], 1.0, -100, False)
    with pytest.raises(ValueError, match="vocabulary dim of logits is empty"):
        fwd(logits[:, :0], labels, 1.0, -100, False)
    lp, ent, stats = fwd(logits, labels, 1.0, -100, True)
    with pytest.raises(ValueError, match="row_stats"):
        bwd(lp, None, logits, labels, stats[:2], None, 1.0, -100)
    with pytest.raises(ValueError, match="grad_entropy needs entropy"):
        bwd(lp, lp, logits, labels, stats, None, 1.0, -100)
    empty = fwd(logits[:0], labels[:0], 1.0, -100, True)
    assert [tuple(t.shape) for t in empty] == [(0,), (0,), (0, 2)]


def test_launch_geometry():
    assert _utils.row_block(1, 4096) == 1 and _utils.row_block(5003, 4096) == 4096
    assert _utils.row_block(1000, 4096) == 1024 and _utils.row_block(152064, 8192) == 8192
    assert _utils.warps_for(1) == 1 and _utils.warps_for(4096) == 8 and _utils.warps_for(8192) == 16


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (6 GiB of bf16 logits)")
def test_offsets_beyond_2_pow_31_on_gpu():
    vocab = 2**30 + 3  # the last row's element offsets exceed 2^31
    logits = torch.zeros(3, vocab, dtype=torch.bfloat16, device="cuda")
    logits[2, vocab - 1] = 4.0
    labels = torch.tensor([0, -100, vocab - 1], device="cuda")
    lp = fastalign.gather_logprobs(logits, labels, backend="triton")
    logits.requires_grad_()
    fastalign.gather_logprobs(logits, labels, backend="triton")[2].backward()
    check_huge_rows(lp, logits.grad[2], vocab)


_COMPILE_SCRIPT = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from fastalign.kernels.triton import logprobs as K

for dtype in ("fp32", "bf16"):
    common = {"logits_ptr": f"*{dtype}", "row_stride": "i64", "labels_ptr": "*i64", "V": "i32",
              "inv_t": "fp32", "ignore_index": "i32", "WITH_ENTROPY": "constexpr", "BLOCK_V": "constexpr"}
    fwd_sig = {**common, "logprobs_ptr": "*fp32", "entropy_ptr": "*fp32", "stats_ptr": "*fp32"}
    bwd_sig = {**common, "grad_lp_ptr": "*fp32", "grad_ent_ptr": "*fp32", "stats_ptr": "*fp32",
               "entropy_ptr": "*fp32", "grad_ptr": f"*{dtype}"}
    for fn, sig in ((K._fwd_kernel, fwd_sig), (K._bwd_kernel, bwd_sig)):
        sig = {name: sig[name] for name in fn.arg_names}  # in the kernel's argument order
        for with_entropy in (False, True):
            src = ASTSource(fn, sig, constexprs={"WITH_ENTROPY": with_entropy, "BLOCK_V": 4096})
            assert compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["cubin"]
print("compiled")
"""


@requires_nvidia_compiler
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter does not exercise Triton's compiler (type rules for loop-carried values,
    # globals that must be constexpr, ...): compile both kernels to a cubin for sm_90, in a
    # process without TRITON_INTERPRET (under it, @triton.jit gives interpreted functions).
    run_triton_compile_script(_COMPILE_SCRIPT, timeout=300)
