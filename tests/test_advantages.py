"""fastalign.advantages: every built-in estimator against (a) its eager per-group reference
(fastalign/kernels/reference_advantages.py) and (b) verl's formula as written in verl's source,
verl/trainer/ppo/core_algos.py (the functions named in each `verl_*` of
fastalign/benchmarks/_peers.py and `_verl_*` below), re-derived with verl's Python loop over
samples and its dict of groups; plus bad inputs, the registry and
torch.compile.

Error bounds (tests/numerics.py's model, computed in fp64 from the test's actual inputs): both
sides are fp32 evaluations of the same formula, so they may differ by the sum of their errors
against the exact result (the factor 2 below). Scores s = sum_t r_t are the same torch op on the
same tensor on both sides (bit-identical), so the errors start at the group statistics:
  * a group mean of n scores: e_mu = gamma(n) sum|s| / n; a deviation d = s - mean:
    e_d = e_mu + u (|d| + e_mu);
  * the unbiased std of a group: its deviations' errors move it by at most max e_d sqrt(n/(n-1))
    (the triangle inequality for the 2-norm), the sum of n squares, the division and sqrt by
    gamma(n + 3) of it; dividing by (std + eps) then costs e_d / den + |A| (e_std / den + u);
  * rloo: A = n/(n-1) d (or s minus the mean of the others): n/(n-1) e_d + gamma(3) |A|
    + gamma(n) sum|s| / (n-1) (the leave-one-out sum);
  * opo: the baseline sum(|y| s) / sum|y| of n products: gamma(n + 2) sum |y||s| / sum|y|;
  * the discounted returns: the sequential loop and the doubling scan both sum the same terms
    gamma^(s-t) r_s with T roundings at most (and coefficient products of at most 2 log2 T
    roundings): gamma(3 T) D_t, D_t the same sum of |terms| (REMAX: gamma(T) D_t);
  * the batch whitening of reinforce_plus_plus(_baseline): tests/test_kl_whiten.py's derivation
    with the inputs' own errors e_x added to the mean's (see _whiten_error).
Results whose intermediates are exact (all-equal integer scores, the same code on the same
inputs) are compared bit for bit.
"""

from collections import defaultdict

import pytest
import torch

import fastalign
from fastalign.benchmarks import _peers
from fastalign.kernels import reference_advantages as ref
from fastalign.ops import advantage_ops
from fastalign.ops.advantages import ADVANTAGE_ESTIMATORS
from tests.conftest import backend_params
from tests.numerics import EXP_ULPS, assert_within, gamma, unit_roundoff

U = unit_roundoff(torch.float32)
GROUP_KINDS = ["grpo", "rloo", "reinforce_plus_plus_baseline", "opo", "grpo_passk"]


# ---- verl's formulas, re-derived from verl/trainer/ppo/core_algos.py ---------------------------
# grpo, rloo, reinforce_plus_plus(_baseline), opo, grpo_passk, remax and masked_whiten live in
# fastalign/benchmarks/_peers.py (one copy, also the benchmark's verl contender); gpg, gdpo and
# optimal_token_baseline below.

_verl_whiten, _verl_groups = _peers.verl_whiten, _peers.verl_groups
_verl_grpo, _verl_reinforce_plus_plus, _verl_remax = _peers.verl_grpo, _peers.verl_reinforce_plus_plus, _peers.verl_remax
VERL = _peers.VERL_OUTCOME



# ---- inputs and bounds ---------------------------------------------------------------------------


def _inputs(seed, batch=40, steps=9, min_group=1):
    """Token-level rewards (a random score on the last response token plus small per-token shaping),
    a prefix mask with some empty responses, and unordered, non-consecutive (negative too) group ids
    with groups of min_group..6 members, always one group of 3 whose scores are all equal (exactly
    1) and, for min_group=1, one group of one."""
    g = torch.Generator().manual_seed(seed)
    sizes = [3] if min_group > 1 else [3, 1]
    total = sum(sizes)
    while total < batch:
        size = min(int(torch.randint(min_group, 7, (1,), generator=g)), batch - total)
        if size < min_group:
            sizes[-1] += size
        else:
            sizes.append(size)
        total += size
    ids = torch.randperm(10_000, generator=g)[: len(sizes)] - 5_000
    index = torch.cat([torch.full((s,), int(i)) for s, i in zip(sizes, ids)])
    index = index[torch.randperm(batch, generator=g)]
    lengths = torch.randint(0, steps + 1, (batch,), generator=g)
    lengths[0] = steps
    mask = torch.arange(steps) < lengths.unsqueeze(-1)
    rewards = 0.1 * torch.randn(batch, steps, generator=g) * mask
    rewards[:, -1] += torch.randn(batch, generator=g)
    same = index == int(ids[0])  # the group of three: every score exactly 1 (exact sums)
    rewards[same] = 0.0
    rewards[same, 0] = 1.0
    return rewards, mask, index


