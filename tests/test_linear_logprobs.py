"""linear_gather_logprobs on every backend against the exact (float64) values of
gather_logprobs(hidden @ weight.T + bias, ...) on the same inputs, forward and backward to hidden,
weight and bias.

Bounds (linear_bounds): the tiled GEMMs make each logit with the error of an H + 1 term dot
product in fp32, gamma(H + 1)(|h||W| + |b|) in any blocking (16-bit inputs: the tile is also
rounded to the dtype, u_d |x|, up to twice: the product, then + bias); that error enters the log-sum-exp
as an argument error of each term (tests/test_logprobs.py's logprob_bounds, which adds the fp32
log-sum-exp's own error over V terms in any order). The gradients push grad_logits' bound
through the backward GEMMs: |dG| @ |W| plus the GEMM's own gamma(V) (|G| @ |W|) for hidden,
gamma(N) for weight and bias (tokens summed in any order, across tiles too), and in 16 bits the
roundings of each GEMM result and of the final cast. Recomputations with the same inputs and GEMM
shapes (retain_graph, row blocks) stay bit-exact.
"""

import pytest
import torch

import fastalign
from tests.conftest import backend_params
from tests.numerics import U, assert_within, gamma, unit_roundoff
from tests.test_logprobs import logprob_bounds, rescales

BACKENDS = backend_params()
U32 = U[torch.float32]


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


