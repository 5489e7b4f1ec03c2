"""gae on every backend against kernels/reference.py (the per-time-step loop), plus the peers'
formulas (TRL's unmasked loop, verl's multi-turn loop; written out from their code in
fastalign/benchmarks/_peers.py, which the benchmarks time).

Error bounds (tests/numerics.py's model, computed in float64 from each test's inputs): unrolled,
A_t = sum over the K valid steps s >= t of (gamma lam)^k (r_s + gamma V_next(s) - v_s), k the
number of valid steps between t and s: a sum of 3K terms. The sequential loops (reference, cpp,
TRL, verl) and the chunked parallel scans (triton, cuda) add these terms in different orders, so
each is within gamma(3K - 1) sum|terms| of the exact sum, plus the rounding of the coefficients
each term is multiplied by on its way (gamma(4k + 2), see _gae_bounds; none when gamma and
gamma lam are 0 or 1, so exact), and returns = A + v one more rounding. Two implementations
compared differ by at most the sum of their bounds. Masked steps are exactly 0 on both sides and
compared exactly, as are the hand-computed dyadic cases and the mask dtypes (the same code on the
same inputs). The bounds are worst cases: with gamma lam = 1 and thousands of steps they allow
~1e-3 relative to sum|terms| (~u 3K), while the errors seen are ~sqrt(K) u; a wrong, dropped or
mis-carried term is still far outside them at every step near it."""

import pytest
import torch

import fastalign
from fastalign.benchmarks._peers import trl_gae_loop, verl_gae_loop
from fastalign.kernels import reference
from tests.conftest import backend_params, requires_nvidia_compiler, run_triton_compile_script
from tests.numerics import assert_within, gamma as gamma_n, unit_roundoff

BACKENDS = backend_params()
GAMMA_LAM = [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.95, 0.95), (1.0, 1.0), (0.99, 0.95), (1.0, 0.5)]
U = unit_roundoff(torch.float32)


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _gae_bounds(rewards, values, mask, gamma, lam):
    """Per-element bounds (advantages, returns) of ONE fp32 evaluation of GAE against the exact
    result on the same (fp32-upcast) inputs; 0 at masked steps (both outputs are exactly 0 there).

    With c = gamma lam, A_t = sum_k c^k (r + gamma V_next - v)_(s_k) over the K_t valid steps
    s_0 = t < s_1 < ... Every implementation adds these 3 K_t terms in some order (<= 3 K_t - 1
    roundings on any term's path) and multiplies each by a coefficient built from fp32 factors:
    fp32(c) or fp32(gamma) fp32(lam) or gamma (lam A) (<= 2 roundings of the factor and 2 products
    per step), and fp32(gamma) times V (2): <= 4 k + 2 more roundings. So, Higham's lemma 3.1,
        |A^_t - A_t| <= sum_k c^k m_k gamma(3 K_t + 4 k + 2),   m_k = |r| + gamma |V_next| + |v|,
    evaluated as u / (1 - (7 T + 2) u) ((3 K_t + 2) S_t + 4 W_t), S_t = sum c^k m_k and
    W_t = sum k c^k m_k by the same backward recurrence. When gamma and c are each 0 or 1 every
    multiplication is exact (and with c = 0 only the step's own 3 terms are nonzero): 3 K_t S_t u.
    returns_t = A_t + v_t rounds once more: u (S_t + e_t + |v_t|). NaN/inf at masked steps are
    never read (as in the kernels); NaN at a valid step makes the bound 0 where the outputs are
    NaN, which assert_within then compares exactly."""
    valid = (mask != 0).cpu()
    r = torch.where(valid, rewards.detach().double().cpu(), 0.0)
    v = torch.where(valid, values.detach().double().cpu(), 0.0)
    c = gamma * lam
    exact = c in (0.0, 1.0) and gamma in (0.0, 1.0)
    batch, steps = r.shape
    s_all, w_all, k_all = ([[0.0] * steps for _ in range(batch)] for _ in range(3))
    for b, (rb, vb, hb) in enumerate(zip(r.tolist(), v.tolist(), valid.tolist())):  # Python floats are fp64
        s = w = k = v_next = 0.0
        for t in reversed(range(steps)):
            if hb[t]:
                w = c * (w + s)
                s = abs(rb[t]) + gamma * abs(v_next) + abs(vb[t]) + c * s
                k, v_next = k + 1, vb[t]
            s_all[b][t], w_all[b][t], k_all[b][t] = s, w, k
    s_all, w_all, k_all = (torch.tensor(a, dtype=torch.float64).reshape(batch, steps) for a in (s_all, w_all, k_all))
    if c == 0.0:
        k_all = k_all.clamp(max=1)
    if exact:
        e_adv = 3 * k_all * s_all * U / (1 - 3 * steps * U)
    else:
        e_adv = ((3 * k_all + 2) * s_all + 4 * w_all) * U / (1 - (7 * steps + 2) * U)
    e_ret = e_adv + gamma_n(1) * (s_all + e_adv + v.abs())
    zero = torch.zeros((), dtype=torch.float64)
    return (torch.where(valid, e_adv, zero).nan_to_num(0.0), torch.where(valid, e_ret, zero).nan_to_num(0.0))


