"""gather_logprobs on every backend against kernels/reference.py, forward and backward."""

import math
import subprocess
import sys

import pytest
import torch

import fastalign
from fastalign.kernels import reference
from tests.conftest import TOL, backend_params

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _skip_slow_combo(backend, device, dtype):
    # The Triton interpreter is numpy-based and slow: fp32 and small shapes only on the CPU.
    if _interpreted(backend, device) and dtype != torch.float32:
        pytest.skip("Triton interpreter on the CPU: fp32 only")


def _compare(backend, device, logits, labels, *, temperature=1.0, ignore_index=-100, entropy=True, dtype=None):
    """Forward and backward of `backend` vs the fp32 reference on the same inputs."""
    dtype = dtype or logits.dtype
    x = logits.detach().clone().requires_grad_()
    xr = logits.detach().clone().requires_grad_()
    out = fastalign.gather_logprobs(
        x, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=entropy, backend=backend
    )
    ref = reference.gather_logprobs(xr, labels, temperature, ignore_index, entropy)
    out, ref = (out, ref) if entropy else ((out,), (ref,))
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and o.shape == labels.shape
        torch.testing.assert_close(o, r, **TOL[torch.float32], equal_nan=True)
    weights = [torch.randn(labels.shape, device=device) for _ in out]
    sum(((o * w).sum() for o, w in zip(out, weights))).backward()
    sum(((r * w).sum() for r, w in zip(ref, weights))).backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    torch.testing.assert_close(x.grad.float(), xr.grad.float(), **TOL[dtype], equal_nan=True)
    return out


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,vocab",
    [((1,), 1), ((1,), 7), ((5,), 1000), ((2, 3), 2049), ((3, 1), 5003), ((17,), 128), ((2, 9), 4096 + 37)],
)
def test_matches_reference(backend, device, dtype, shape, vocab):
    _skip_slow_combo(backend, device, dtype)
    logits = (torch.randn(*shape, vocab, device=device) * 3).to(dtype)
    labels = torch.randint(0, vocab, shape, device=device)
    labels.view(-1)[0] = -100  # always at least one ignored position
    _compare(backend, device, logits, labels)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("temperature", [0.3, 1.7])