def linear_bounds(hidden, weight, bias, labels, backend, *, temperature=1.0, ignore_index=-100, g=None, gh=None):
    """Exact (float64) logprobs, entropy and gradients (of sum(g lp + gh H)) w.r.t. hidden,
    weight and bias, with the worst-case error of the op on `backend` for each.

    logits x = h W^T + b: fp32 accumulation of H products and the bias, acc = gamma(H + 1)
    (|h||W|^T + |b|), plus in 16 bits the rounding of the result to the dtype, u_d (|x| + acc),
    and maybe of the product before the bias is added, u_d (|h W^T| + acc), each with u_d tiny_d
    (subnormal spacing). The forward and
    the backward's recompute each stay within it; divided by T it is logprob_bounds' arg_err. The
    cpp backward (_grad_logits_) recomputes log p = x / T - fl(m + log S): its own roundings of
    z (2u|z| when T != 1: fl(1/T), the product) and of the shift m + log S (u|lse|) are bwd_arg_err.
    grad_logits G then has logprob_bounds' grad_err dG (in 16 bits: rounded to the dtype, as
    eager's), and each backward GEMM adds, with |G| <= |G_exact| + dG:
      grad_hidden = G W:    dG |W| + (gamma(V) + 2 u_d)(|G| |W|)
      grad_weight = G^T h:  dG^T |h| + (gamma(N) + 2 u_d)(|G|^T |h|)
      grad_bias = sum_i G:  sum dG + (gamma(N) + u_d) sum |G|
    (gamma: fp32 accumulation inside the GEMM and across tiles / vocabulary slices in any order;
    2 u_d: a 16-bit GEMM's result rounded, then the fp32 accumulator cast to the dtype.)"""
    dt = hidden.dtype
    vocab, hsize = weight.shape
    h = hidden.detach().double().reshape(-1, hsize).cpu()
    w = weight.detach().double().cpu()
    b = torch.zeros(vocab, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    n = h.shape[0]
    ud = 0.0 if dt == torch.float32 else unit_roundoff(dt)
    tiny = ud * torch.finfo(dt).tiny
    prod = h @ w.T
    logits = prod + b
    acc = gamma(hsize + 1) * (h.abs() @ w.abs().T + b.abs())
    x_err = acc + ud * (prod.abs() + logits.abs() + 2 * acc) + 2 * tiny
    bwd_extra = 0.0
    if backend == "cpp":
        z = logits / temperature
        bwd_extra = (2 * U32 * z.abs() if temperature != 1 else 0.0) + U32 * torch.logsumexp(z, -1, keepdim=True).abs()
    r = logprob_bounds(logits, labels.reshape(-1), temperature, ignore_index,
                       None if g is None else g.reshape(-1), None if gh is None else gh.reshape(-1),
                       rescales=rescales(backend, vocab, dt), arg_err=x_err / temperature, bwd_arg_err=bwd_extra,
                       grad_dtype=dt)
    r.lp, r.lp_err, r.ent, r.ent_err = (t.reshape(labels.shape) for t in (r.lp, r.lp_err, r.ent, r.ent_err))
    if g is None:
        return r
    big_g, d_g = r.grad, r.grad_err
    abs_g = big_g.abs() + d_g
    gn = gamma(max(n, 1))
    r.grad_hidden = (big_g @ w).reshape(hidden.shape)
    r.grad_hidden_err = (d_g @ w.abs() + (gamma(vocab) + 2 * ud) * (abs_g @ w.abs()) + tiny).reshape(hidden.shape)
    r.grad_weight = big_g.T @ h
    r.grad_weight_err = d_g.T @ h.abs() + (gn + 2 * ud) * (abs_g.T @ h.abs()) + tiny
    r.grad_bias = big_g.sum(0)
    r.grad_bias_err = d_g.sum(0) + (gn + ud) * abs_g.sum(0) + tiny
    return r


def _check_grads(what, grads, ex):
    """grads: (grad_hidden, grad_weight, grad_bias), None where not computed."""
    for name, got in zip(("hidden", "weight", "bias"), grads):
        if got is not None:
            assert_within(got, getattr(ex, f"grad_{name}"), getattr(ex, f"grad_{name}_err"), f"{what} grad {name}")


def _compare(backend, hidden, weight, bias, labels, *, temperature=1.0, ignore_index=-100, entropy=True,
             chunk_size=None):
    dtype = hidden.dtype
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    snapshot = [t.clone() for t in (hidden, weight, labels) + ((bias,) if bias is not None else ())]
    out = fastalign.linear_gather_logprobs(
        h, w, labels, bias=b, temperature=temperature, ignore_index=ignore_index, return_entropy=entropy,
        chunk_size=chunk_size, backend=backend,
    )
    out = out if entropy else (out,)
    weights = [torch.randn(labels.shape, device=hidden.device) for _ in out]
    ex = linear_bounds(hidden, weight, bias, labels, backend, temperature=temperature, ignore_index=ignore_index,
                       g=weights[0], gh=weights[1] if entropy else None)
    for o, e, err, what in zip(out, (ex.lp, ex.ent), (ex.lp_err, ex.ent_err), ("logprobs", "entropy")):
        assert o.dtype == torch.float32 and o.shape == labels.shape
        assert_within(o, e, err, f"{backend} {what}")
    sum(((o * g).sum() for o, g in zip(out, weights))).backward()
    for x in (h, w) + ((b,) if b is not None else ()):
        assert x.grad.dtype == dtype and x.grad.shape == x.shape
    _check_grads(backend, (h.grad, w.grad, None if b is None else b.grad), ex)
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
    """bf16/fp16: against the exact values of the same low-precision inputs, within linear_bounds:
    fp32 accumulation, plus the roundings to the dtype of the logits tile, grad_logits and each
    GEMM result (the eager torch path rounds at the same places)."""
    if _interpreted(backend, device):
        pytest.skip("Triton interpreter on the CPU: fp32 only")
    hidden, weight, bias, labels = _make(device, dtype, (4, 6), 32, 515)
    labels[0, :2] = -100
    _compare(backend, hidden, weight, bias, labels, chunk_size=chunk)


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
    ex = linear_bounds(hidden, weight, bias, labels, backend, g=torch.ones(6))
    _check_grads(backend, (None, w.grad, None), ex)
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
    # both against the exact values: the loss within its tokens' bounds plus the 8-term sum and
    # mean (gamma(8), the division and the final add), the gradients (g = 2, g_H = 1/8) within
    # linear_bounds
    n = labels.numel()
    ex = linear_bounds(hidden, weight, bias, labels, backend, temperature=0.9, g=torch.full((2, 4), 2.0),
                       gh=torch.full((2, 4), 1 / n))
    exact = 2 * ex.lp.sum() + ex.ent.mean()
    err = 2 * ex.lp_err.sum() + ex.ent_err.mean()
    err = err + (gamma(n) + 2 * U32) * (2 * (ex.lp.abs() + ex.lp_err).sum() + (ex.ent.abs() + ex.ent_err).mean())
    for what, value, xs in (("compiled", loss, leaves), ("eager", ref, ref_leaves)):
        assert_within(value, exact, err, f"{backend} {what} loss")
        _check_grads(f"{backend} {what}", [x.grad for x in xs], ex)


# ---- cpp: the forward's last logits tile kept for the backward ---------------------------------

CPP = [p for p in BACKENDS if p.values[0] == "cpp"]


def _count_recomputes(monkeypatch):
    """Counts the backward's recomputes of the kept tile (L._tile_logits calls inside _bwd_2d)."""
    from fastalign.kernels import linear_logprobs as L

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
    ex = linear_bounds(hidden, weight, None, labels, backend, g=torch.zeros(14), gh=torch.ones(14))
    _check_grads(backend, (h.grad, None, None), ex)


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
    _check_grads(backend, first, linear_bounds(hidden, weight, bias, labels, backend, g=gl, gh=ge))


@pytest.mark.parametrize("backend,device", CPP)
def test_kept_tile_reused_by_step_2(backend, device, monkeypatch):
    # automatic step-2 columns (vocab_chunk_size 0): the step-2 tiles live in the kept buffer
    from fastalign.kernels import linear_logprobs as L

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
    _check_grads(backend, (gh, gw, gb), linear_bounds(hidden, weight, bias, labels, backend, g=g))


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
    ex = linear_bounds(hidden, weight, None, labels, backend, g=torch.ones(7))
    _check_grads(backend, (leaves[0].grad, leaves[1].grad, None), ex)


@pytest.mark.parametrize("backend,device", CPP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_row_blocks(backend, device, dtype, monkeypatch):
    # entropy's temporary p (and bf16's fp32 copy of the kept tile) in row blocks of 3 rows
    from fastalign.kernels import linear_logprobs as L

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
        # exact by design: the same GEMM shapes and the same elementwise ops, only cut into other
        # row blocks (this assumes an elementwise exp whose result does not depend on the
        # element's position in the block: at::vec / MKL VML map every element alike)
        for a, c in zip(*grads):
            assert torch.equal(a, c)
