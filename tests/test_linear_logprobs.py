"""linear_gather_logprobs on every backend against gather_logprobs(hidden @ weight.T + bias, ...)
(the eager torch reference), forward and backward to hidden, weight and bias."""

import pytest
import torch

import fastalign
from fastalign.kernels import reference
from tests.conftest import TOL, backend_params

BACKENDS = backend_params()


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _make(device, dtype, shape, hsize, vocab, bias=True, scale=1.0):
    hidden = (torch.randn(*shape, hsize, device=device) * scale).to(dtype)
    weight = (torch.randn(vocab, hsize, device=device) / hsize**0.5 * 3).to(dtype)
    b = torch.randn(vocab, device=device).to(dtype) if bias else None
    labels = torch.randint(0, vocab, shape, device=device)
    return hidden, weight, b, labels


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


# Tolerances against the eager path computed on the same low-precision inputs. fp32: the tiled
# GEMMs sum in another order than the full one (~1e-6 relative). bf16/fp16: the eager path rounds
# `hidden @ weight.T` and then `+ bias` separately (addmm rounds once) and the backward's
# grad_logits are rounded to the dtype in both paths but the GEMMs accumulate in other orders,
# so the outputs may differ by ~one rounding of a logit (|logit| <= ~10: 10 * 2^-8 in bf16) and
# the gradients by a few roundings of the dtype.
FWD_TOL = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.bfloat16: dict(rtol=0, atol=0.1),
           torch.float16: dict(rtol=0, atol=0.02)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=4 * 2**-8, atol=2e-2),
            torch.float16: dict(rtol=4 * 2**-11, atol=3e-3)}


def _compare(backend, hidden, weight, bias, labels, *, temperature=1.0, ignore_index=-100, entropy=True,
             chunk_size=None):
    dtype = hidden.dtype
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    hr, wr, br = _leaf(hidden), _leaf(weight), _leaf(bias)
    snapshot = [t.clone() for t in (hidden, weight, labels) + ((bias,) if bias is not None else ())]
    out = fastalign.linear_gather_logprobs(
        h, w, labels, bias=b, temperature=temperature, ignore_index=ignore_index, return_entropy=entropy,
        chunk_size=chunk_size, backend=backend,
    )
    logits = hr @ wr.T if br is None else hr @ wr.T + br
    ref = reference.gather_logprobs(logits, labels, temperature, ignore_index, entropy)
    out, ref = (out, ref) if entropy else ((out,), (ref,))
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and o.shape == labels.shape
        torch.testing.assert_close(o, r, **FWD_TOL[dtype])
    weights = [torch.randn(labels.shape, device=hidden.device) for _ in out]
    sum(((o * g).sum() for o, g in zip(out, weights))).backward()
    sum(((r * g).sum() for r, g in zip(ref, weights))).backward()
    pairs = [(h, hr), (w, wr)] + ([(b, br)] if b is not None else [])
    for x, xr in pairs:
        assert x.grad.dtype == dtype and x.grad.shape == x.shape
        torch.testing.assert_close(x.grad.float(), xr.grad.float(), **GRAD_TOL[dtype])
    for before, t in zip(snapshot, (hidden, weight, labels) + ((bias,) if bias is not None else ())):
        assert torch.equal(before, t), "an input was modified"
    return out


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "shape,hsize,vocab,chunk",
    [((1,), 8, 7, None), ((5,), 16, 300, None), ((2, 9), 16, 301, 4), ((3, 7), 24, 129, 1), ((13,), 8, 1000, 5),
     ((2, 9), 16, 301, (4, 64)), ((13,), 8, 1000, (5, 100)), ((3, 7), 24, 129, (21, 1))],
)
def test_matches_eager_fp32(backend, device, shape, hsize, vocab, chunk):
    hidden, weight, bias, labels = _make(device, torch.float32, shape, hsize, vocab)
    labels.view(-1)[0] = -100
    _compare(backend, hidden, weight, bias, labels, chunk_size=chunk)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [(5, 64), None])  # cpp: the last tile (5 or all rows) kept by the forward