@pytest.mark.parametrize("entropy", [False, True])
def test_temperature_and_int32_labels(backend, device, temperature, entropy):
    logits = torch.randn(4, 6, 777, device=device) * 5
    labels = torch.randint(0, 777, (4, 6), device=device, dtype=torch.int32)
    _compare(backend, device, logits, labels, temperature=temperature, entropy=entropy)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_custom_ignore_index_and_all_ignored_rows(backend, device):
    logits = torch.randn(3, 8, 300, device=device)
    labels = torch.randint(0, 300, (3, 8), device=device)
    labels[1] = 7  # a whole sequence ignored, with a label that is in range
    out = _compare(backend, device, logits, labels, ignore_index=7)
    assert (out[0][1] == 0).all() and (out[1][1] == 0).all()

    x = logits.clone().requires_grad_()
    all_ignored = torch.full((3, 8), -100, device=device)
    lp, ent = fastalign.gather_logprobs(x, all_ignored, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all() and (x.grad == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    base = torch.randn(6, 5, 1100, device=device)
    logits = base.transpose(0, 1)[:, :, 3:1003]  # strided rows, offset columns
    labels = torch.randint(0, 1000, (6, 5), device=device).t()
    assert not logits.is_contiguous() and not labels.is_contiguous()
    before = base.clone()
    _compare(backend, device, logits, labels)
    assert torch.equal(base, before)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_inputs_are_never_modified(backend, device):
    logits = torch.randn(4, 513, device=device, requires_grad=True)
    labels = torch.randint(0, 513, (4,), device=device)
    snapshot, label_snapshot = logits.detach().clone(), labels.clone()
    lp, ent = fastalign.gather_logprobs(logits, labels, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(logits.detach(), snapshot) and torch.equal(labels, label_snapshot)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_and_inf_propagation(backend, device):
    vocab = 600
    logits = torch.randn(4, vocab, device=device)
    logits[0, 17] = float("nan")  # a NaN poisons its row only
    logits[1, :500] = float("-inf")  # a masked vocabulary: still finite for labels kept
    logits[2, 3] = float("inf")  # +inf: undefined softmax, NaN like the reference
    labels = torch.tensor([5, 550, 9, 11], device=device)
    lp, ent = _compare(backend, device, logits, labels)
    assert lp[0].isnan() and ent[0].isnan()
    assert lp[1].isfinite() and ent[1].isfinite() and ent[1] > 0
    assert lp[2].isnan()
    assert lp[3].isfinite() and ent[3].isfinite()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masked_vocabulary_with_large_entropy_gradient(backend, device):
    # p = 0 entries (logit -inf) must get exactly 0 gradient even when |dL/dH| > 1: a clamp of
    # log p at -FLT_MAX would overflow g_H * (log p + H) to inf and give 0 * inf = NaN.
    logits = torch.randn(3, 300, device=device) * 2
    logits[:, :120] = float("-inf")
    labels = torch.tensor([130, 299, 200], device=device)
    x = logits.clone().requires_grad_()
    lp, ent = fastalign.gather_logprobs(x, labels, return_entropy=True, backend=backend)
    (lp.sum() + 37.0 * ent.sum()).backward()
    assert ent.isfinite().all() and x.grad.isfinite().all()
    assert (x.grad[:, :120] == 0).all()
    xr = logits.clone().requires_grad_()
    rlp, rent = reference.gather_logprobs(xr, labels, 1.0, -100, True)
    (rlp.sum() + 37.0 * rent.sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_extreme_logits_are_stable(backend, device):
    logits = torch.randn(3, 257, device=device)
    logits[0] *= 1e4  # one-hot-like distribution
    logits[1] += 1e4  # large offset: needs the running max
    logits[2] -= 1e4
    labels = torch.tensor([1, 2, 3], device=device)
    lp, ent = _compare(backend, device, logits, labels)
    assert lp.isfinite().all() and ent.isfinite().all() and (lp <= 0).all() and (ent >= -1e-6).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_inputs_give_empty_outputs(backend, device):
    for shape in [(0,), (2, 0)]:
        logits = torch.randn(*shape, 11, device=device, requires_grad=True)
        labels = torch.zeros(shape, dtype=torch.long, device=device)
        lp, ent = fastalign.gather_logprobs(logits, labels, return_entropy=True, backend=backend)
        assert lp.shape == shape and ent.shape == shape and lp.dtype == torch.float32
        (lp.sum() + ent.sum()).backward()
        assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend, device):
    logits = torch.randn(2, 3, 10, device=device)
    labels = torch.randint(0, 10, (2, 3), device=device)
    gl = fastalign.gather_logprobs
    with pytest.raises(IndexError, match=r"labels.*10.*outside \[0, 10\)"):
        gl(logits, torch.full((2, 3), 10, device=device), backend=backend)
    with pytest.raises(IndexError, match="labels"):
        gl(logits, torch.full((2, 3), -1, device=device), backend=backend)
    with pytest.raises(ValueError, match="labels must have the shape"):
        gl(logits, labels[:, :2], backend=backend)
    with pytest.raises(TypeError, match="logits must be float32"):
        gl(logits.long(), labels, backend=backend)
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        gl(logits, labels.float(), backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        gl(logits, labels, temperature=0.0, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        gl(logits, labels, temperature=float("nan"), backend=backend)
    with pytest.raises(ValueError, match="empty vocabulary"):
        gl(torch.randn(2, 0, device=device), torch.zeros(2, dtype=torch.long, device=device), backend=backend)


def test_device_mismatch_and_unknown_backend():
    logits, labels = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastalign.gather_logprobs(logits, labels, backend="jax")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="labels are on"):
            fastalign.gather_logprobs(logits, labels.cuda())
    meta_labels = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="labels are on"):
        fastalign.gather_logprobs(logits, meta_labels)


def test_unusable_backend_says_why(monkeypatch):
    reason = fastalign.backends()["cuda"]["reason"]
    if fastalign.backends()["cuda"]["usable"]:
        pytest.skip("cuda backend is usable here")
    assert reason
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run cpu tensors"):
        fastalign.gather_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="cuda")


def test_bad_environment_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTALIGN_BACKEND must be one of"):
        fastalign.gather_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "torch")
    from fastalign import _backends

    assert _backends.resolve("auto", torch.device("cpu")) == "torch"
    # an explicit backend argument still wins over the environment
    assert _backends.resolve("torch", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTALIGN_BACKEND", "cuda")
    if _backends.unavailable_reason("cuda", "cpu"):
        with pytest.raises(RuntimeError, match="cannot run cpu tensors"):
            _backends.resolve("auto", torch.device("cpu"))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "torch-cpu"])