def _random_mask(batch, steps, device):
    """Holes in the middle, a leading and a trailing masked span, one all-masked row."""
    mask = torch.rand(batch, steps, device=device) > 0.3
    if steps >= 4:
        mask[0, : steps // 4] = False  # leading span (prompt-like)
        mask[-1, -(steps // 4) :] = False  # trailing span (padding)
        if batch >= 3:
            mask[1, steps // 3 : steps // 2 + 1] = False  # an observation span mid-sequence
    if batch >= 2:
        mask[batch // 2] = False  # a row of length 0
    return mask


def _check(backend, device, rewards, values, mask, gamma, lam):
    adv, ret = fastalign.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    assert adv.shape == rewards.shape and ret.shape == rewards.shape
    assert adv.device == rewards.device
    e_adv, e_ret = _gae_bounds(rewards, values, mask, gamma, lam)  # two fp32 evaluations: 2x
    assert_within(adv, ref_adv, 2 * e_adv, f"advantages, gamma {gamma} lam {lam}")
    assert_within(ret, ref_ret, 2 * e_ret, f"returns, gamma {gamma} lam {lam}")
    invalid = mask == 0
    assert (adv[invalid] == 0).all() and (ret[invalid] == 0).all()
    return adv, ret


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (4, 7), (5, 33), (3, 300), (2, 1100)])
def test_matches_reference(backend, device, dtype, shape):
    if _interpreted(backend, device) and shape[1] > 300:
        pytest.skip("Triton interpreter on the CPU: small shapes only")
    rewards = torch.randn(shape, device=device).to(dtype)
    values = torch.randn(shape, device=device).to(dtype)
    mask = _random_mask(*shape, device)
    for gamma, lam in GAMMA_LAM:
        _check(backend, device, rewards, values, mask, gamma, lam)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_long_rows_cross_chunks(backend, device):
    # several chunks of the parallel scans (Triton 1024, CUDA up to 2048 steps per chunk), with
    # gamma*lam = 1 so nothing decays across chunk borders; sparse end-of-sequence rewards.
    steps = 2100 if not _interpreted(backend, device) else 1100
    rewards = torch.zeros(3, steps, device=device)
    rewards[:, -1] = torch.randn(3, device=device)
    rewards += 0.01 * torch.randn(3, steps, device=device)
    values = torch.randn(3, steps, device=device)
    mask = _random_mask(3, steps, device)
    mask[:, 1020:1030] = False  # a masked span straddling a chunk border
    _check(backend, device, rewards, values, mask, 1.0, 1.0)
    _check(backend, device, rewards, values, mask, 0.99, 0.95)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id in ("cuda-cuda", "triton-cuda", "cpp-cpu")])
def test_rl_sized_rows(backend, device):
    # the benchmark's shape family (B = 64 is cut to 8 rows to keep the reference loop cheap):
    # T = 8192 spans 4 CUDA chunks / 8 Triton chunks; reference computed on the CPU
    steps = 8192
    rewards = torch.zeros(8, steps)
    rewards[:, -1] = torch.randn(8)
    rewards -= 0.05 * torch.rand(8, steps)  # a per-token KL penalty
    values = torch.randn(8, steps)
    mask = _random_mask(8, steps, "cpu")
    mask[3, 2040:2060] = False  # across a CUDA chunk border
    ref_adv, ref_ret = reference.gae(rewards, values, mask, 1.0, 0.95)
    adv, ret = fastalign.gae(rewards.to(device), values.to(device), mask.to(device), gamma=1.0, lam=0.95, backend=backend)
    e_adv, e_ret = _gae_bounds(rewards, values, mask, 1.0, 0.95)
    assert_within(adv, ref_adv, 2 * e_adv, "advantages, T = 8192")
    assert_within(ret, ref_ret, 2 * e_ret, "returns, T = 8192")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_hand_computed(backend, device):
    # gamma = lam = 0.5, mask [1, 0, 1] (step 1 an observation token):
    #   t=2: delta = 1 - 0.125 = 0.875;              A = 0.875;            ret = 1.0
    #   t=1: skipped (outputs 0; V = 0.125 and A = 0.875 carry through)
    #   t=0: delta = 0 + 0.5*0.125 - 0.5 = -0.4375;  A = -0.4375 + 0.25*0.875 = -0.21875; ret = 0.28125
    rewards = torch.tensor([[0.0, 123.0, 1.0]], device=device)
    values = torch.tensor([[0.5, -77.0, 0.125]], device=device)
    mask = torch.tensor([[1, 0, 1]], device=device)
    adv, ret = fastalign.gae(rewards, values, mask, gamma=0.5, lam=0.5, backend=backend)
    assert adv.tolist() == [[-0.21875, 0.0, 0.875]]
    assert ret.tolist() == [[0.28125, 0.0, 1.0]]
    # defaults gamma = lam = 1: A_t = (sum of rewards from t on) - v_t over valid steps
    adv, ret = fastalign.gae(rewards, values, mask, backend=backend)
    assert adv.tolist() == [[1.0 - 0.5, 0.0, 1.0 - 0.125]]
    assert ret.tolist() == [[1.0, 0.0, 1.0]]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mask_dtypes_nonzero_is_valid(backend, device):
    # 6 rows: the cpp scan takes rows four at a time, then one at a time
    rewards, values = torch.randn(6, 9, device=device), torch.randn(6, 9, device=device)
    valid = _random_mask(6, 9, device)
    expected = fastalign.gae(rewards, values, valid, gamma=0.9, lam=0.8, backend=backend)
    as_float = valid.float() * torch.rand(6, 9, device=device).clamp(min=0.1)  # any nonzero is valid
    for mask in (valid.to(torch.uint8), valid.to(torch.int32), valid.long(), as_float, -as_float.double()):
        got = fastalign.gae(rewards, values, mask, gamma=0.9, lam=0.8, backend=backend)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


# ---- the peers' formulas ------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.0, 1.0)])
def test_all_ones_mask_is_trls_loop(backend, device, gamma, lam):
    rewards, values = torch.randn(4, 50, device=device), torch.randn(4, 50, device=device)
    ones = torch.ones(4, 50, dtype=torch.bool, device=device)
    adv, ret = fastalign.gae(rewards, values, ones, gamma=gamma, lam=lam, backend=backend)
    trl_adv, trl_ret = trl_gae_loop(rewards, values, gamma, lam)
    e_adv, e_ret = _gae_bounds(rewards, values, ones, gamma, lam)
    assert_within(adv, trl_adv, 2 * e_adv, "advantages vs TRL")
    assert_within(ret, trl_ret, 2 * e_ret, "returns vs TRL")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masked_semantics_match_verl_multi_turn(backend, device):
    # prompt-free response of 12 tokens: turn 1 (0-3), tool observation (4-6), turn 2 (7-9),
    # padding (10-11). Rewards on the last token of each turn; garbage rewards and values on the
    # observation and padding tokens, which must not matter.
    rewards = torch.zeros(2, 12, device=device)
    rewards[:, 3], rewards[:, 9] = torch.tensor([0.3, -0.2]), torch.tensor([1.0, 0.5])
    values = torch.randn(2, 12, device=device)
    mask = torch.ones(2, 12, device=device)
    mask[:, 4:7] = 0
    mask[:, 10:] = 0
    rewards[:, 4:7] = 5.0
    values[:, 10:] = -9.0
    mask[1, 0] = 0  # a leading masked token too
    gamma, lam = 0.99, 0.95
    adv, ret = fastalign.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    v_adv, v_ret = verl_gae_loop(rewards, values, mask, gamma, lam)
    valid = mask != 0
    e_adv, e_ret = _gae_bounds(rewards, values, mask, gamma, lam)
    assert_within(adv[valid], v_adv[valid], 2 * e_adv[valid.cpu()], "advantages vs verl")
    assert_within(ret[valid], v_ret[valid], 2 * e_ret[valid.cpu()], "returns vs verl")
    # the one documented difference: at masked steps verl leaves the carried advantage, we give 0
    assert (adv[~valid] == 0).all() and (ret[~valid] == 0).all()
    assert (v_adv[0, 4:7] == v_adv[0, 7]).all()
    # and the skipping really matters: the plain unmasked loop (TRL) disagrees on turn 1, by more
    # than rounding can explain (TRL's own bound: all steps valid)
    ones = torch.ones_like(mask)
    e_trl = _gae_bounds(rewards, values, ones, gamma, lam)[0][0, :4] + e_adv[0, :4]
    diff = (adv[0, :4] - trl_gae_loop(rewards, values, gamma, lam)[0][0, :4]).abs().double().cpu()
    assert (diff > e_trl).any(), (diff, e_trl)


# ---- edge cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_at_masked_steps_is_ignored_and_at_valid_steps_stays_in_its_row(backend, device):
    # 5 rows: rows 0-3 go through the cpp scan's four-row path, row 4 through the single-row one
    rewards, values = torch.randn(5, 10, device=device), torch.randn(5, 10, device=device)
    mask = torch.ones(5, 10, dtype=torch.bool, device=device)
    mask[0, 5] = False
    mask[4, 2] = False
    rewards[4, 2] = float("nan")
    rewards[0, 5] = float("nan")
    values[0, 5] = float("inf")
    rewards[1, 6] = float("nan")  # valid: poisons steps 0..6 of row 1 (the scan runs backward)
    adv, ret = _check(backend, device, rewards, values, mask, 0.9, 0.9)
    assert adv[0].isfinite().all() and ret[0].isfinite().all()
    assert adv[1, :7].isnan().all() and adv[1, 7:].isfinite().all()
    assert adv[2].isfinite().all() and adv[3].isfinite().all() and adv[4].isfinite().all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_gradient_and_inputs_untouched(backend, device):
    rewards = torch.randn(2, 6, device=device, requires_grad=True)
    values = torch.randn(2, 6, device=device, requires_grad=True)
    mask = _random_mask(2, 6, device)
    snapshots = [t.detach().clone() for t in (rewards, values, mask)]
    adv, ret = fastalign.gae(rewards, values, mask, gamma=0.9, lam=0.9, backend=backend)
    assert not adv.requires_grad and not ret.requires_grad
    for t, s in zip((rewards, values, mask), snapshots):
        assert torch.equal(t.detach(), s)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mixed_dtypes_and_non_contiguous(backend, device):
    base = torch.randn(7, 5, device=device)
    rewards = base.t()  # [5, 7], non-contiguous
    values = torch.randn(5, 14, device=device).to(torch.bfloat16)[:, ::2]
    mask = _random_mask(7, 5, device).t()
    assert not rewards.is_contiguous() and not values.is_contiguous()
    _check(backend, device, rewards, values, mask, 0.95, 0.9)
    _check(backend, device, rewards.half(), values.half(), mask, 0.95, 0.9)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_inputs(backend, device):
    for shape in [(0, 5), (3, 0), (0, 0)]:
        adv, ret = fastalign.gae(
            torch.zeros(shape, device=device), torch.zeros(shape, device=device),
            torch.ones(shape, dtype=torch.bool, device=device), backend=backend,
        )
        assert adv.shape == shape and ret.shape == shape and adv.dtype == torch.float32


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend, device):
    r, v = torch.randn(2, 4, device=device), torch.randn(2, 4, device=device)
    m = torch.ones(2, 4, dtype=torch.bool, device=device)
    g = fastalign.gae
    with pytest.raises(ValueError, match="values must have the shape of rewards"):
        g(r, v[:, :3], m, backend=backend)
    with pytest.raises(ValueError, match="mask must have the shape of rewards"):
        g(r, v, m[:1], backend=backend)
    with pytest.raises(ValueError, match=r"rewards must be 2-D \[B, T\]"):
        g(r[0], v[0], m[0], backend=backend)
    with pytest.raises(TypeError, match="rewards must be float32"):
        g(r.long(), v, m, backend=backend)
    with pytest.raises(TypeError, match="values must be float32"):
        g(r, v.double(), m, backend=backend)
    with pytest.raises(TypeError, match="mask must be bool or a real"):
        g(r, v, m.to(torch.complex64), backend=backend)
    with pytest.raises(TypeError, match="mask must be a tensor"):
        g(r, v, [[1] * 4] * 2, backend=backend)
    for bad in (-0.1, 1.5, float("nan"), float("inf"), True, "0.9", None):
        with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
            g(r, v, m, gamma=bad, backend=backend)
        with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\]"):
            g(r, v, m, lam=bad, backend=backend)