def _group_stats(scores, index):
    """fp64 per-sample (n, mean, sum|s|, std) of each sample's group."""
    s = scores.double()
    same = index.unsqueeze(0) == index.unsqueeze(1)
    n = same.sum(-1).double()
    mean = (same * s).sum(-1) / n
    abs_sum = (same * s.abs()).sum(-1)
    var = (same * (s.unsqueeze(0) - mean.unsqueeze(-1)) ** 2).sum(-1) / (n - 1).clamp(min=1)
    return n, mean, abs_sum, var.sqrt(), same


def _std_division_error(d, e_d, n, std, same, eps):
    """Error of d / (std + eps) with d's error e_d and the group std's own error."""
    max_e = (same * e_d.unsqueeze(0)).amax(-1)
    e_std = max_e * (n / (n - 1).clamp(min=1)).sqrt() + torch.tensor([gamma(int(k) + 3) for k in n]) * std
    den = std + eps
    a = d.abs() / den
    return e_d / den + a * (e_std / den + U)


def _whiten_error(x, e_x, mask, eps=1e-8):
    """Bound of fp32 masked whitening of x (fp64 exact values, own errors e_x) times the mask,
    tests/test_kl_whiten.py's _whiten_bounds with e_x added to the centred values' error."""
    valid = mask.bool()
    n = int(valid.sum())
    xv = torch.where(valid, x, 0.0)
    mu = xv.sum() / n
    c = x - mu
    dm = torch.where(valid, c, 0.0)
    ssq = (dm * dm).sum()
    var = ssq / (n - 1)
    s = (var + eps).rsqrt()
    e_mu = gamma(n) * xv.abs().sum() / n + torch.where(valid, e_x, 0.0).amax()
    e_c = e_x + e_mu + gamma(1) * (c.abs() + e_mu)
    e_cmax = torch.where(valid, e_c, 0.0).amax()
    e_var = (gamma(n + 3) * (ssq + n * e_cmax**2) + 2 * e_cmax * dm.abs().sum() + n * e_cmax**2) / (n - 1)
    rho = (e_var + gamma(2) * (var + eps)) / (var + eps)
    rel_s = rho + EXP_ULPS * U
    e_out = s * ((1 + rel_s) * (1 + U) * e_c + c.abs() * (U + rel_s * (1 + U)))
    return torch.where(valid, e_out, 0.0)


def _outcome_bound(kind, rewards, mask, index, eps=1e-6, norm=True):
    """Per-element [B, T] bound on |fp32 result - exact| for the outcome estimators. The scores
    are fp32 sums of K = T terms in a backend's own order (torch's vectorised sum, the fused
    kernels' lanes or tiles): e_s = gamma(K) sum_k |r_k| each, carried into the group mean (its
    average over the group) and every deviation."""
    s = rewards.double().sum(-1)
    e_s = gamma(max(rewards.shape[1], 1)) * rewards.double().abs().sum(-1)
    n, mean, abs_sum, std, same = _group_stats(s, index)
    single = n < 2
    d = s - torch.where(single, 0.0, mean)
    e_mu = torch.where(single, 0.0, torch.tensor([gamma(int(k)) for k in n]) * abs_sum / n + (same * e_s).sum(-1) / n)
    e_d = e_mu + e_s + U * (d.abs() + e_mu + e_s)
    if kind == "grpo":
        e = _std_division_error(d, e_d, n, torch.where(single, 1.0, std), same, eps) if norm else e_d
    elif kind == "rloo":
        k = n / (n - 1).clamp(min=1)
        e = torch.where(single, e_s, k * e_d + gamma(3) * (k * d).abs()
                        + torch.tensor([gamma(int(j)) for j in n]) * abs_sum / (n - 1).clamp(min=1))
    elif kind == "opo":
        lengths = mask.double().sum(-1)
        total = (same * lengths).sum(-1)
        e = torch.where(single | (total == 0), 0.0, torch.tensor([gamma(int(j) + 2) for j in n])
                        * (same * (lengths * s).abs()).sum(-1) / total.clamp(min=1)
                        + (same * lengths * e_s).sum(-1) / total.clamp(min=1))
        e = e + e_s + U * (s.abs() + e + e_s)
    elif kind == "grpo_passk":
        top = torch.where(same, s.unsqueeze(0), -torch.inf).topk(2, dim=-1).values
        gap = top[:, 0] - top[:, 1]
        e_gap = U * gap.abs() + 2 * (same * e_s).amax(-1)  # the two scores' own errors
        e = _std_division_error(gap, e_gap, n, std, same, eps) if norm else e_gap
    elif kind == "reinforce_plus_plus_baseline":
        m = mask.double()
        return _whiten_error(d.unsqueeze(-1) * m, e_d.unsqueeze(-1) * m, m)
    return e.unsqueeze(-1) * mask


