"""The fused advantage estimators (fastalign/ops/advantage_ops.py: outcome_advantage_fwd,
return_advantage_fwd) on every backend this machine runs, against the eager per-group references
(fastalign/kernels/reference_advantages.py), on fresh random inputs: random group sizes with
groups of one, unsorted non-consecutive ids, empty responses, masked steps inside responses, and
groups / rows longer than one kernel tile (Triton: 32 members, 1024 steps; CUDA: 256 steps).

Error bounds: tests/test_advantages.py's derivation (_outcome_bound, _whiten_error and the
discounted-return bound), which already covers any summation order of the scores and of every
group and batch statistic: a fused backend sums each row in lanes or tiles, each group in batch
order, and the whitening statistics as row partial sums. Each side is within the bound of the
exact value, hence the factor 2. Run-to-run and thread-count results are compared bit for bit
(the kernels fix every summation order). There is no gradient to test: the ops are forward only
(advantages are functions of rollout data).
"""

import pytest
import torch

import fastalign
from fastalign.kernels import reference_advantages as ref
from fastalign.ops import advantage_ops
from tests.conftest import backend_params, requires_nvidia_compiler, run_triton_compile_script
from tests.numerics import assert_within, gamma
from tests.test_advantages import _discounted_abs, _inputs, _outcome_bound, _whiten_error

BACKENDS = backend_params()
FUSED = [p for p in BACKENDS if p.values[0] != "torch"]
OUTCOME = ["grpo", "rloo", "opo", "reinforce_plus_plus_baseline", "grpo_passk"]


def _big_group_inputs(seed, steps=9):
    """_inputs' rewards and mask with one group of 45 members (more than a Triton tile of 32) and
    15 groups of 3, at shuffled positions under non-consecutive ids."""
    rewards, mask, _ = _inputs(seed, batch=90, steps=steps, min_group=2)
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.cat([torch.full((45,), 77_777), 1_000 - 7 * (torch.arange(45) // 3)])
    return rewards, mask, ids[torch.randperm(90, generator=g)]


def _check_outcome(kind, backend, device, rewards, mask, index, **opts):
    got = fastalign.advantages(kind, rewards.to(device), mask.to(device), index=index.to(device),
                               backend=backend, **opts)
    want = getattr(ref, kind)(rewards, mask, index, **opts)
    bound = _outcome_bound(kind, rewards, mask, index, eps=opts.get("epsilon", 1e-6),
                           norm=opts.get("norm_adv_by_std_in_grpo", True))
    for i, name in ((0, "advantages"), (1, "returns")):
        assert got[i].dtype == torch.float32 and got[i].device.type == torch.device(device).type
        assert_within(got[i].cpu(), want[i], 2 * bound, f"{kind} {name} [{backend}]")
    return got


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", OUTCOME)
@pytest.mark.parametrize("seed", [0, 1])
def test_outcome_estimators_match_reference(kind, backend, device, seed):
    rewards, mask, index = _inputs(seed, min_group=2 if kind == "grpo_passk" else 1)
    assert (mask.sum(-1) == 0).any()  # empty responses are among the inputs
    _check_outcome(kind, backend, device, rewards, mask, index)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", OUTCOME)
def test_outcome_estimators_groups_longer_than_a_tile(kind, backend, device):
    rewards, mask, index = _big_group_inputs(3)
    assert torch.unique(index, return_counts=True)[1].max() == 45
    _check_outcome(kind, backend, device, rewards, mask, index)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["grpo", "grpo_passk"])
def test_outcome_options(kind, backend, device):
    rewards, mask, index = _inputs(5, min_group=2)
    for norm in (True, False):
        _check_outcome(kind, backend, device, rewards, mask, index, epsilon=1e-3, norm_adv_by_std_in_grpo=norm)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("steps", [37, 1100])
@pytest.mark.parametrize("gamma_", [1.0, 0.9, 0.0])
def test_reinforce_plus_plus_matches_reference(backend, device, steps, gamma_):
    rewards, mask, _ = _inputs(4, batch=12 if steps > 100 else 40, steps=steps)
    mask = mask & (torch.rand(mask.shape, generator=torch.Generator().manual_seed(5)) > 0.2)  # multi-turn holes
    got = fastalign.advantages("reinforce_plus_plus", rewards.to(device), mask.to(device), gamma=gamma_,
                               backend=backend)
    e_ret = gamma(3 * steps) * _discounted_abs(rewards, mask, gamma_)
    want_ret = ref.reinforce_plus_plus(rewards.double(), mask, gamma_)[1]
    e_adv = _whiten_error(want_ret, e_ret, mask.double())
    want = ref.reinforce_plus_plus(rewards, mask, gamma_)
    assert_within(got[1].cpu(), want[1], 2 * e_ret, f"returns [{backend}]")
    assert_within(got[0].cpu(), want[0], 2 * e_adv, f"advantages [{backend}]")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("steps", [23, 1100])
def test_remax_matches_reference(backend, device, steps):
    rewards, mask, _ = _inputs(6, batch=12 if steps > 100 else 40, steps=steps)
    baselines = torch.randn(rewards.shape[0])
    got = fastalign.advantages("remax", rewards.to(device), mask.to(device), reward_baselines=baselines.to(device),
                               backend=backend)
    want = ref.remax(rewards, mask, baselines)
    e_ret = gamma(steps) * _discounted_abs(rewards, mask, 1.0)
    assert_within(got[1].cpu(), want[1], 2 * e_ret, f"returns [{backend}]")
    assert_within(got[0].cpu(), want[0], 2 * e_ret + 2 ** -24 * want[0].abs(), f"advantages [{backend}]")


@pytest.mark.parametrize("backend,device", FUSED)
def test_scores_bf16_and_mask_dtypes(backend, device):
    # [B] outcome scores go to the kernel as they are and equal the token-level path bit for bit
    # (a row sum of zeros and one score is exact); bf16 rewards are upcast exactly
    rewards, mask, index = _inputs(8)
    scores = torch.randn(rewards.shape[0])
    token = torch.zeros_like(rewards)
    lengths = mask.sum(-1)
    rows = (lengths > 0).nonzero().flatten()
    token[rows, lengths[rows] - 1] = scores[rows]
    dev = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    for kind in ("grpo", "opo", "reinforce_plus_plus"):
        opts = {"index": index.to(device)} if kind != "reinforce_plus_plus" else {}
        s, tk, m = dev(scores, token, mask)
        a = fastalign.advantages(kind, s, m, backend=backend, **opts)
        b = fastalign.advantages(kind, tk, m, backend=backend, **opts)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), kind
    r16, m, i = dev(rewards.bfloat16(), mask, index)
    got = fastalign.advantages("rloo", r16, m.float(), index=i.int(), backend=backend)
    want = fastalign.advantages("rloo", r16.float(), m, index=i, backend=backend)
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("backend,device", FUSED)
def test_deterministic_across_runs_and_threads(backend, device):
    # cpp: rows long enough for several lanes and tasks; Triton (interpreted here): shorter rows
    rewards, mask, index = _big_group_inputs(9, steps=300 if backend == "cpp" else 40)
    rewards, mask, index = rewards.to(device), mask.to(device), index.to(device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)) if backend != "cpp" else (1, max(2, threads), 1):
            torch.set_num_threads(n)
            results.append([fastalign.advantages(k, rewards, mask, index=index, backend=backend)[0]
                            for k in ("grpo", "rloo", "opo", "reinforce_plus_plus_baseline")]
                           + list(fastalign.advantages("reinforce_plus_plus", rewards, mask, gamma=0.9,
                                                       backend=backend)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))