def test_low_precision(backend, device, dtype, chunk):
    """bf16/fp16: against the exact (fp32) result of the same low-precision inputs, the op must be
    at least as accurate as the eager low-precision path (within 2x its max error + a small atol):
    two low-precision computations differ from each other by their own rounding noise."""
    if _interpreted(backend, device):
        pytest.skip("Triton interpreter on the CPU: fp32 only")
    hidden, weight, bias, labels = _make(device, dtype, (4, 6), 32, 515)
    labels[0, :2] = -100
    weights = [torch.randn(labels.shape, device=device) for _ in range(2)]

    def run(fn, cast):
        h, w, b = (_leaf(t.to(cast)) for t in (hidden, weight, bias))
        lp, ent = fn(h, w, b)
        ((lp * weights[0]).sum() + (ent * weights[1]).sum()).backward()
        return [lp, ent] + [x.grad.float() for x in (h, w, b)]

    eager = lambda h, w, b: reference.gather_logprobs(h @ w.T + b, labels, 1.0, -100, True)  # noqa: E731
    fused = lambda h, w, b: fastalign.linear_gather_logprobs(  # noqa: E731
        h, w, labels, bias=b, return_entropy=True, chunk_size=chunk, backend=backend)
    exact, low, ours = run(eager, torch.float32), run(eager, dtype), run(fused, dtype)
    for name, e, lo, o in zip(("logprobs", "entropy", "grad hidden", "grad weight", "grad bias"), exact, low, ours):
        assert o.dtype == torch.float32 and o.shape == e.shape
        err, eager_err = (o - e).abs().max().item(), (lo - e).abs().max().item()
        assert err <= 2 * eager_err + 1e-3, f"{name}: max error {err} vs eager {dtype} {eager_err}"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.7])
@pytest.mark.parametrize("entropy", [False, True])
def test_temperature_no_bias_int32_labels(backend, device, temperature, entropy):
    hidden, weight, _, labels = _make(device, torch.float32, (3, 5), 16, 257, bias=False)
    _compare(backend, hidden, weight, None, labels.int(), temperature=temperature, entropy=entropy, chunk_size=(4, 100))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignored_tiles_and_all_ignored(backend, device):
    hidden, weight, bias, labels = _make(device, torch.float32, (24,), 8, 100)
    labels[:10] = 3  # the first tiles (chunk 4) hold only ignored labels and are skipped
    labels[15] = 3
    out = _compare(backend, hidden, weight, bias, labels, ignore_index=3, chunk_size=(4, 30))
    assert (out[0][:10] == 0).all() and (out[1][:10] == 0).all()
    labels[:] = -100
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    lp, ent = fastalign.linear_gather_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=4, backend=backend)
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    for x in (h, w, b):
        assert (x.grad == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_partial_gradients_and_empty(backend, device):
    hidden, weight, bias, labels = _make(device, torch.float32, (6,), 8, 50)
    # only the weight asks for a gradient (frozen trunk): the others are not computed
    w = _leaf(weight)
    lp = fastalign.linear_gather_logprobs(hidden, w, labels, bias=bias, chunk_size=4, backend=backend)
    lp.sum().backward()
    wr = _leaf(weight)
    reference.gather_logprobs(hidden @ wr.T + bias, labels).sum().backward()
    torch.testing.assert_close(w.grad, wr.grad, **GRAD_TOL[torch.float32])
    # no tokens
    h0 = torch.zeros(0, 8, device=device, requires_grad=True)
    lp, ent = fastalign.linear_gather_logprobs(h0, w, labels[:0], return_entropy=True, backend=backend)
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()


def test_auto_chunk_size():
    from fastalign.ops.linear_logprobs import auto_chunk_size

    cpu = torch.device("cpu")
    assert auto_chunk_size(4096, 32000, torch.float32, cpu) == 1024
    assert auto_chunk_size(4096, 32000, torch.float32, cpu, backward=True) == 256
    assert auto_chunk_size(10, 32000, torch.float32, cpu) == 10
    assert auto_chunk_size(10**6, 2**40, torch.float32, cpu) == 1


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_inputs(backend, device):
    hidden, weight, bias, labels = _make(device, torch.float32, (2, 3), 8, 20)
    f = fastalign.linear_gather_logprobs
    with pytest.raises(ValueError, match="weight must have shape"):
        f(hidden, weight[:, :7], labels, backend=backend)
    with pytest.raises(ValueError, match="weight must have shape"):
        f(hidden, weight[0], labels, backend=backend)
    with pytest.raises(ValueError, match="bias must have shape"):
        f(hidden, weight, labels, bias=bias[:19], backend=backend)
    with pytest.raises(ValueError, match="labels must have the shape"):
        f(hidden, weight, labels[:, :2], backend=backend)
    with pytest.raises(TypeError, match="weight must have the dtype"):
        f(hidden, weight.double(), labels, backend=backend)
    with pytest.raises(TypeError, match="bias must have the dtype"):
        f(hidden, weight, labels, bias=bias.half(), backend=backend)
    with pytest.raises(TypeError, match="hidden must be"):
        f(hidden.double(), weight.double(), labels, backend=backend)
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        f(hidden, weight, labels.float(), backend=backend)
    with pytest.raises(ValueError, match="weight is on meta"):
        f(hidden, weight.to("meta"), labels, backend=backend)
    for bad_chunk in (0, (4,), (4, 0), 2.0, True):
        with pytest.raises(ValueError, match="chunk_size"):
            f(hidden, weight, labels, chunk_size=bad_chunk, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        f(hidden, weight, labels, temperature=0.0, backend=backend)
    bad = labels.clone()
    bad[1, 2] = 20
    with pytest.raises(IndexError, match=r"labels\[5\] = 20"):
        f(hidden, weight, bad, backend=backend)
    bad[1, 2] = -1
    with pytest.raises(IndexError, match="outside"):
        f(hidden, weight, bad, backend=backend)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])
