"""Bad input to the public API (and to the raw fused ops): a clear error naming the argument, or
the same answer as the torch backend -- never a crash, an internal error or a silent wrong answer.

Each test here pins a finding of the bad-input sweep (see the test's comment for what happened
before); the mask tests guard the cpp kernels' direct reads of non-bool masks.

Bounds. A finding about argument handling (a mask's dtype or layout, an int where a float is
expected, a clamped chunk size) is checked exactly: the same backend on the equivalent plain
argument does the same arithmetic. Values compared with a formula get a derived bound: a
log-softmax over V logits (logp_error: its log-sum-exp, computed in fp64 from the actual logits)
plus the rounding of the fp32 target, or u per rounded subtraction, scaled by what is subtracted.
"""

import math

import pytest
import torch

import fastalign
from fastalign import _backends
from tests.conftest import backend_params
from tests.numerics import EXP_ULPS, assert_within, logp_error, rounding, unit_roundoff

BACKENDS = backend_params(("torch", "cpp", "triton"))
FUSED = backend_params(("cpp", "triton"))


U32 = unit_roundoff(torch.float32)
FN = 2 * EXP_ULPS * U32  # one exp/log/log1p: EXP_ULPS ulps, and one ulp of x is at most 2 u |x|


def near_uniform_bound(z, labels):
    """|fp32 log p_y - (-log V)| for tiny tempered logits z [..., V] (fp64, exact): the exact
    log p_y is within |z_y| + max|z| of -log V (log-sum-exp moves by at most max|z|), one fp32
    evaluation errs by logp_error (z's own rounding, u |z|, is below that), and the fp32 target
    -log V is rounded once."""
    v = z.shape[-1]
    zy = z.gather(-1, labels[..., None])[..., 0].abs()
    return zy + z.abs().amax(-1) + logp_error(z).gather(-1, labels[..., None])[..., 0] + rounding(math.log(v), torch.float32)



def _mask(shape, kind):
    """A [B, T] mask whose valid entries are `base`, in the layout/dtype `kind` names."""
    base = torch.rand(*shape) > 0.3
    base[0, 0] = True
    if kind == "int64_noncontig":  # the same values, column-major strides
        return base.long().t().contiguous().t()
    if kind == "int32_strided":  # every other element of a wider tensor
        return torch.stack([base.int(), torch.zeros_like(base).int()], -1)[..., 0]
    if kind == "float_nan":  # NaN is nonzero: valid, on every backend
        return torch.where(base, torch.full(shape, float("nan")), torch.zeros(shape))
    if kind == "float_neg_zero":  # -0.0 is zero: masked out
        return torch.where(base, torch.full(shape, -2.5), torch.full(shape, -0.0))
    if kind == "bool_row_expand":  # stride 0 over rows
        return base[:1].expand(shape)
    if kind == "int64_col_expand":  # stride 0 over time
        return base[:, :1].long().expand(shape)
    if kind == "float64_tiny":  # nonzero in float64 (converted to bool for the kernels)
        return base.double() * 1e-300
    return base.to(getattr(torch, kind))


MASK_KINDS = ["uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64",
              "int64_noncontig", "int32_strided", "float_nan", "float_neg_zero", "bool_row_expand",
              "int64_col_expand", "float64_tiny"]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("backend,device", FUSED)
