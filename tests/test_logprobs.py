"""gather_logprobs on every backend against an exact (float64) evaluation of the same inputs,
forward and backward.

Bounds: every fp32 result is compared with the float64 value of the same formula on the same
(fp32 / bf16 / fp16) logits, within logprob_bounds() below, the worst-case error of a fp32
log-sum-exp over the V logits of a row: each term exp(z_j - m) carries its argument's rounding
(~u |z_j - m|, and u |z_j| when T != 1), the transcendental's EXP_ULPS and one more per online
rescale; the V-term sum adds gamma(V) S in any summation order (so any SIMD width, block or thread
split); log p, the entropy and the gradient follow from that with their own roundings. 16-bit
gradients add one rounding to their dtype. The bounds scale with V u (~3e-4 at V = 5000): an
off-by-one label, a wrong sign or temperature, a dropped 1/T or one-hot term, or a dropped large
term of the sum, are errors of the size of a probability, and still fail them. The huge-row test
(test_offsets_beyond_2_pow_31) bounds its sum by the depth of the kernels' summation trees, as the
any-order gamma(V) is meaningless for V = 2^30.
"""

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import fastalign
from tests.conftest import backend_params
from tests.numerics import EXP_ULPS, assert_within, gamma, unit_roundoff

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U = unit_roundoff(torch.float32)
FN = 2 * EXP_ULPS * U  # a transcendental's relative error: EXP_ULPS ulps, one ulp <= 2u|x|
# An exp result below TINY = 2^-125 may come out 0: fp32's smallest normal is 2^-126, and at::vec's
# exp_u20 builds 2^(n - 1), which is 0 for n = -126, so it flushes everything below e^-86.99 =
# 1.44 x 2^-126 (seen: p = 1.6e-38 -> 0).
TINY = 2 * torch.finfo(torch.float32).tiny


def rescales(backend, vocab, dtype=torch.float32, block=None):
    """How often one term of a row's exp-sum can be rescaled by an online log-sum-exp (each time
    by exp(m_old - m_new), one exp and one multiply): torch's log_softmax takes the max first
    (none); cpp sweeps blocks of kBlock = 2048 (csrc/cpu/isa/logprobs_rows.h); Triton tiles of `block` or
    row_block(V, 4096 fp32 / 8192 16-bit); CUDA one scalar element, then chunks of >= 16 elements
    per thread with >= 32 threads, then 2 x 5 levels of shuffle merges (csrc/cuda/logprobs_fwd.cu)."""
    if backend == "torch":
        return 0
    if backend == "cpp":
        return math.ceil(vocab / 2048) - 1
    if backend == "triton":
        block = block or min(1 << max(vocab - 1, 0).bit_length(), 4096 if dtype == torch.float32 else 8192)
        return math.ceil(vocab / block) - 1
    return math.ceil(vocab / 512) + 11