def _check_both(kind, got, rewards, mask, index, bound, **opts):
    want_ref = getattr(ref, kind)(rewards, mask, index, **opts)
    want_verl = VERL[kind](rewards.clone(), mask, index, **opts)
    for name, w in (("reference", want_ref), ("verl", want_verl)):
        assert_within(got[0], w[0], 2 * bound, f"{kind} advantages vs {name}")
        assert_within(got[1], w[1], 2 * bound, f"{kind} returns vs {name}")


# ---- estimators against the references -----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["grpo", "rloo", "reinforce_plus_plus_baseline", "opo"])
def test_group_estimators_match_reference_and_verl(kind, seed):
    rewards, mask, index = _inputs(seed)
    counts = torch.unique(index, return_counts=True)[1]
    assert (counts == 1).any() and (counts > 2).any()  # the inputs have the cases named in _inputs
    got = fastalign.advantages(kind, rewards, mask, index=index)
    _check_both(kind, got, rewards, mask, index, _outcome_bound(kind, rewards, mask, index))
    same = (rewards.sum(-1) == 1) & ((rewards != 0).sum(-1) == 1)  # the all-equal group: 0, bit for bit
    assert same.sum() >= 3
    if kind != "reinforce_plus_plus_baseline":
        assert torch.equal(got[0][same], torch.zeros_like(got[0][same]))


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_without_std_is_dr_grpo_and_epsilon(norm):
    rewards, mask, index = _inputs(3)
    got = fastalign.advantages("grpo", rewards, mask, index=index, epsilon=1e-3, norm_adv_by_std_in_grpo=norm)
    bound = _outcome_bound("grpo", rewards, mask, index, eps=1e-3, norm=norm)
    _check_both("grpo", got, rewards, mask, index, bound, epsilon=1e-3, norm_adv_by_std_in_grpo=norm)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_passk(seed, norm):
    rewards, mask, index = _inputs(seed, min_group=2)
    got = fastalign.advantages("grpo_passk", rewards, mask, index=index, norm_adv_by_std_in_grpo=norm)
    bound = _outcome_bound("grpo_passk", rewards, mask, index, norm=norm)
    _check_both("grpo_passk", got, rewards, mask, index, bound, norm_adv_by_std_in_grpo=norm)
    winners = (got[0].abs().sum(-1) > 0).sum()
    assert winners <= len(torch.unique(index)) - 1  # one per group at most, none in the tied group


def _discounted_abs(rewards, mask, gamma_):
    """fp64 D_t: the sum of |terms| of each return (the sequential loop on |r|)."""
    return ref.reinforce_plus_plus(rewards.double().abs(), mask, gamma_)[1]