def test_device_mismatch_and_backend_errors():
    r, v, m = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask is on meta but rewards on cpu"):
        fastalign.gae(r, v, m.to("meta"))
    with pytest.raises(ValueError, match="values is on meta"):
        fastalign.gae(r, v.to("meta"), m)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastalign.gae(r, v, m, backend="jax")
    if not fastalign.backends()["cuda"]["usable"]:
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run cpu tensors"):
            fastalign.gae(r, v, m, backend="cuda")


@pytest.mark.skipif(not fastalign.backends()["triton"]["usable"], reason="Triton not usable here")
def test_raw_triton_op_rejects_bad_arguments():
    # The raw fastalign_triton::gae_fwd used to launch on any arguments: a short values tensor was
    # read out of bounds, a float mask reinterpreted, gamma = 2 silently computed.
    op = torch.ops.fastalign_triton.gae_fwd
    r, m = torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="one shape and device"):
        op(r, r[:1], m, 1.0, 1.0)
    with pytest.raises(TypeError, match="mask must be bool"):
        op(r, r, m.float(), 1.0, 1.0)
    with pytest.raises(TypeError, match="one dtype"):
        op(r, r.half(), m, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"2-D \[B, T\]"):
        op(r[0], r[0], m[0], 1.0, 1.0)
    with pytest.raises(ValueError, match=r"gamma and lam must be in \[0, 1\]"):
        op(r, r, m, 2.0, 1.0)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "torch-cpu"])