def logprob_bounds(logits, labels, temperature=1.0, ignore_index=-100, g=None, gh=None, *, rescales=0,
                   arg_err=0.0, bwd_arg_err=0.0, grad_dtype=torch.float32, grad_truncated=False):
    """Exact (float64) logprobs, entropy and gradient of sum(g lp + gh H) w.r.t. the logits, and
    the worst-case error of a fp32 evaluation of each (any backend, any summation order).

    Per row, z = x / T, m = max z, d_j = z_j - m <= 0, S = sum_j e^d_j, p_j = e^d_j / S,
    log p_j = d_j - log S, H = -sum p_j log p_j = log S + A, A = sum p_j |d_j|; u = 2^-24.
      * argument of term j: alpha_j = 5u|d_j| (the rounding of z_j - m; the rescale arguments
        m_k - m_k+1, which telescope to at most |d_j|; a relative error of the 1/T or log2(e)/T
        factor, which only matters relative to the common shift; 2u|d_j| for a GPU exp, ex2 of
        fl(d log2(e)), whose product and constant round) + u|z_j| when T != 1 (z_j
        rounded on its own: x * fl(1/T), x / fl(T)) + arg_err (the caller's error in z_j, e.g.
        the GEMM that made the logits). T = 1 is exact: x / 1 = x * 1 = x.
      * term j enters S with relative error rel_j = expm1(alpha_j + (R + 1)(FN + u)): its own
        exp (FN = 2 EXP_ULPS u) and each of its <= R rescales (exp + multiply); or it underflows to 0
        (absolute error < TINY = 2^-125, see above; terms with d in (-745, -87) add < 746 TINY to
        S and to t = sum e^d d).
      * S: relative error rel_S = sum p_j rel_j + gamma(V)(1 + sum p_j rel_j) + V 746 TINY
        (sum of V positive terms in any order; S >= 1).
      * log S: -log(1 - rel_S) + (FN + u) |log S| (log, and cuda's final add).
      * log p_y = (z_y - m) - log S: alpha_y + err(log S) + u |log p_y|.
      * H, kernel form log S - t / S with t = sum e^d_j d_j (cpp, triton, cuda): err(log S)
        + |d(t/S)| + u|H|, t's terms carrying e_j rel_j |d_j| + e_j alpha_j (1 + rel_j), its sum
        gamma(V) and 2 u per rescale (the shift add and multiply); reference form
        -sum p_j log p_j with p_j = exp(log p_j) (torch): sum p_j (|log p_j| relp_j + err_j
        (1 + relp_j)) + (gamma(V) + u)(H + that), relp_j = expm1(err_j + FN). The bound
        is the larger of the two.
      * gradient (1/T)(g [j = y] - p_j c_j), c_j = g + gh (log p_j + H), C_j = |g| + |gh|
        (|log p_j| + H + 1) >= |c_j| and >= the reference's autograd terms: p_j's error relp_j C_j
        (log p_j recomputed with the forward's stats, plus bwd_arg_err and a GPU exp's
        2u|log p_j|), c_j's |gh|(err_j
        + err(H) + sum_k p_k relp_k) (the stored H, or autograd's sum over k of
        go_k = g [k = y] - gh p_k (log p_k + 1)), that sum's gamma(V)(|g| + |gh|(H + 1)), six
        roundings of p_j C_j (coefficient, product, one-hot add, 1/T and its rounding), 3u|g|
        at the label, and TINY C_j for a p_j that underflows. In grad_dtype: one more rounding,
        u_d (|grad| + err) + u_d tiny_d (subnormal spacing), twice that if the conversion
        truncates (grad_truncated: the Triton interpreter's fp32 -> bf16 cast drops the low bits).
    Rows whose label is ignore_index are exactly 0 (bound 0); rows whose exact value is not finite
    (NaN / inf logits) must match it exactly (bound 0 there; assert_within checks NaN for NaN)."""
    shape, vocab = labels.shape, logits.shape[-1]
    x = logits.detach().double().reshape(-1, vocab).cpu()
    y = labels.detach().reshape(-1).long().cpu()
    valid = y != ignore_index
    col = torch.where(valid, y, torch.zeros_like(y))[:, None]
    zero = torch.zeros((), dtype=torch.float64)
    z = x / temperature
    m = z.max(-1).values
    d = z - m[:, None]
    fin = d.isfinite()
    absd = torch.where(fin, d.abs(), zero)
    log_s = d.exp().sum(-1).log()
    logp = d - log_s[:, None]
    p = logp.exp()
    absl = torch.where(fin, logp.abs(), zero)
    ent = -torch.where(p == 0, zero, p * logp).sum(-1)  # NaN rows stay NaN
    big_a = ent - log_s  # sum p_j |d_j|

    def per_term(err):  # a scalar, [..., V] or [..., 1] error in z, as [N, V]; 0 where p_j = 0 exactly
        err = torch.as_tensor(err, dtype=torch.float64).cpu()
        return torch.where(fin, err.reshape(-1, err.shape[-1]) if err.dim() else err, zero)

    gam = gamma(vocab)
    under = vocab * 746 * TINY
    alpha = per_term(5 * U * absd + (U * z.abs() if temperature != 1 else 0.0)) + per_term(arg_err)
    rel = torch.expm1(alpha + (rescales + 1) * (FN + U))
    pr = (p * rel).sum(-1)
    rel_s = pr + gam * (1 + pr) + under
    err_log_s = -torch.log1p(-rel_s) + (FN + U) * log_s.abs()
    err_lp = alpha + err_log_s[:, None] + U * absl

    t_err = ((p * (absd * rel + alpha * (1 + rel))).sum(-1) + under
             + (gam + 2 * (rescales + 1) * U) * (big_a + (p * absd * rel).sum(-1)))
    h_kernel = err_log_s + (t_err + big_a * rel_s) / (1 - rel_s) + 3 * U * (big_a + t_err) + U * ent.abs()
    relp = torch.expm1(err_lp + FN)
    terms = (p * (absl * relp + err_lp * (1 + relp))).sum(-1) + under
    h_ref = terms + (gam + U) * (ent + terms)
    ent_err = torch.maximum(h_kernel, h_ref)

    def out(v, err):
        v = torch.where(valid, v, zero)
        err = torch.where(valid & v.isfinite(), err, zero)
        return v.reshape(shape), err.reshape(shape)

    r = SimpleNamespace()
    r.lp, r.lp_err = out(logp.gather(1, col)[:, 0], err_lp.gather(1, col)[:, 0])
    r.ent, r.ent_err = out(ent, ent_err)
    m_err = 2 * U * m.abs() if temperature != 1 else zero  # fl(max x * fl(1/T))
    r.m, r.m_err = out(m, m_err)
    r.log_s, r.log_s_err = out(log_s, err_log_s + m_err)  # log sum exp(z - m) around the computed m
    if g is None:
        return r
    g = torch.where(valid, g.detach().double().reshape(-1).cpu(), zero)[:, None]
    gh = zero if gh is None else torch.where(valid, gh.detach().double().reshape(-1).cpu(), zero)[:, None]
    onehot = torch.zeros_like(x).scatter_(1, col, 1.0) * valid[:, None]
    h = ent[:, None]
    grad = (g * onehot - torch.where(p == 0, zero, p * (g + gh * (logp + h)))) / temperature
    err_lpb = err_lp + per_term(bwd_arg_err) + 2 * U * absl
    relp_b = torch.expm1(err_lpb + FN)
    big_c = g.abs() + gh.abs() * (absl + h + 1)
    sum_err = ent_err[:, None] + (p * relp_b).sum(-1, keepdim=True)
    err = (p * relp_b * big_c + p * gh.abs() * (err_lpb + sum_err) + p * gam * (g.abs() + gh.abs() * (h + 1))
           + 6 * U * p * big_c + torch.where(fin, TINY * big_c, zero) + onehot * 3 * U * g.abs()) / temperature
    if grad_dtype != torch.float32:
        ud = unit_roundoff(grad_dtype) * (2 if grad_truncated else 1)
        err = err + ud * (grad.abs() + err) + ud * torch.finfo(grad_dtype).tiny
    r.grad = grad.reshape(logits.shape)
    r.grad_err = torch.where(grad.isfinite(), err, zero).reshape(logits.shape)
    return r


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _skip_slow_combo(backend, device, dtype):
    # The Triton interpreter is numpy-based and slow: fp32 and small shapes only on the CPU.
    if _interpreted(backend, device) and dtype != torch.float32:
        pytest.skip("Triton interpreter on the CPU: fp32 only")