@pytest.mark.parametrize("gamma_", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("holes", [False, True])
def test_reinforce_plus_plus(gamma_, holes):
    rewards, mask, _ = _inputs(4, steps=37)
    if holes:  # masked steps inside responses (multi-turn): the return restarts after each
        mask = mask & (torch.rand(mask.shape, generator=torch.Generator().manual_seed(5)) > 0.2)
    got = fastalign.advantages("reinforce_plus_plus", rewards, mask, gamma=gamma_)
    e_ret = gamma(3 * rewards.shape[1]) * _discounted_abs(rewards, mask, gamma_)
    want_ret = ref.reinforce_plus_plus(rewards.double(), mask, gamma_)[1]
    e_adv = _whiten_error(want_ret, e_ret, mask.double())
    for name, want in (("reference", ref.reinforce_plus_plus(rewards, mask, gamma_)),
                       ("verl", _verl_reinforce_plus_plus(rewards, mask, gamma_))):
        assert_within(got[1], want[1], 2 * e_ret, f"returns vs {name}")
        assert_within(got[0], want[0], 2 * e_adv, f"advantages vs {name}")


def test_remax():
    rewards, mask, _ = _inputs(6, steps=23)
    baselines = torch.randn(rewards.shape[0])
    got = fastalign.advantages("remax", rewards, mask, reward_baselines=baselines)
    e_ret = gamma(rewards.shape[1]) * _discounted_abs(rewards, mask, 1.0)
    for name, want in (("reference", ref.remax(rewards, mask, baselines)),
                       ("verl", _verl_remax(rewards, mask, baselines))):
        assert_within(got[1], want[1], 2 * e_ret, f"returns vs {name}")
        assert_within(got[0], want[0], 2 * e_ret + U * want[0].abs(), f"advantages vs {name}")


def test_gae_delegates_to_fastalign_gae():
    rewards, mask, _ = _inputs(7)
    values = torch.randn(rewards.shape)
    adv, ret = fastalign.advantages("gae", rewards, mask, values=values, gamma=0.9, lam=0.8)
    want_adv, want_ret = fastalign.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.equal(ret, want_ret)
    assert torch.equal(adv, fastalign.masked_whiten(want_adv, mask))  # the same code: bit for bit
    raw, _ = fastalign.advantages("gae", rewards, mask, values=values, gamma=0.9, lam=0.8, whiten=False)
    assert torch.equal(raw, want_adv)


def test_outcome_scores_go_on_the_last_response_token():
    rewards, mask, index = _inputs(8)
    scores = torch.randn(rewards.shape[0])
    token = torch.zeros_like(rewards)
    lengths = mask.sum(-1)
    rows = (lengths > 0).nonzero().flatten()
    token[rows, lengths[rows] - 1] = scores[rows]
    for kind in ("grpo", "reinforce_plus_plus"):
        opts = {"index": index} if kind == "grpo" else {}
        a = fastalign.advantages(kind, scores, mask, **opts)
        b = fastalign.advantages(kind, token, mask, **opts)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_deterministic_and_order_of_index_values_irrelevant():
    rewards, mask, index = _inputs(9)
    a = fastalign.advantages("grpo", rewards, mask, index=index)
    b = fastalign.advantages("grpo", rewards, mask, index=index)
    assert torch.equal(a[0], b[0])
    # another labelling of the same groups, in another order: each group's members are still summed
    # in batch order, so the result is the same bit for bit
    relabelled = (index * 7919) % 10_007 - 4_000
    c = fastalign.advantages("grpo", rewards, mask, index=relabelled)
    assert torch.equal(a[0], c[0])


def test_empty_batches_dtypes_and_int32_index():
    for kind in GROUP_KINDS:
        empty_index = torch.zeros(0, dtype=torch.long)
        adv, ret = fastalign.advantages(kind, torch.zeros(0, 5), torch.zeros(0, 5), index=empty_index)
        assert adv.shape == ret.shape == (0, 5)
    adv, _ = fastalign.advantages("reinforce_plus_plus", torch.zeros(3, 0), torch.zeros(3, 0))
    assert adv.shape == (3, 0)
    rewards, mask, index = _inputs(13)
    want = fastalign.advantages("grpo", rewards.bfloat16().float(), mask, index=index)
    got = fastalign.advantages("grpo", rewards.bfloat16(), mask.float(), index=index.int())
    assert got[0].dtype == torch.float32
    assert torch.equal(got[0], want[0])  # bf16 is upcast exactly; the mask dtype and index width change nothing


# ---- registry and bad inputs ----------------------------------------------------------------------


def test_custom_estimator_registered_and_used():
    from fastalign.ops.advantage_estimators import group_count

    def group_max_baseline(rewards, mask, group, *, scale=1.0):
        scores = rewards.sum(-1)
        top = torch.full_like(scores, -torch.inf).scatter_reduce(0, group, scores, "amax")[group]
        adv = scale * (scores - top) / group_count(group)
        return adv.unsqueeze(-1) * mask, adv.unsqueeze(-1) * mask

    try:
        fastalign.register_advantage_estimator("test_group_max", group_max_baseline)
        rewards, mask, index = _inputs(10)
        adv, _ = fastalign.advantages("test_group_max", rewards, mask, index=index, scale=2.0)
        s = rewards.sum(-1)
        want = torch.stack([2.0 * (s[i] - s[index == index[i]].max()) / (index == index[i]).sum()
                            for i in range(len(s))])
        # the same correctly rounded element-wise ops in the same order: equal bit for bit
        assert torch.equal(adv, want.unsqueeze(-1) * mask)
        with pytest.raises(ValueError, match="test_group_max.*overwrite"):
            fastalign.register_advantage_estimator("test_group_max", group_max_baseline)
        fastalign.register_advantage_estimator("test_group_max", group_max_baseline, overwrite=True)
        with pytest.raises(TypeError, match="index"):
            fastalign.advantages("test_group_max", rewards, mask)
    finally:
        ADVANTAGE_ESTIMATORS.pop("test_group_max", None)


def test_registry_refusals():
    with pytest.raises(ValueError, match="built-in estimator 'grpo'"):
        fastalign.register_advantage_estimator("grpo", lambda *a: a, overwrite=True)
    with pytest.raises(TypeError, match="fn must be callable"):
        fastalign.register_advantage_estimator("x", 3)
    with pytest.raises(TypeError, match="name"):
        fastalign.register_advantage_estimator("", lambda *a: a)
    try:
        fastalign.register_advantage_estimator("test_bad_shape", lambda r, m, g: (r[:, :1], r))
        with pytest.raises(RuntimeError, match="advantages of shape"):
            fastalign.advantages("test_bad_shape", torch.zeros(2, 3), torch.ones(2, 3), index=torch.arange(2))
    finally:
        ADVANTAGE_ESTIMATORS.pop("test_bad_shape", None)


@pytest.mark.parametrize("call, error, match", [
    (lambda r, m, i: fastalign.advantages("nope", r, m, index=i), ValueError, "unknown kind 'nope'"),
    (lambda r, m, i: fastalign.advantages("grpo", r, m), TypeError, "needs index"),
    (lambda r, m, i: fastalign.advantages("grpo", r, m, index=i.float()), TypeError, "index must be an integer"),
    (lambda r, m, i: fastalign.advantages("grpo", r, m, index=i.tolist()), TypeError, "index must be an integer"),
    (lambda r, m, i: fastalign.advantages("grpo", r, m, index=i[:-1]), ValueError, "index must have shape"),
    (lambda r, m, i: fastalign.advantages("grpo", r.long(), m, index=i), TypeError, "rewards must be float"),
    (lambda r, m, i: fastalign.advantages("reinforce_plus_plus", r, m, index=i[:3]), ValueError, "index must have"),
    (lambda r, m, i: fastalign.advantages("grpo", r[:, :-1], m, index=i), ValueError, "rewards must have shape"),
    (lambda r, m, i: fastalign.advantages("grpo", r[None], m, index=i), ValueError, "rewards must be"),
    (lambda r, m, i: fastalign.advantages("grpo", r, m[0], index=i), ValueError, "response_mask must be a 2-D"),
    (lambda r, m, i: fastalign.advantages("grpo", r, m.tolist(), index=i), TypeError, "response_mask must be a tensor"),
    (lambda r, m, i: fastalign.advantages("grpo", r, m, index=i, epsilon=0.0), ValueError, "epsilon"),
    (lambda r, m, i: fastalign.advantages("grpo", r, m, index=i, norm_adv_by_std_in_grpo="no"), TypeError,
     "norm_adv_by_std_in_grpo"),
    (lambda r, m, i: fastalign.advantages("grpo", r, m, index=i, gamma=0.9), TypeError, "does not take"),
    (lambda r, m, i: fastalign.advantages("reinforce_plus_plus", r, m, gamma=1.5), ValueError, "gamma"),
    (lambda r, m, i: fastalign.advantages("remax", r, m), TypeError, "reward_baselines"),
    (lambda r, m, i: fastalign.advantages("remax", r, m, reward_baselines=torch.zeros(3)), ValueError,
     "reward_baselines must have shape"),
    (lambda r, m, i: fastalign.advantages("gae", r, m), TypeError, "values"),
    (lambda r, m, i: fastalign.advantages("gae", r, m, values=r[:, :-1]), ValueError, "values must have"),
    (lambda r, m, i: fastalign.advantages("grpo_passk", r, m, index=i), ValueError, "at least 2"),
    (lambda r, m, i: fastalign.advantages("gpg", r, m, index=i, f_norm=0.0), ValueError, "f_norm"),
    (lambda r, m, i: fastalign.advantages("gpg", r, m, index=i, backend="cpp"), ValueError, "not implemented"),
    (lambda r, m, i: fastalign.advantages("gdpo", r, m, index=i, reward_components=[r[:, 0], r[:3, 0]]),
     ValueError, r"reward_components\[1\] must be"),
    (lambda r, m, i: fastalign.advantages("gdpo", r, m, index=i, reward_components=[r[:, 0]], reward_weights=[1, 2]),
     ValueError, "reward_weights must be 1"),
    (lambda r, m, i: fastalign.advantages("gdpo", r, m, index=i, reward_components=[]), TypeError, "non-empty"),
    (lambda r, m, i: fastalign.advantages("optimal_token_baseline", r, m, index=i, sum_pi_squared=r), TypeError,
     "old_log_probs"),
    (lambda r, m, i: fastalign.advantages("optimal_token_baseline", r, m, index=i, old_log_probs=r[:, 1:],
                                          sum_pi_squared=r), ValueError, "old_log_probs must have shape"),
])
def test_bad_inputs_name_the_argument(call, error, match):
    rewards, mask, index = _inputs(11)
    index[0] = 123_456  # a group of one (grpo_passk refuses it)
    with pytest.raises(error, match=match):
        call(rewards, mask, index)


# ---- torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("kind", sorted(ADVANTAGE_ESTIMATORS))
def test_torch_compile_fullgraph(kind, backend, device):
    """Every estimator's torch composition, and on each fused backend the kinds with a fused
    kernel (fastalign/ops/advantage_ops.py FUSED, and gae on fastalign.gae's kernels; the others
    are torch only: a fused backend is refused for them)."""
    if backend != "torch" and kind not in advantage_ops.FUSED and kind != "gae":
        pytest.skip(f"{kind} is torch only (its composition is tested with backend torch)")
    torch._dynamo.reset()
    rewards, mask, index = _inputs(12, batch=16, steps=8, min_group=2)
    opts = {"remax": {"reward_baselines": torch.randn(16)}, "gae": {"values": torch.randn(16, 8)},
            "optimal_token_baseline": {"old_log_probs": -torch.rand(16, 8), "sum_pi_squared": torch.rand(16, 8)},
            "gdpo": {"reward_components": [torch.randn(16), torch.randn(16)], "reward_weights": [1.0, 0.5]},
            }.get(kind, {})
    if ADVANTAGE_ESTIMATORS[kind].needs_index:
        opts["index"] = index
    rewards, mask = rewards.to(device), mask.to(device)
    opts = {k: ([t.to(device) for t in v] if isinstance(v, list) and isinstance(v[0], torch.Tensor)
                else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}

    def step(r, m, **kw):
        return fastalign.advantages(kind, r, m, backend=backend, **kw)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(rewards, mask, **opts), step(rewards, mask, **opts)
    # aot_eager runs the same kernels in the same order (the fused ones fix their summation order
    # and dense_group_ids is exact integer work): equal bit for bit
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- gpg, gdpo, optimal_token_baseline (verl's further estimators; torch backend) ------------------


def _verl_gpg(r, mask, index, f_norm=1.0):
    """compute_gpg_outcome_advantage: alpha = B / count_nonzero(scores), A = alpha (s - mean) / f_norm."""
    scores = r.sum(-1)
    alpha = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1)
    id2score, _ = _verl_groups(scores, index)
    id2mean = {g: torch.mean(torch.stack(v)) if len(v) > 1 else torch.tensor(0.0) for g, v in id2score.items()}
    for i in range(scores.shape[0]):
        scores[i] = alpha * (scores[i] - id2mean[int(index[i])]) / f_norm
    out = scores.unsqueeze(-1) * mask
    return out, out


def _verl_gdpo(r, mask, index, components, weights, epsilon=1e-6):
    """compute_gdpo_outcome_advantage: grpo of each reward component ([B] scores placed on the last
    response token, as verl's non_tensor_batch path does), weighted sum, masked_whiten * mask."""
    new = None
    for w, comp in zip(weights, components):
        token = torch.zeros_like(r)
        token[:, -1] = comp  # any one position: grpo sums the row
        a, _ = _verl_grpo(token, mask, index, epsilon)
        new = w * a if new is None else new + w * a
    m = mask.float()
    out = _verl_whiten(new, m) * m
    return out, out


def _verl_otb(r, mask, index, lp, sp, handle_zero_tail=True, epsilon=1e-8):
    """compute_optimal_token_baseline_advantage."""
    m = mask.float()
    returns = (r * m).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    w_cum = ((1 - 2 * torch.exp(lp) + sp) * m).cumsum(dim=-1)
    groups = defaultdict(list)
    for i in range(r.shape[0]):
        groups[int(index[i])].append(i)
    baselines = torch.zeros_like(returns)
    for members in groups.values():
        if len(members) == 1:
            continue
        idx = torch.tensor(members)
        num = (returns[idx] * w_cum[idx] * m[idx]).sum(dim=0)
        den = (w_cum[idx] * m[idx]).sum(dim=0) + epsilon
        baselines[idx] = (num / den).unsqueeze(0).expand(len(members), -1)
        if handle_zero_tail:
            lengths = m[idx].sum(dim=-1)
            ranked = torch.sort(lengths).values
            top = (lengths == ranked[-1]).nonzero(as_tuple=True)[0]
            if top.numel() == 1 and ranked[-1] > ranked[-2]:
                baselines[members[int(top[0])], int(ranked[-2]):] = 0.0
    return (returns - baselines) * m, returns


@pytest.mark.parametrize("f_norm", [1.0, 2.5])
def test_gpg(f_norm):
    rewards, mask, index = _inputs(20)
    rewards[:5] = 0.0  # responses without a signal: alpha = B / (B - 5 or fewer)
    got = fastalign.advantages("gpg", rewards, mask, index=index, f_norm=f_norm)
    s = rewards.double().sum(-1)
    alpha = len(s) / int((rewards.sum(-1) != 0).sum())
    exact = ref.gpg(rewards.double(), mask, index, f_norm)[0]
    bound = alpha / f_norm * _outcome_bound("grpo", rewards, mask, index, norm=False) + 3 * U * exact.abs()
    for name, want in (("reference", ref.gpg(rewards, mask, index, f_norm)),
                       ("verl", _verl_gpg(rewards.clone(), mask, index, f_norm))):
        assert_within(got[0], want[0], 2 * bound, f"gpg vs {name}")
        assert_within(got[1], want[1], 2 * bound, f"gpg returns vs {name}")


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, -2.0]])
def test_gdpo(weights):
    rewards, mask, index = _inputs(21)
    g = torch.Generator().manual_seed(22)
    comps = [torch.randn(len(index), generator=g), (torch.rand(len(index), generator=g) > 0.5).float(),
             torch.randn(len(index), generator=g) * 3]
    w = weights or [1.0, 1.0, 1.0]
    got = fastalign.advantages("gdpo", rewards, mask, index=index, reward_components=comps, reward_weights=weights)
    # bound: each component's grpo error, the weighted sum (C products and C - 1 additions), then
    # the batch whitening with those errors
    rows = torch.ones(len(index), 1, dtype=torch.bool)
    e_sum, exact = torch.zeros(len(index), dtype=torch.float64), torch.zeros(len(index), dtype=torch.float64)
    terms = []
    for wk, c in zip(w, comps):
        a = ref.grpo(c.double().unsqueeze(-1), rows, index)[0][:, 0]
        e_sum += abs(wk) * _outcome_bound("grpo", c.unsqueeze(-1), rows, index)[:, 0]
        terms.append(wk * a)
        exact += wk * a
    e_sum += gamma(len(comps) + 1) * torch.stack(terms).abs().sum(0)
    m = mask.double()
    bound = _whiten_error(exact.unsqueeze(-1) * m, e_sum.unsqueeze(-1) * m, m)
    for name, want in (("reference", ref.gdpo(rewards, mask, index, comps, w)),
                       ("verl", _verl_gdpo(rewards, mask, index, comps, w))):
        assert_within(got[0], want[0], 2 * bound, f"gdpo vs {name}")
    # without components: one component, the token rewards themselves
    one = fastalign.advantages("gdpo", rewards, mask, index=index)
    assert_within(one[0], ref.gdpo(rewards, mask, index)[0], 1e-5, "gdpo of the rewards alone")