def test_masks_of_every_dtype_and_layout_match_torch(backend, device, kind):
    # the cpp kernels read bool/uint8/int32/int64/float32 masks as they are, others via kernel_mask.
    # A mask only selects which terms enter the kernels' arithmetic, so a fused backend must give,
    # bit for bit, what it gives for the same selection as a plain bool mask (a misread mask changes
    # whole terms). (The torch backend is not held to this: its reductions over a strided mask's
    # product may sum in another order.) Agreement of the fused backends with torch on bool masks,
    # within derived bounds, is the business of test_ppo / test_gae / test_preference.
    torch.manual_seed(1)
    b, t = 3, 5
    mask = _mask((b, t), kind)
    plain = (mask != 0).contiguous()  # NaN != 0: valid; -0.0 == 0: masked
    x, y, z = torch.randn(b, t), torch.randn(b, t), torch.randn(b, t)

    def run(name, mask):
        xg = x.clone().requires_grad_()
        pol, pst = fastalign.ppo_policy_loss(xg, y, z, mask, dual_clip=2.0, agg="seq-mean-token-mean", backend=name)
        vg = x.clone().requires_grad_()
        val, vst = fastalign.ppo_value_loss(vg, y, z, mask, clip=0.1, backend=name)
        (pol + val).backward()
        adv, ret = fastalign.gae(x, y, mask, gamma=0.9, lam=0.8, backend=name)
        sg = x.clone().requires_grad_()
        seq = fastalign.sequence_logps(sg, mask, reduce="mean", backend=name)
        seq.sum().backward()
        m2 = torch.cat([mask, mask])
        pg = torch.cat([x, y]).requires_grad_()
        dpo = fastalign.dpo_loss_from_tokens(pg, torch.cat([z, x]), m2, backend=name)
        dpo[0].sum().backward()
        return [pol, *pst.values(), xg.grad, val, *vst.values(), vg.grad, adv, ret, seq, sg.grad, *dpo, pg.grad]

    for got, want in zip(run(backend, mask), run(backend, plain)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# ---- meta tensors ------------------------------------------------------------------------------


def test_meta_tensors_on_the_torch_backend():
    # before: the label range check called .item() on meta labels (RuntimeError from inside torch)
    logits, labels = torch.empty(2, 3, 7, device="meta"), torch.empty(2, 3, dtype=torch.long, device="meta")
    for backend in ("torch", "auto"):
        out = fastalign.gather_logprobs(logits, labels, backend=backend)
        assert out.device.type == "meta" and out.shape == (2, 3) and out.dtype == torch.float32
        hidden, weight = torch.empty(2, 3, 4, device="meta"), torch.empty(7, 4, device="meta")
        out = fastalign.linear_gather_logprobs(hidden, weight, labels, backend=backend)
        assert out.device.type == "meta" and out.shape == (2, 3)


def _raw_op_calls():
    """(name, op, args) for every fused fwd/bwd op, cpp and Triton, with valid CPU arguments."""
    from fastalign.ops import gae, logprobs, ppo, preference

    b, t, v = 2, 3, 5
    f = lambda *s: torch.randn(*s)  # noqa: E731
    m = torch.ones(b, t, dtype=torch.bool)
    lab = torch.tensor([1, 2])
    calls = {
        "gather_logprobs_fwd": (f(b, v), lab, 1.0, -100, True),
        "gather_logprobs_bwd": (f(b), f(b), f(b, v), lab, f(b, 2), f(b), 1.0, -100),
        "gae_fwd": (f(b, t), f(b, t), m, 1.0, 1.0),
        "ppo_policy_loss_fwd": (f(b, t), f(b, t), f(b, t), m, 0.8, 1.2, 0.0, 0, -1.0, 0.0),
        "ppo_policy_loss_bwd": (f(4), f(b, t), f(b, t), f(b, t), m, f(b), 0.8, 1.2, 0.0),
        "ppo_value_loss_fwd": (f(b, t), f(b, t), f(b, t), m, 0.2, 0, -1.0, 0.0),
        "ppo_value_loss_bwd": (f(4), f(b, t), f(b, t), f(b, t), m, f(b), 0.2),
        "sequence_logps_fwd": (f(b, t), m, False),
        "sequence_logps_bwd": (f(b), f(b, t), m, False),
        "dpo_loss_fwd": (f(b), f(b), f(b), f(b), 0.1, 0, 0.0),
        "dpo_loss_bwd": (f(b), f(b), f(b), f(b), f(b), 0.1, 0, 0.0),
        "dpo_tokens_fwd": (f(2 * b, t), f(2 * b, t), torch.ones(2 * b, t, dtype=torch.bool), 0.1, 0, 0.0, False),
        "dpo_tokens_bwd": (f(b), f(2 * b), f(2 * b), f(2 * b), f(2 * b, t), torch.ones(2 * b, t, dtype=torch.bool),
                           0.1, 0, 0.0, False),
    }
    tables = {
        "cpp": {**{k: getattr(torch.ops.fastalign, k, None) for k in calls}} if _backends.extension() else {},
        "triton": {
            "gather_logprobs_fwd": logprobs._FUSED["triton"][0], "gather_logprobs_bwd": logprobs._FUSED["triton"][1],
            "gae_fwd": gae._OPS["triton"],
            "ppo_policy_loss_fwd": ppo._FUSED[("policy", "triton")][0],
            "ppo_policy_loss_bwd": ppo._FUSED[("policy", "triton")][1],
            "ppo_value_loss_fwd": ppo._FUSED[("value", "triton")][0],
            "ppo_value_loss_bwd": ppo._FUSED[("value", "triton")][1],
            "sequence_logps_fwd": preference._SEQ["triton"][0], "sequence_logps_bwd": preference._SEQ["triton"][1],
            "dpo_loss_fwd": preference._DPO["triton"][0], "dpo_loss_bwd": preference._DPO["triton"][1],
            "dpo_tokens_fwd": preference._TOK["triton"][0], "dpo_tokens_bwd": preference._TOK["triton"][1],
        },
    }
    out = []
    for ns, table in tables.items():
        for name, op in table.items():
            if op is not None:
                out.append(pytest.param(op, calls[name], id=f"{ns}-{name}"))
    return out


@pytest.mark.parametrize("op,args", _raw_op_calls())
def test_raw_ops_refuse_one_meta_tensor_among_cpu_tensors(op, args):
    # before: the call dispatched to the fake (meta) implementation, which returned uninitialised
    # CPU tensors (garbage) instead of the kernel's device error
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    for i in tensor_pos:
        bad = list(args)
        bad[i] = bad[i].to("meta")
        with pytest.raises(RuntimeError, match=r"is on (meta|cpu) but .* on (cpu|meta)"):
            op(*bad)


# ---- parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_temperature_whose_reciprocal_is_zero_in_fp32(backend, device):
    # before: accepted; the Triton kernel returned NaN (its -inf padding times 1/T = 0 in fp32)
    logits, labels = torch.randn(2, 5), torch.tensor([1, 2])
    for t in (1e300, 1e39):
        with pytest.raises(ValueError, match="gather_logprobs: temperature"):
            fastalign.gather_logprobs(logits, labels, temperature=t, backend=backend)
        with pytest.raises(ValueError, match="linear_gather_logprobs: temperature"):
            fastalign.linear_gather_logprobs(torch.randn(2, 3), torch.randn(5, 3), labels, temperature=t,
                                             backend=backend)
    # the largest accepted temperature still works: logits / T ~ 0, a uniform distribution
    got = fastalign.gather_logprobs(logits, labels, temperature=1e37, backend=backend)
    assert_within(got, torch.full((2,), -math.log(5)), near_uniform_bound(logits.double() / 1e37, labels),
                  "log p at temperature 1e37")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_linear_gather_logprobs_parameter_edge_cases(backend, device):
    labels = torch.tensor([[1, 4, 0], [2, 2, 3]])
    f = fastalign.linear_gather_logprobs
    # before: OverflowError inside the torch reference (2**70 passed on as an int)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
    z = (hidden.double() @ weight.double().T) / float(2**70)  # the logits' own GEMM error is below |z|
    assert_within(f(hidden, weight, labels, temperature=2**70, backend=backend), torch.full((2, 3), -math.log(5)),
                  near_uniform_bound(z, labels), "log p at temperature 2**70")
    # before: the op schema refused it on cpp/triton with "Expected ... type 'int' ... found type 'int'"
    # (a huge chunk is clamped to all 6 tokens: the same single tile as chunk_size=6, bit for bit)
    want = f(hidden, weight, labels, chunk_size=6, backend=backend)
    assert torch.equal(f(hidden, weight, labels, chunk_size=2**70, backend=backend), want)
    assert torch.equal(f(hidden, weight, labels, chunk_size=(2**70, 2**70), backend=backend), want)
    # before: H = 0 raised "gather_logprobs: logits have an empty vocabulary" (V was 5); the logits
    # are all 0, a uniform distribution, and the gradients empty
    h0, w0 = torch.zeros(2, 3, 0, requires_grad=True), torch.zeros(5, 0, requires_grad=True)
    out = f(h0, w0, labels, backend=backend)
    assert_within(out, torch.full((2, 3), -math.log(5)), near_uniform_bound(torch.zeros(2, 3, 5).double(), labels),
                  "log p with H = 0")
    out.sum().backward()
    assert h0.grad.shape == h0.shape and w0.grad.shape == w0.shape
    # errors name linear_gather_logprobs, not gather_logprobs
    with pytest.raises(ValueError, match="^linear_gather_logprobs: temperature"):
        f(hidden, weight, labels, temperature=0.0, backend=backend)
    with pytest.raises(TypeError, match="^linear_gather_logprobs: ignore_index"):
        f(hidden, weight, labels, ignore_index=1.5, backend=backend)
    bad = labels.clone()
    bad[1, 2] = 5
    with pytest.raises(IndexError, match=r"^linear_gather_logprobs: labels\[5\] = 5 is outside \[0, 5\)"):
        f(hidden, weight, bad, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ppo_huge_int_parameters(backend, device):
    # before: OverflowError inside the torch reference (the fused backends took them as floats)
    x, y, z, m = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3)
    # an int is taken as the float it equals (2**70 is exact in binary): the same arithmetic
    got, _ = fastalign.ppo_policy_loss(x, y, z, m, dual_clip=2**70, backend=backend)
    want, _ = fastalign.ppo_policy_loss(x, y, z, m, dual_clip=float(2**70), backend=backend)
    assert torch.equal(got, want)
    got, _ = fastalign.ppo_value_loss(x, y, z, m, clip=2**70, backend=backend)
    want, _ = fastalign.ppo_value_loss(x, y, z, m, clip=float(2**70), backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ppo_value_clip_that_is_zero_in_fp32(backend, device):
    # before: accepted; the cpp kernel (clip 0 in fp32 = off) returned the unclipped loss while the
    # torch backend clipped to old_values
    x, y, z, m = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3)
    for clip in (1e-300, 1e-40):
        with pytest.raises(ValueError, match="ppo_value_loss: clip must be"):
            fastalign.ppo_value_loss(x, y, z, m, clip=clip, backend=backend)
    fastalign.ppo_value_loss(x, y, z, m, clip=torch.finfo(torch.float32).tiny, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dpo_beta_outside_fp32(backend, device):
    # before: accepted; beta is fp32 in the kernels (1e-300 -> 0: IPO's 1/(2 beta) = inf, 1e300 -> inf)
    c, r, rc, rr = (torch.randn(3) for _ in range(4))
    for beta in (1e-300, 1e300):
        with pytest.raises(ValueError, match="dpo_loss: beta must be"):
            fastalign.dpo_loss(c, r, rc, rr, beta=beta, backend=backend)
        with pytest.raises(ValueError, match="dpo_loss_from_tokens: beta must be"):
            fastalign.dpo_loss_from_tokens(torch.randn(4, 3), torch.randn(4, 3), torch.ones(4, 3), beta=beta,
                                           backend=backend)


def test_group_advantages_eps_outside_fp32():
    scores = torch.tensor([1.0, 1.0, 2.0, 3.0])
    # before: 1e-300 (0 in fp32) gave NaN for the group of equal scores, 1e300 silently zeros
    for eps in (1e-300, 1e300):
        with pytest.raises(ValueError, match="group_advantages: eps must be"):
            fastalign.group_advantages(scores, 2, eps=eps)
    # before: OverflowError inside torch
    out = fastalign.group_advantages(scores, 2, eps=2**70)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dpo_plugin_formula_of_the_wrong_shape_or_type(backend, device):
    # before: a plugin returning a scalar, a list or a wrong-length tensor came back silently as the
    # "per-pair losses", a float64 one as float64 losses
    from fastalign.ops import preference

    c, r, rc, rr = (torch.randn(3) for _ in range(4))
    bad = {"scalar": lambda d, beta, eps: d.mean(), "list": lambda d, beta, eps: d.tolist(),
           "short": lambda d, beta, eps: d[:1], "int": lambda d, beta, eps: (d > 0).long()}
    try:
        for name, formula in bad.items():
            fastalign.register_dpo_loss_type(f"_probe_{name}", formula, overwrite=True)
            with pytest.raises(TypeError, match=f"formula of loss_type '_probe_{name}' must return a float tensor"):
                fastalign.dpo_loss(c, r, rc, rr, loss_type=f"_probe_{name}", backend=backend)
            with pytest.raises(TypeError, match="must return a float tensor"):
                fastalign.dpo_loss_from_tokens(torch.randn(4, 3), torch.randn(4, 3), torch.ones(4, 3),
                                               loss_type=f"_probe_{name}", backend=backend)
        fastalign.register_dpo_loss_type("_probe_f64", lambda d, beta, eps: -d.double(), overwrite=True)
        losses, _, _ = fastalign.dpo_loss(c, r, rc, rr, loss_type="_probe_f64", backend=backend)
        assert losses.dtype == torch.float32
        # the margin (c - rc) - (r - rr): three fp32 subtractions on each side (the op may group
        # them otherwise), each rounding u times at most the sum of the four magnitudes
        mags = c.abs() + rc.abs() + r.abs() + rr.abs()
        assert_within(losses, -((c - rc) - (r - rr)), 2 * 3 * U32 * mags.double(), "plugin f64 losses")
    finally:
        for name in [*bad, "f64"]:
            preference.DPO_LOSS_TYPES.pop(f"_probe_{name}", None)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_label_on_a_minus_inf_logit_has_the_reference_gradient(backend, device):
    # A label whose logit is -inf (a masked vocabulary entry): logprob -inf, and d logp_y / dz_y =
    # 1 - p_y = 1. The cpp backward used to compute the one-hot term g_H p_y (log p_y + H) without
    # the clamp it uses elsewhere: 0 * -inf = NaN (csrc/cpu/isa/logprobs_rows.h, logprobs_bwd_typed).
    x = torch.tensor([[0.0, -float("inf"), 1.0]], requires_grad=True)
    fastalign.gather_logprobs(x, torch.tensor([1]), backend=backend).sum().backward()
    # fp64 reference; the -inf entry adds exp(-inf) = 0 exactly, so the finite entries are the
    # softmax of [0, 1]: each -p_j carries log p_j's error (relative) plus its exp (FN)
    # and the product with g (u); the label's 1 - p_y = 1 - 0 is exact
    finite = torch.tensor([0.0, 1.0], dtype=torch.float64)
    p = finite.softmax(0)
    want = torch.stack([-p[0], torch.tensor(1.0, dtype=torch.float64), -p[1]])[None]
    err = p * (logp_error(finite) + FN + U32)
    assert_within(x.grad, want, torch.stack([err[0], torch.tensor(0.0, dtype=torch.float64), err[1]])[None],
                  "gradient with a -inf label logit")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bool_flags_refuse_non_bools(backend, device):
    # before: taken for their truth value ("False" is truthy, None silently False)
    logits, labels = torch.randn(2, 5), torch.tensor([1, 2])
    tok = (torch.randn(4, 3), torch.randn(4, 3), torch.ones(4, 3))
    calls = {
        "return_entropy": lambda v: fastalign.gather_logprobs(logits, labels, return_entropy=v, backend=backend),
        "return_entropy ": lambda v: fastalign.linear_gather_logprobs(torch.randn(2, 3), torch.randn(5, 3), labels,
                                                                      return_entropy=v, backend=backend),
        "shift_mean": lambda v: fastalign.masked_whiten(torch.randn(2, 3), torch.ones(2, 3), shift_mean=v,
                                                        backend=backend),
        "return_sequence_logps": lambda v: fastalign.dpo_loss_from_tokens(*tok, return_sequence_logps=v,
                                                                         backend=backend),
    }
    for name, call in calls.items():
        for bad in ("False", None, 2, 0.5, torch.tensor(True)):
            with pytest.raises(TypeError, match=f"{name.strip()} must be a bool"):
                call(bad)
        for good in (True, False, 0, 1):
            call(good)


def test_raw_cpp_ops_check_their_numbers_and_dtypes():
    # the public functions validate first; the raw ops guard direct calls (csrc/checks.h)
    if fastalign.backends()["cpp"]["reason"]:
        pytest.skip(fastalign.backends()["cpp"]["reason"])
    ops = torch.ops.fastalign
    t, m, nan = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), float("nan")
    i32 = torch.ones(2, 3, dtype=torch.int32)
    cases = [
        (lambda: ops.gae_fwd(i32, i32, m, 1.0, 1.0), "gae: rewards and values must be float32"),
        (lambda: ops.ppo_policy_loss_fwd(i32, i32, i32, m, 0.8, 1.2, 0.0, 0, -1.0, 0.0), "must be float32"),
        (lambda: ops.ppo_policy_loss_fwd(t, t, t, m, nan, nan, 0.0, 0, -1.0, 0.0), "clip_lo"),
        (lambda: ops.ppo_policy_loss_fwd(t, t, t, m, 0.8, 0.9, 0.0, 0, -1.0, 0.0), "clip_hi"),
        (lambda: ops.ppo_policy_loss_fwd(t, t, t, m, 0.8, 1.2, 0.5, 0, -1.0, 0.0), "dual_clip"),
        (lambda: ops.ppo_policy_loss_bwd(torch.ones(()), t, t, t, m, torch.ones(2), 0.8, 1.2, nan), "dual_clip"),
        (lambda: ops.ppo_value_loss_fwd(t, t, t, m, nan, 0, -1.0, 0.0), "clip must be"),
        (lambda: ops.ppo_value_loss_fwd(t, t, t, m, 1e-300, 0, -1.0, 0.0), "clip must be"),
        (lambda: ops.ppo_value_loss_fwd(t, t, t, m, 0.2, 0, nan, 0.0), "global_count"),
        (lambda: ops.ppo_value_loss_fwd(t, t, t, m, 0.2, 3, -1.0, -2.0), "horizon"),
        (lambda: ops.gather_logprobs_fwd(torch.randn(2, 5), torch.tensor([1, 2]), 1e-300, -100, False), "temperature"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()
    # the edges the public API can produce still pass: clip_low -> 0 gives clip_lo = 1.0 exactly
    out, _ = ops.ppo_policy_loss_fwd(t, t, t, m, 1.0 - 1e-20, 1.0 + 1e-20, 0.0, 0, -1.0, 0.0)
    assert out.isfinite().all()