def _compare(backend, device, logits, labels, *, temperature=1.0, ignore_index=-100, entropy=True, dtype=None):
    """Forward and backward of `backend` vs the exact values of the same inputs, within
    logprob_bounds (the gradient's in the logits' dtype)."""
    dtype = dtype or logits.dtype
    x = logits.detach().clone().requires_grad_()
    out = fastalign.gather_logprobs(
        x, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=entropy, backend=backend
    )
    out = out if entropy else (out,)
    weights = [torch.randn(labels.shape, device=device) for _ in out]
    ex = logprob_bounds(logits, labels, temperature, ignore_index, weights[0], weights[1] if entropy else None,
                        rescales=rescales(backend, logits.shape[-1], dtype), grad_dtype=dtype)
    for o, e, err, what in zip(out, (ex.lp, ex.ent), (ex.lp_err, ex.ent_err), ("logprobs", "entropy")):
        assert o.dtype == torch.float32 and o.shape == labels.shape
        assert_within(o, e, err, f"{backend} {what}")
    sum(((o * w).sum() for o, w in zip(out, weights))).backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    assert_within(x.grad, ex.grad, ex.grad_err, f"{backend} grad")
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
    ones = torch.ones(3, device=device)
    ex = logprob_bounds(logits, labels, 1.0, -100, ones, 37.0 * ones, rescales=rescales(backend, 300))
    assert_within(x.grad, ex.grad, ex.grad_err, f"{backend} grad")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_extreme_logits_are_stable(backend, device):
    logits = torch.randn(3, 257, device=device)
    logits[0] *= 1e4  # one-hot-like distribution
    logits[1] += 1e4  # large offset: needs the running max
    logits[2] -= 1e4
    labels = torch.tensor([1, 2, 3], device=device)
    lp, ent = _compare(backend, device, logits, labels)
    # (lp <= 0 and ent >= 0 hold for the exact values, which _compare held them to)
    assert lp.isfinite().all() and ent.isfinite().all()


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
    # both against the exact values: the loss within its tokens' bounds plus the 12-term sum and
    # mean (gamma(12), the division and the final add), the gradient (g = 2, g_H = 1/12) within
    # the kernel's bound
    n = labels.numel()
    ex = logprob_bounds(logits, labels, 0.9, -100, torch.full((3, 4), 2.0), torch.full((3, 4), 1 / n),
                        rescales=rescales(backend, 129))
    exact = 2 * ex.lp.sum() + ex.ent.mean()
    err = 2 * ex.lp_err.sum() + ex.ent_err.mean()
    err = err + (gamma(n) + 2 * U) * (2 * (ex.lp.abs() + ex.lp_err).sum() + (ex.ent.abs() + ex.ent_err).mean())
    for what, value, grad in (("compiled", loss, logits.grad), ("eager", ref, x.grad)):
        assert_within(value, exact, err, f"{backend} {what} loss")
        assert_within(grad, ex.grad, ex.grad_err, f"{backend} {what} grad")


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
    lp = fastalign.gather_logprobs(logits, labels, backend=backend)
    logits.requires_grad_()
    fastalign.gather_logprobs(logits, labels, backend=backend)[2].backward()
    check_huge_rows(lp, logits.grad[2], vocab)