def _otb_inputs(seed):
    rewards, mask, index = _inputs(seed, steps=13)
    g = torch.Generator().manual_seed(seed + 1)
    lp = -3 * torch.rand(rewards.shape, generator=g) - 0.01  # pi_t = exp(lp) in (0.05, 0.99)
    pi = lp.exp()
    sp = pi**2 + (1 - pi**2) * torch.rand(rewards.shape, generator=g)  # sum_v pi_v^2 in [pi_t^2, 1]
    return rewards, mask, index, lp, sp


def _otb_bound(rewards, mask, index, lp, sp, handle_zero_tail=True):
    """Bound on the fp32 error of optimal_token_baseline, first order plus the cross terms, computed
    in fp64: returns G (a reverse cumulative sum: gamma(T) D_t), w = 1 - 2 exp(lp) + sp (exp within
    EXP_ULPS ulps, two additions), W its masked cumulative sum, the group sums of G W and W
    (gamma(n) of the sums of magnitudes plus the summands' own errors), the division, G - b."""
    steps = rewards.shape[1]
    m = mask.double()
    big_g = ref.remax(rewards.double(), mask, torch.zeros(len(index), dtype=torch.float64))[1]
    e_g = gamma(steps) * _discounted_abs(rewards, mask, 1.0)
    pi = lp.double().exp()
    w = 1 - 2 * pi + sp.double()
    e_w = 4 * EXP_ULPS * U * pi + 2 * U * (1 + 2 * pi + sp.double())
    big_w = (w * m).cumsum(-1)
    e_bw = (e_w * m).cumsum(-1) + gamma(steps) * (w.abs() * m).cumsum(-1)
    same = (index.unsqueeze(0) == index.unsqueeze(1)).double()  # [B, B]
    n = same.sum(-1)
    p = big_g * big_w * m
    e_p = (big_g.abs() * e_bw + big_w.abs() * e_g + e_g * e_bw + gamma(2) * p.abs()) * m
    num, den = same @ p, same @ (big_w * m) + 1e-8
    e_num = same @ e_p + torch.tensor([gamma(int(k) + 1) for k in n]).unsqueeze(-1) * (same @ p.abs())
    e_den = same @ (e_bw * m) + torch.tensor([gamma(int(k) + 2) for k in n]).unsqueeze(-1) * (same @ (big_w * m) + 1e-8)
    b = num / den
    e_b = (e_num + b.abs() * e_den) / (den - e_den) + U * b.abs()
    want = ref.optimal_token_baseline(rewards.double(), mask, index, lp.double(), sp.double(),
                                      handle_zero_tail=handle_zero_tail)
    zeroed = (want[0] - (big_g * m)).abs() == 0  # no baseline there: groups of one, the zeroed tail
    e_b = torch.where(zeroed | (n < 2).unsqueeze(-1), 0.0, e_b)
    return (e_g + e_b + U * (want[0].abs() + e_g + e_b)) * m, e_g


@pytest.mark.parametrize("handle_zero_tail", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_optimal_token_baseline(seed, handle_zero_tail):
    rewards, mask, index, lp, sp = _otb_inputs(seed)
    got = fastalign.advantages("optimal_token_baseline", rewards, mask, index=index, old_log_probs=lp,
                               sum_pi_squared=sp, handle_zero_tail=handle_zero_tail)
    bound, e_ret = _otb_bound(rewards, mask, index, lp, sp, handle_zero_tail)
    other = fastalign.advantages("optimal_token_baseline", rewards, mask, index=index, old_log_probs=lp,
                                 sum_pi_squared=sp, handle_zero_tail=not handle_zero_tail)
    assert not torch.equal(got[0], other[0])  # the inputs have a group whose longest response is unique
    for name, want in (("reference", ref.optimal_token_baseline(rewards, mask, index, lp, sp,
                                                                handle_zero_tail=handle_zero_tail)),
                       ("verl", _verl_otb(rewards, mask, index, lp, sp, handle_zero_tail))):
        assert_within(got[1], want[1], 2 * e_ret, f"otb returns vs {name}")
        assert_within(got[0], want[0], 2 * bound, f"otb advantages vs {name}")