def test_opcheck(backend, device):
    from fastalign.ops import logprobs as L

    fwd, bwd = L._triton_ops() if backend == "triton" else L._FUSED[backend]
    logits = torch.randn(5, 67, device=device, requires_grad=True)
    labels = torch.randint(0, 67, (5,), device=device)
    labels[2] = -100
    for with_entropy in (False, True):
        torch.library.opcheck(fwd, (logits, labels, 1.3, -100, with_entropy))
    lp, ent, row_stats = fwd(logits.detach(), labels, 1.3, -100, True)
    assert row_stats.shape == (5, 2)
    g = torch.randn(5, device=device)
    torch.library.opcheck(bwd, (g, g, logits.detach(), labels, row_stats, ent, 1.3, -100))
    torch.library.opcheck(bwd, (g, None, logits.detach(), labels, row_stats, None, 1.3, -100))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    def head(logits, labels):
        lp, ent = fastalign.gather_logprobs(logits, labels, temperature=0.9, return_entropy=True, backend=backend)
        return (lp * 2).sum() + ent.mean()

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    logits = torch.randn(3, 4, 129, device=device, requires_grad=True)
    labels = torch.randint(0, 129, (3, 4), device=device)
    loss = compiled(logits, labels)
    loss.backward()
    x = logits.detach().clone().requires_grad_()
    ref = head(x, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits.grad, x.grad)


def test_import_does_not_initialise_cuda():
    code = "import torch, fastalign; fastalign.backends(); assert not torch.cuda.is_initialized(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id in ("cpp-cpu", "cuda-cuda")])
def test_offsets_beyond_2_pow_31(backend, device):
    # 3 rows x (2^30 + 3) bf16: element offsets of the last row exceed 2^31. Expected values are
    # analytic (mostly-zero rows), so no fp32 [rows, V] reference is needed.
    vocab = 2**30 + 3
    logits = torch.zeros(3, vocab, dtype=torch.bfloat16, device=device)
    logits[2, vocab - 1] = 4.0
    labels = torch.tensor([0, -100, vocab - 1], device=device)
    lse_other = math.log(vocab - 1 + math.exp(4.0))
    lp = fastalign.gather_logprobs(logits, labels, backend=backend)
    torch.testing.assert_close(lp.cpu(), torch.tensor([-math.log(vocab), 0.0, 4.0 - lse_other]), rtol=1e-5, atol=1e-5)
    logits.requires_grad_()
    fastalign.gather_logprobs(logits, labels, backend=backend)[2].backward()
    grad = logits.grad[2]
    assert abs(float(grad[vocab - 1]) - (1 - math.exp(4.0 - lse_other))) < 1e-2
    assert abs(float(grad[5]) + math.exp(-lse_other)) < 1e-9 + 1e-2 * math.exp(-lse_other)


_CAPABILITY_CHECK = """
import torch, fastalign
from fastalign._backends import extension
from fastalign.kernels import reference
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = (torch.randn(7, 2 * 2048 + 45) * 4).to(dtype).requires_grad_()
    y = torch.randint(0, x.shape[-1], (7,)); y[1] = -100
    lp, ent = fastalign.gather_logprobs(x, y, temperature=0.8, return_entropy=True, backend="cpp")
    (lp.sum() + 2 * ent.sum()).backward()
    xr = x.detach().clone().requires_grad_()
    rlp, rent = reference.gather_logprobs(xr, y, 0.8, -100, True)
    (rlp.sum() + 2 * rent.sum()).backward()
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, rent, rtol=1e-5, atol=1e-5)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-9}[dtype]
    torch.testing.assert_close(x.grad.float(), xr.grad.float(), rtol=tol, atol=1e-5)
print(extension().cpu_capability())
"""