def test_auto_picks_cpp_on_the_cpu(monkeypatch):
    if not fastalign.backends()["cpp"]["usable"]:
        pytest.skip("no C++ extension here")
    calls = []
    real = advantage_ops._outcome
    monkeypatch.setattr(advantage_ops, "_outcome", lambda kind, r, m, g, backend, *a: calls.append(backend)
                        or real(kind, r, m, g, backend, *a))
    rewards, mask, index = _inputs(2)
    fastalign.advantages("grpo", rewards, mask, index=index)
    fastalign.advantages("grpo", rewards, mask, index=index, backend="torch")  # the torch composition
    assert calls == ["cpp"]


# ---- the raw ops -----------------------------------------------------------------------------------


def _raw_args(backend, device):
    rewards, mask, index = _inputs(0, min_group=2)  # finite for every kind (passk: NaN on a group of one)
    group = fastalign.ops.advantage_estimators.dense_group_ids(index)
    return rewards.to(device), mask.to(device), group.to(device)


@pytest.mark.parametrize("backend,device", FUSED)
def test_opcheck(backend, device):
    rewards, mask, group = _raw_args(backend, device)
    outcome = advantage_ops.OUTCOME_ADVANTAGE.kernels(backend)[0]
    returns = advantage_ops.RETURN_ADVANTAGE.kernels(backend)[0]
    # every kind on cpp; on the (slow) interpreted Triton the kinds with their own code paths
    for kind in range(5) if backend != "triton" or device != "cpu" else (0, 3, 4):
        torch.library.opcheck(outcome, (rewards, mask, group, kind, 1e-6, True))
    torch.library.opcheck(outcome, (rewards[:, :1], mask, group, 0, 1e-6, False))  # [B, 1] scores
    torch.library.opcheck(returns, (rewards, mask, None, 0.9, 0))
    torch.library.opcheck(returns, (rewards, mask, torch.randn(rewards.shape[0], device=device), 1.0, 1))


# torch.compile(fullgraph=True) of the fused kinds: tests/test_advantages.py test_torch_compile_fullgraph