def test_opcheck(backend, device):
    from fastalign.ops import linear_logprobs as L

    hidden, weight, bias, labels = _make(device, torch.float32, (9,), 8, 37)
    labels[2] = -100
    for b in (bias, None):
        for with_entropy in (False, True):
            for keep in (False, True) if backend == "cpp" else (False,):
                args = (hidden.requires_grad_(), weight.requires_grad_(), b, labels, 1.3, -100, with_entropy, backend,
                        4, 3, 16, keep)
                # keep=True: the eager backward overwrites the kept tile output by design (it is
                # private to the autograd node, see _setup_context), so the check comparing eager
                # outputs after a backward with the traced ones does not apply; traced graphs never
                # keep it (test_kept_tile_not_used_when_traced).
                utils = ("test_schema", "test_autograd_registration", "test_faketensor") if keep else None
                torch.library.opcheck(L._fwd, args, **({"test_utils": utils} if utils else {}))
    keep = backend == "cpp"
    lp, ent, rs, kept = L._fwd(hidden.detach(), weight.detach(), bias, labels, 1.3, -100, True, backend, 4, 3, 16, keep)
    g = torch.randn(9, device=device)
    torch.library.opcheck(
        L._bwd, (g, g, hidden.detach(), weight.detach(), bias, labels, rs, ent, 1.3, -100, backend, 4, True, True, True,
                 16, kept.clone() if keep else None, 4)
    )
    torch.library.opcheck(
        L._bwd, (g, None, hidden.detach(), weight.detach(), None, labels, rs, None, 1.3, -100, backend, 4, False, True,
                 False, 7, None, 4)
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    def head(hidden, weight, bias, labels):
        lp, ent = fastalign.linear_gather_logprobs(
            hidden, weight, labels, bias=bias, temperature=0.9, return_entropy=True, chunk_size=3, backend=backend
        )
        return (lp * 2).sum() + ent.mean()

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    hidden, weight, bias, labels = _make(device, torch.float32, (2, 4), 8, 65)
    leaves = [_leaf(t) for t in (hidden, weight, bias)]
    loss = compiled(*leaves, labels)
    loss.backward()
    ref_leaves = [_leaf(t) for t in (hidden, weight, bias)]
    ref = head(*ref_leaves, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for x, xr in zip(leaves, ref_leaves):
        torch.testing.assert_close(x.grad, xr.grad)


# ---- cpp: the forward's last logits tile kept for the backward ---------------------------------

CPP = [p for p in BACKENDS if p.values[0] == "cpp"]


def _count_recomputes(monkeypatch):
    """Counts the backward's recomputes of the kept tile (L._tile_logits calls inside _bwd_2d)."""
    from fastalign.ops import linear_logprobs as L

    calls, in_bwd = [], []
    orig_tile, orig_bwd = L._tile_logits, L._bwd_2d

    def tile(*a):
        if in_bwd:
            calls.append(a[3:5])
        return orig_tile(*a)

    def bwd(*a):
        in_bwd.append(1)
        try:
            return orig_bwd(*a)
        finally:
            in_bwd.pop()

    monkeypatch.setattr(L, "_tile_logits", tile)
    monkeypatch.setattr(L, "_bwd_2d", bwd)
    return calls


@pytest.mark.parametrize("backend,device", CPP)
def test_kept_tile_single_tile(backend, device, monkeypatch):
    # all tokens fit one forward tile: the backward recomputes nothing (bf16/fp16: test_low_precision)
    hidden, weight, bias, labels = _make(device, torch.float32, (3, 5), 16, 301)
    labels[1, 2] = -100
    calls = _count_recomputes(monkeypatch)
    _compare(backend, hidden, weight, bias, labels, temperature=0.7)
    assert calls == []


@pytest.mark.parametrize("backend,device", CPP)
@pytest.mark.parametrize("n,chunk", [(13, (4, 64)), (16, (4, 100)), (16, 4), (9, (3, 1))])
def test_kept_tile_several_tiles(backend, device, n, chunk, monkeypatch):
    # tiles of 4 (3) rows: the last one comes from the forward, the others are recomputed in
    # [rows, cols] tiles of step 2 (V = 301 not a multiple of cols)
    hidden, weight, bias, labels = _make(device, torch.float32, (n,), 16, 301)
    labels[n - 2] = -100  # an ignored row inside the kept tile
    labels[1] = -100
    calls = _count_recomputes(monkeypatch)
    _compare(backend, hidden, weight, bias, labels, temperature=1.3, chunk_size=chunk)
    assert calls == []


@pytest.mark.parametrize("backend,device", CPP)
def test_kept_tile_last_tile_all_ignored(backend, device, monkeypatch):
    # the last forward tile holds only ignored labels (skipped): the kept tile is the one before
    hidden, weight, bias, labels = _make(device, torch.float32, (14,), 8, 100)
    labels[12:] = -100
    labels[9] = -100
    calls = _count_recomputes(monkeypatch)
    out = _compare(backend, hidden, weight, bias, labels, chunk_size=(4, 30))
    assert (out[0][12:] == 0).all() and calls == []
    # no gradient without the entropy / logprob output's gradient either
    h = _leaf(hidden)
    lp, ent = fastalign.linear_gather_logprobs(h, weight, labels, return_entropy=True, chunk_size=4, backend=backend)
    ent.sum().backward()
    hr = _leaf(hidden)
    reference.gather_logprobs(hr @ weight.T, labels, 1.0, -100, True)[1].sum().backward()
    torch.testing.assert_close(h.grad, hr.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend,device", CPP)
@pytest.mark.parametrize("chunk", [None, (4, 64)])
def test_kept_tile_retain_graph_twice(backend, device, chunk, monkeypatch):
    # the first backward overwrites the kept tile; the second (retained graph) recomputes it with
    # the forward's GEMM shape and gives the same gradients bit for bit
    hidden, weight, bias, labels = _make(device, torch.float32, (11,), 16, 200)
    labels[10] = -100
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    calls = _count_recomputes(monkeypatch)
    lp, ent = fastalign.linear_gather_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=chunk,
                                               backend=backend)
    gl, ge = torch.randn(11), torch.randn(11)
    loss = (lp * gl).sum() + (ent * ge).sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in (h, w, b)]
    assert calls == []
    for x in (h, w, b):
        x.grad = None
    loss.backward()
    assert len(calls) == 1
    for g1, x in zip(first, (h, w, b)):
        assert torch.equal(g1, x.grad)
    hr, wr, br = _leaf(hidden), _leaf(weight), _leaf(bias)
    lpr, entr = reference.gather_logprobs(hr @ wr.T + br, labels, 1.0, -100, True)
    (lpr * gl + entr * ge).sum().backward()
    for g1, xr in zip(first, (hr, wr, br)):
        torch.testing.assert_close(g1, xr.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend,device", CPP)
def test_kept_tile_reused_by_step_2(backend, device, monkeypatch):
    # automatic step-2 columns (vocab_chunk_size 0): the step-2 tiles live in the kept buffer
    from fastalign.ops import linear_logprobs as L

    seen = []
    tile = L._step2_tile
    monkeypatch.setattr(L, "_step2_tile", lambda *a: seen.append((a, tile(*a))) or seen[-1][1])
    hidden, weight, bias, labels = _make(device, torch.float32, (10,), 8, 301)
    lp, ent, rs, kept = L._fwd(hidden, weight, bias, labels, 1.0, -100, False, backend, 4, 16, 0, True)
    assert kept.shape == (4, 301)
    g = torch.randn(10)
    gh, gw, gb = L._bwd(g, None, hidden, weight, bias, labels, rs, None, 1.0, -100, backend, 16, True, True, True,
                        0, kept, 4)
    (args, (rows, cols)), = seen
    assert args[1] == 8 and args[4] == kept.numel()  # the 8 rows (of 10) outside the kept tile
    assert rows == 8 and rows * cols <= kept.numel()  # step 2's tiles fit in the kept buffer
    # balanced slices: 4 x 301 elements hold 150 columns of 8 rows -> 3 slices of 101 columns
    assert cols == 101
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    (reference.gather_logprobs(h @ w.T + b, labels) * g).sum().backward()
    for x, ref in ((gh, h), (gw, w), (gb, b)):
        torch.testing.assert_close(x, ref.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend,device", CPP)
def test_kept_tile_not_used_when_traced(backend, device, monkeypatch):
    # torch.compile traces with tensor subclasses: the kept tile is not used there (an op
    # overwriting a forward output in the backward cannot be partitioned); the tile is recomputed
    def head(hidden, weight, labels):
        return fastalign.linear_gather_logprobs(hidden, weight, labels, chunk_size=3, backend=backend).sum()

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    hidden, weight, _, labels = _make(device, torch.float32, (7,), 8, 65)
    leaves = [_leaf(t) for t in (hidden, weight)]
    calls = _count_recomputes(monkeypatch)
    compiled(*leaves, labels).backward()
    assert len(calls) >= 1
    ref = [_leaf(t) for t in (hidden, weight)]
    reference.gather_logprobs(ref[0] @ ref[1].T, labels).sum().backward()
    for x, xr in zip(leaves, ref):
        torch.testing.assert_close(x.grad, xr.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend,device", CPP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_row_blocks(backend, device, dtype, monkeypatch):
    # entropy's temporary p (and bf16's fp32 copy of the kept tile) in row blocks of 3 rows
    from fastalign.ops import linear_logprobs as L

    monkeypatch.setattr(L, "_BLOCK_BYTES", 3 * 4 * 301)
    hidden, weight, bias, labels = _make(device, dtype, (14,), 16, 301)
    labels[12] = -100
    if dtype == torch.float32:
        _compare(backend, hidden, weight, bias, labels, temperature=0.8, chunk_size=(8, 301))
    else:  # bf16: the same gradients as without blocks (blocks only change where fp32 lives)
        grads = []
        for block in (3 * 4 * 301, 2**30):
            monkeypatch.setattr(L, "_BLOCK_BYTES", block)
            h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
            lp, ent = fastalign.linear_gather_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=(8, 301),
                                                       backend=backend)
            (lp.sum() + ent.sum()).backward()
            grads.append([x.grad for x in (h, w, b)])
        for a, c in zip(*grads):
            assert torch.equal(a, c)