def test_opcheck(backend, device):
    from fastalign.ops import gae as G

    op = G._triton_op() if backend == "triton" else G._OPS[backend]
    rewards, values = torch.randn(3, 11, device=device), torch.randn(3, 11, device=device)
    mask = _random_mask(3, 11, device)
    torch.library.opcheck(op, (rewards, values, mask, 0.99, 0.95))
    torch.library.opcheck(op, (rewards[:, :1], values[:, :1], mask[:, :1], 1.0, 1.0))
    if backend == "cpp":  # the cpp kernel also takes float and int64 masks as they are
        torch.library.opcheck(op, (rewards, values, mask.float(), 0.99, 0.95))
        torch.library.opcheck(op, (rewards, values, mask.long(), 0.99, 0.95))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    def step(rewards, values, mask):
        adv, ret = fastalign.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend)
        return adv * 2, ret.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    rewards, values = torch.randn(3, 17, device=device), torch.randn(3, 17, device=device)
    mask = _random_mask(3, 17, device)
    got, want = compiled(rewards, values, mask), step(rewards, values, mask)
    # two evaluations (inductor may fuse the torch backend's loop and reorder the sum), each within
    # its bound of the exact values: adv * 2 within 2 e_adv (doubling is exact), the sum of returns
    # within the returns' bounds plus gamma(N) of their magnitudes
    e_adv, e_ret = _gae_bounds(rewards, values, mask, 0.99, 0.95)
    ret = reference.gae(rewards, values, mask, 0.99, 0.95)[1].double().cpu()  # |exact| <= |ret| + e_ret
    e_sum = e_ret.sum() + gamma_n(rewards.numel()) * (ret.abs() + e_ret).sum()
    assert_within(got[0], want[0], 2 * 2 * e_adv, "compiled advantages")
    assert_within(got[1], want[1], 2 * e_sum, "compiled sum of returns")