@pytest.mark.parametrize("backend,device", FUSED)
def test_raw_ops_refuse_bad_input(backend, device):
    rewards, mask, group = _raw_args(backend, device)
    outcome = advantage_ops.OUTCOME_ADVANTAGE.kernels(backend)[0]
    returns = advantage_ops.RETURN_ADVANTAGE.kernels(backend)[0]
    errors = (RuntimeError, ValueError, TypeError, IndexError)
    with pytest.raises(errors, match="kind"):
        outcome(rewards, mask, group, 7, 1e-6, True)
    with pytest.raises(errors, match="group"):
        outcome(rewards, mask, group[:-1], 0, 1e-6, True)
    with pytest.raises(errors, match="rewards"):  # rows of rewards and mask disagree
        outcome(rewards, mask[:, :3].T.contiguous(), group, 0, 1e-6, True)
    with pytest.raises(errors, match="kind"):
        returns(rewards, mask, None, 1.0, 5)
    with pytest.raises(errors, match="baselines"):
        returns(rewards, mask, None, 1.0, 1)
    with pytest.raises(errors, match="gamma"):
        returns(rewards, mask, None, 1.5, 0)
    if backend == "cpp":  # the ids are host memory: checked (the bucket writes)
        bad = group.clone()
        bad[3] = rewards.shape[0]
        with pytest.raises(IndexError, match=r"group\[3\]"):
            outcome(rewards, mask, bad, 0, 1e-6, True)


def test_public_backend_refusals():
    rewards, mask, index = _inputs(1)
    with pytest.raises(ValueError, match="backend"):
        fastalign.advantages("grpo", rewards, mask, index=index, backend="nope")
    from fastalign.ops.advantages import ADVANTAGE_ESTIMATORS

    try:
        fastalign.register_advantage_estimator("test_plugin_torch_only", lambda r, m, g: (r, r))
        with pytest.raises(ValueError, match="not implemented for this op"):
            fastalign.advantages("test_plugin_torch_only", rewards, mask, index=index, backend="cpp")
        out = fastalign.advantages("test_plugin_torch_only", rewards, mask, index=index)  # auto: torch
        assert torch.equal(out[0], rewards)
    finally:
        ADVANTAGE_ESTIMATORS.pop("test_plugin_torch_only", None)


_COMPILE_SCRIPT = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from fastalign.kernels.triton import advantages as K

target = GPUTarget("cuda", 90, 32)
def build(kernel, sig, constexprs, warps=4):
    sig = {name: sig[name] for name in kernel.arg_names}
    src = ASTSource(kernel, sig, constexprs=constexprs)
    assert compile(src, target=target, options={"num_warps": warps}).asm["cubin"]

for dtype in ("fp32", "bf16"):
    build(K._row_kernel, {"r_ptr": f"*{dtype}", "m_ptr": "*u8", "score_ptr": "*fp32", "len_ptr": "*fp32", "K": "i32",
                          "T": "i32", "NEED_LEN": "constexpr", "BLOCK": "constexpr"}, {"NEED_LEN": True, "BLOCK": 512})
    for remax in (False, True):
        build(K._scan_kernel, {"r_ptr": f"*{dtype}", "m_ptr": "*u8", "base_ptr": "*fp32", "ret_ptr": "*fp32",
                               "adv_ptr": "*fp32", "rowsum_ptr": "*fp32", "T": "i32", "gamma": "fp32",
                               "REMAX": "constexpr", "BLOCK": "constexpr"}, {"REMAX": remax, "BLOCK": 1024})
for kind in range(5):
    for norm in (False, True):
        build(K._group_kernel, {"score_ptr": "*fp32", "len_ptr": "*fp32", "order_ptr": "*i64", "start_ptr": "*i64",
                                "count_ptr": "*i64", "a_ptr": "*fp32", "eps": "fp32", "B": "i32", "KIND": "constexpr",
                                "NORM": "constexpr", "MEMBERS": "constexpr"},
              {"KIND": kind, "NORM": norm, "MEMBERS": K.MEMBERS})
build(K._fill_kernel, {"a_ptr": "*fp32", "m_ptr": "*u8", "out_ptr": "*fp32", "T": "i32", "BLOCK": "constexpr"},
      {"BLOCK": 512})
build(K._sqdev_kernel, {"ret_ptr": "*fp32", "m_ptr": "*u8", "mean_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32",
                        "BLOCK": "constexpr"}, {"BLOCK": 512})
build(K._whiten_kernel, {"ret_ptr": "*fp32", "m_ptr": "*u8", "stats_ptr": "*fp32", "adv_ptr": "*fp32", "T": "i32",
                         "BLOCK": "constexpr"}, {"BLOCK": 512})
print("compiled")
"""


@requires_nvidia_compiler
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    # the interpreter never runs Triton's compiler (loop-carried types, scan lowering, constexpr
    # branches): compile every kernel to a cubin for sm_90 in a process without TRITON_INTERPRET
    run_triton_compile_script(_COMPILE_SCRIPT, timeout=600)