@pytest.mark.skipif(fastalign.backends()["cpp"]["usable"] is False, reason="fastalign._C not built")
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_cpu_kernel_table_matches_reference(capability):
    # The C++ kernels are compiled once per ISA and chosen at run time; a wheel may land on a CPU
    # that gets any of them, so each table is checked here, not just the widest.
    import os

    env = dict(os.environ, FASTALIGN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", _CAPABILITY_CHECK], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0 and "this CPU lacks" in out.stderr:
        pytest.skip(f"this CPU cannot run the {capability} kernels")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == capability.upper()


# ---- review regressions ------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_python_bools_and_out_of_range_scalars_are_rejected(backend, device):
    # bool is an int subclass: temperature=True / ignore_index=True used to be taken as 1
    logits = torch.randn(3, 5, device=device)
    labels = torch.tensor([0, 1, 2], device=device)
    gl = fastalign.gather_logprobs
    with pytest.raises(ValueError, match="temperature"):
        gl(logits, labels, temperature=True, backend=backend)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        gl(logits, labels, ignore_index=True, backend=backend)
    # used to be an OverflowError (torch, triton) or a cryptic schema error (cpp)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        gl(logits, labels, ignore_index=2**70, backend=backend)
    # 1/T overflows fp32: every logprob used to come out NaN without an error
    with pytest.raises(ValueError, match="temperature"):
        gl(logits, labels, temperature=1e-45, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_int32_labels_with_ignore_index_beyond_int32(backend, device):
    # the torch backend compared int32 labels with ignore_index in int32: 2**40 wrapped to 0,
    # so every label 0 was silently ignored (logprob 0)
    logits = torch.randn(3, 5, device=device)
    labels = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    out = fastalign.gather_logprobs(logits, labels, ignore_index=2**40, backend=backend)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels.long()[:, None])[:, 0]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_rows_with_empty_vocabulary(backend, device):
    # no tokens and no vocabulary: the fused backends used to fail in reshape(-1, 0)
    for shape in [(0, 0), (2, 0, 0)]:
        logits = torch.randn(*shape, device=device)
        labels = torch.zeros(shape[:-1], dtype=torch.long, device=device)
        lp, ent = fastalign.gather_logprobs(logits, labels, return_entropy=True, backend=backend)
        assert lp.shape == ent.shape == labels.shape and lp.dtype == ent.dtype == torch.float32


@pytest.mark.skipif(fastalign.backends()["cpp"]["usable"] is False, reason="fastalign._C not built")
def test_raw_cpu_backward_op_rejects_bad_arguments():
    # The raw C++ backward used to trust its arguments: a label >= V wrote out of bounds
    # (segfault), short labels/grad/grad_entropy were read out of bounds, temperature <= 0 gave NaN.
    bwd, fwd = torch.ops.fastalign.gather_logprobs_bwd, torch.ops.fastalign.gather_logprobs_fwd
    logits, labels, stats = torch.randn(4, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2)
    g = torch.ones(4)
    with pytest.raises(IndexError, match=r"labels\[0\] = 1000000000 is outside \[0, 8\)"):
        bwd(g, None, logits, torch.full((4,), 10**9), stats, None, 1.0, -100)
    with pytest.raises(RuntimeError, match=r"labels must be \[N\]"):
        bwd(g, None, logits, labels[:1], stats, None, 1.0, -100)
    with pytest.raises(RuntimeError, match="grad_logprobs must have N = 4"):
        bwd(g[:1], None, logits, labels, stats, None, 1.0, -100)
    with pytest.raises(RuntimeError, match="grad_entropy must have N = 4"):
        bwd(g, g[:1], logits, labels, stats, torch.zeros(4), 1.0, -100)
    with pytest.raises(RuntimeError, match="entropy must have N = 4"):
        bwd(g, g, logits, labels, stats, torch.zeros(1), 1.0, -100)
    with pytest.raises(RuntimeError, match="grad_entropy given without entropy"):
        bwd(g, g, logits, labels, stats, None, 1.0, -100)
    with pytest.raises(RuntimeError, match="row_stats must be fp32"):
        bwd(g, None, logits, labels, stats[:2], None, 1.0, -100)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        bwd(g, None, logits.int(), labels, stats, None, 1.0, -100)
    for t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match="temperature"):
            fwd(logits, labels, t, -100, False)
        with pytest.raises(RuntimeError, match="temperature"):
            bwd(g, None, logits, labels, stats, None, t, -100)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_numpy_scalars_are_accepted_like_python_numbers(backend, device):
    # np.float32 temperatures / np.int64 ignore_index (e.g. from a config or an array) used to be
    # rejected, while gae and the PPO losses accept any real number
    np = pytest.importorskip("numpy")
    logits = torch.randn(3, 5, device=device)
    labels = torch.tensor([0, 7, 2], device=device)
    got = fastalign.gather_logprobs(logits, labels, temperature=np.float32(0.5), ignore_index=np.int64(7),
                                    backend=backend)
    want = fastalign.gather_logprobs(logits, labels, temperature=0.5, ignore_index=7, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_label_error_names_the_same_index_on_every_backend(backend, device):
    # cpp named the flattened row (labels[4]), triton/cuda too, torch the caller's index (labels[1, 1])
    logits = torch.randn(2, 3, 7, device=device)
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    labels[1, 1] = 9
    with pytest.raises(IndexError, match=r"labels\[1, 1\] = 9 is outside \[0, 7\)"):
        fastalign.gather_logprobs(logits, labels, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_expanded_stride_zero_inputs(backend, device):
    # rows that alias one another (stride 0, e.g. one prompt's logits broadcast over samples):
    # the fused kernels read them in place and autograd sums the row gradients into the base
    base = torch.randn(1, 3, 37, device=device)
    labels = torch.tensor([[1, 36, -100]], device=device).expand(4, 3)
    x, xr = (base.clone().requires_grad_() for _ in range(2))
    lp, ent = fastalign.gather_logprobs(x.expand(4, 3, 37), labels, return_entropy=True, backend=backend)
    rlp, rent = reference.gather_logprobs(xr.expand(4, 3, 37), labels, 1.0, -100, True)
    torch.testing.assert_close(lp, rlp, **TOL[torch.float32])
    torch.testing.assert_close(ent, rent, **TOL[torch.float32])
    w = torch.randn(4, 3, device=device)
    ((lp + ent) * w).sum().backward()
    ((rlp + rent) * w).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float32])