_COMPILE_SCRIPT = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from fastalign.kernels.triton import gae as K

for dtype in ("fp32", "bf16", "fp16"):
    for steps_type in ("i32", "i64"):
        sig = {"r_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "m_ptr": "*u8", "adv_ptr": "*fp32", "ret_ptr": "*fp32",
               "T": steps_type, "gamma": "fp32", "gamma_lam": "fp32", "BLOCK": "constexpr"}
        sig = {name: sig[name] for name in K._gae_kernel.arg_names}
        for block in (16, 256, 1024):
            src = ASTSource(K._gae_kernel, sig, constexprs={"BLOCK": block})
            options = {"num_warps": K._warps_for(block)}
            assert compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]
print("compiled")
"""


@requires_nvidia_compiler
def test_triton_kernel_compiles_for_sm90_without_a_gpu():
    # The interpreter does not exercise Triton's compiler (loop-carried types, scan lowering):
    # compile the kernel to a cubin for sm_90, in a process without TRITON_INTERPRET.
    run_triton_compile_script(_COMPILE_SCRIPT, timeout=300)


def test_environment_overrides_auto(monkeypatch):
    # FASTALIGN_BACKEND replaces "auto" (fastalign/_backends.py): "torch" must reach the reference loop, and an
    # unusable backend must fail as if it had been asked for explicitly
    r, v, m = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bool)
    calls = []
    real = reference.gae
    monkeypatch.setattr(reference, "gae", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("FASTALIGN_BACKEND", "torch")
    fastalign.gae(r, v, m)
    assert calls == [1]
    if not fastalign.backends()["cuda"]["usable"]:
        monkeypatch.setenv("FASTALIGN_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run cpu tensors"):
            fastalign.gae(r, v, m)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_expanded_stride_zero_inputs(backend, device):
    # one value baseline broadcast over the batch, a mask broadcast over rows
    rewards = torch.randn(3, 9, device=device)
    values = torch.randn(1, 9, device=device).expand(3, 9)
    mask = (torch.rand(1, 9, device=device) > 0.3).expand(3, 9)
    _check(backend, device, rewards, values, mask, 0.99, 0.95)