def check_huge_rows(lp, grad, vocab):
    """The rows of test_offsets_beyond_2_pow_31 (0: zeros, label 0; 1: ignored; 2: zeros and a 4
    at the end, labelled, with grad = d lp[2] / d row 2 in bf16) against their analytic values.
    The logits are exact (0 and 4, T = 1), the row max changes at most once (row 2, at the 4), so
    each term exp(0) or exp(-4) carries its exp and <= 2 rescales (the terms of logprob_bounds). For V ~ 2^30 the any-order
    gamma(V) means nothing (V u = 64); the sum is bounded by the depth D of the kernels' summation
    trees: cpp adds per block of 2048 <= 128 terms per lane, 1 + <= 15 lane reductions, then one
    block total per block (V / 2048 of them); CUDA threads add one chunk total (<= 10 deep) per
    step of 8192 elements per 256 threads (V / 8192 steps) and merge in 10 levels; Triton adds one
    tile total (tree depth 13) per tile of 8192. D <= V / 2048 + 2048: relative error gamma(D)
    ~ 3% of S (the worst case of cpp's 2^19 sequential block adds)."""
    depth = gamma(vocab // 2048 + 2049)
    rel_term = math.expm1(3 * (FN + U) + 5 * U * 4)  # logprob_bounds' rel_j, R = 2, |d_j| <= 4
    rel_s = torch.tensor(depth + rel_term * (1 + depth), dtype=torch.float64)
    s0, s2 = torch.tensor([float(vocab), 1 + (vocab - 1) * math.exp(-4.0)], dtype=torch.float64)
    err_log = lambda s: -torch.log1p(-rel_s) + (FN + U) * s.log()  # noqa: E731
    exact = torch.stack([-s0.log(), torch.zeros((), dtype=torch.float64), -s2.log()])
    assert_within(lp.cpu(), exact, torch.stack([err_log(s0), 0 * rel_s, err_log(s2)]) + U * exact.abs(), "logprobs")
    # grad = [j = y] - p_j (g = 1): p_y = 1 / S2, p_j = e^-4 / S2 elsewhere; bf16 output rounding
    ub, p_y = unit_roundoff(torch.bfloat16), 1 / s2
    relp_y = torch.expm1(err_log(s2) + 3 * U * s2.log() + FN)  # as logprob_bounds' relp_b
    relp_j = torch.expm1(err_log(s2) + 5 * U * 4 + 3 * U * (4 + s2.log()) + FN)
    p_j = p_y * math.exp(-4.0)
    for j, want, err in ((vocab - 1, 1 - p_y, p_y * relp_y + 3 * U), (5, -p_j, p_j * (relp_j + 6 * U))):
        err = err + ub * (abs(want) + err) + ub * torch.finfo(torch.bfloat16).tiny
        assert_within(grad[j].float().cpu(), want, err, f"grad[{j}]")


_CAPABILITY_CHECK = """
import torch, fastalign
from fastalign._backends import extension
from tests.numerics import assert_within
from tests.test_logprobs import logprob_bounds, rescales
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = (torch.randn(7, 2 * 2048 + 45) * 4).to(dtype).requires_grad_()
    y = torch.randint(0, x.shape[-1], (7,)); y[1] = -100
    lp, ent = fastalign.gather_logprobs(x, y, temperature=0.8, return_entropy=True, backend="cpp")
    (lp.sum() + 2 * ent.sum()).backward()
    ex = logprob_bounds(x, y, 0.8, -100, torch.ones(7), torch.full((7,), 2.0), rescales=rescales("cpp", x.shape[-1]),
                        grad_dtype=dtype)
    assert_within(lp, ex.lp, ex.lp_err, f"{dtype} logprobs")
    assert_within(ent, ex.ent, ex.ent_err, f"{dtype} entropy")
    assert_within(x.grad, ex.grad, ex.grad_err, f"{dtype} grad")
print(extension().cpu_capability())
"""


@pytest.mark.skipif(fastalign.backends()["cpp"]["usable"] is False, reason="fastalign._C not built")
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_cpu_kernel_table_matches_reference(capability):
    # The C++ kernels are compiled once per ISA and chosen at run time; a wheel may land on a CPU
    # that gets any of them, so each table is checked here, not just the widest.
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for `import tests.numerics`
    env = dict(os.environ, FASTALIGN_CPU_CAPABILITY=capability,
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
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
    ex = logprob_bounds(logits, labels.long(), 1.0, 2**40, rescales=rescales(backend, 5))
    assert (ex.lp != 0).all()
    assert_within(out, ex.lp, ex.lp_err, f"{backend} logprobs")


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
    x = base.clone().requires_grad_()
    lp, ent = fastalign.gather_logprobs(x.expand(4, 3, 37), labels, return_entropy=True, backend=backend)
    w = torch.randn(4, 3, device=device)
    ex = logprob_bounds(base.expand(4, 3, 37), labels, 1.0, -100, w, w, rescales=rescales(backend, 37))
    assert_within(lp, ex.lp, ex.lp_err, f"{backend} logprobs")
    assert_within(ent, ex.ent, ex.ent_err, f"{backend} entropy")
    ((lp + ent) * w).sum().backward()
    # autograd adds the 4 aliasing rows' gradients: their bounds, plus gamma(4) of the sum
    bound = ex.grad_err.sum(0, keepdim=True) + gamma(4) * (ex.grad.abs() + ex.grad_err).sum(0, keepdim=True)
    assert_within(x.grad, ex.grad.sum(0, keepdim=True), bound, f"{backend} grad")
