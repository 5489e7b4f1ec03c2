"""The online algorithms (ppo, grpo) in the trainer: they learn the synthetic task from a reward,
resume exactly, refuse NaN rewards without updating, validate their options, log the monitors.

Bounds. Resume and refusal checks are exact (the same arithmetic on the same inputs). The adaptive
KL coefficient is a few Python-float operations on each side: a relative bound of gamma(10) in
fp64 (see that test). GRPO's k3 metric is checked against the k3 formula in fp64 on the very
inputs of the loss (k3_error: the fp32 subtraction, exp and two subtractions), and "policy ==
reference on the first step" exactly: the rollout's policy and reference log-probs are the same
computation on the same batch.
"""

import math
from collections import Counter

import pytest
import torch

from fastalign.algorithms import get_algorithm
from fastalign.data.synthetic import Oracle, SyntheticTask
from fastalign.models import ScalarHeadModel, load_model, tiny_model, tiny_tokenizer
from fastalign.trainer.loop import Trainer, TrainingDivergedError
from tests.numerics import EXP_ULPS, assert_within, f64, gamma, sum_bound, unit_roundoff

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


U32 = unit_roundoff(torch.float32)
FN = 2 * EXP_ULPS * U32  # one exp/log/log1p: EXP_ULPS ulps, and one ulp of x is at most 2 u |x|


def k3_error(d, k3):
    """The error of one fp32 evaluation of k3 = exp(x) - x - 1, x = -d, d = logp - ref given as
    fp32 inputs (fp64 tensors d, k3 of the exact values): d rounds (u |d|, which moves k3 by
    |exp(x) - 1| u |d|), exp costs F exp(x) (F = 2 EXP_ULPS u: EXP_ULPS ulps, one ulp <= 2u|x|),
    the two subtractions u |exp(x) - x| and u |k3|."""
    e = (-d).exp()
    return (e - 1).abs() * U32 * d.abs() + FN * e + U32 * ((e + d).abs() + k3.abs())


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _prompts(alg, tok, n, seed):
    return alg.encode(SyntheticTask().sample(n, seed=seed), tok, 64, Counter())


def _ppo_models(tok, seed=0, policy=None):
    make = (lambda: load_model(policy)) if policy else (lambda: tiny_model(tok, seed=seed, **TINY))
    return {"policy": make(), "reference": make(), "value": ScalarHeadModel(make())}


def _trainer(alg, models, tok, out, train, evald=None, **kw):
    cfg = dict(output_dir=str(out), max_steps=2, batch_size=8, lr=1e-3, warmup_steps=0, progress=False, plot=False,
               save_total_limit=1)
    cfg.update(kw)
    return Trainer(alg, models, tok, train, evald, cfg)


# ---- fast checks ----------------------------------------------------------------------------------


def test_ppo_step_logs_losses_and_monitors(tok, tmp_path):
    # 24 new tokens: enough that some of the 32 responses end at an EOS (the tiny model's EOS has
    # probability ~1% a step), so lengths vary whatever the sampler's random stream
    alg = get_algorithm("ppo")({"max_new_tokens": 24, "ppo_epochs": 2, "mini_batches": 2},
                               reward_fn=lambda p, r: float(len(r)), oracle_fn=Oracle.score)
    tr = _trainer(alg, _ppo_models(tok), tok, tmp_path, _prompts(alg, tok, 32, 0), max_steps=1)
    m = tr.fit()["train"]
    assert m["optimizer_steps"] == 4 and math.isfinite(m["loss"])
    for k in ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "explained_variance", "kl_coef",
              "rollout/reward", "rollout/kl", "rollout/entropy", "rollout/distinct_2", "rollout/length_corr",
              "rollout/oracle", "rollout/truncated", "overoptimisation"):
        assert k in m, k
    # reward = response length in characters (tokens minus EOS and undecodable specials): the
    # reward-length correlation is clearly positive
    assert m["rollout/length_corr"] > 0.2
    assert alg.models == ("policy", "reference", "value")  # no reward model with a reward_fn


def test_ppo_k3_entropy_bonus_and_early_stop(tok, tmp_path):
    # a target KL no update can stay under: the first mini-batch sees approx-KL 0 (policy == the
    # rollout policy), the second one's (measured by its own loss, before its step) exceeds
    # 1.5 * target, and the remaining 4 of the 3 epochs x 2 mini-batches are skipped
    alg = get_algorithm("ppo")({"max_new_tokens": 5, "ppo_epochs": 3, "mini_batches": 2, "kl_estimator": "k3",
                                "ent_coef": 0.01, "target_kl": 1e-12}, reward_fn=lambda p, r: float(len(r)))
    tr = _trainer(alg, _ppo_models(tok), tok, tmp_path, _prompts(alg, tok, 32, 0), max_steps=2)
    m = tr.fit()["train"]
    assert m["early_stopped"] == 1.0 and m["optimizer_steps"] == 2
    assert m["approx_kl"] > 1.5e-12 and math.isfinite(m["entropy"]) and m["entropy"] > 0
    assert m["rollout/kl"] != 0.0  # step 2: the policy has moved away from the reference


def test_ppo_with_a_reward_model(tok, tmp_path):
    alg = get_algorithm("ppo")({"max_new_tokens": 4, "ppo_epochs": 1, "mini_batches": 1})
    models = {**_ppo_models(tok), "reward": ScalarHeadModel(tiny_model(tok, seed=5, **TINY))}
    tr = _trainer(alg, models, tok, tmp_path, _prompts(alg, tok, 16, 0), max_steps=1)
    before = [p.detach().clone() for p in models["reward"].parameters()]
    m = tr.fit()["train"]
    assert math.isfinite(m["score"])
    assert all(torch.equal(a, b) for a, b in zip(before, models["reward"].parameters()))  # frozen


def _straight_and_resumed(make, tok, tmp_path):
    """make() -> (algorithm, models, trainer kwargs). Runs 4 steps straight, and 2 steps + a
    fresh process-like restart from the checkpoint for steps 3-4; returns both (models, alg)."""
    def run(out, steps, resume=None):
        torch.manual_seed(0)
        alg, models, kw = make()
        tr = _trainer(alg, models, tok, out, _prompts(alg, tok, 40, 1), max_steps=4, resume_from=resume, **kw)
        if steps < 4:
            tr.max_steps = steps
        tr.fit()
        return models, alg

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    return straight, run(tmp_path / "b", 4, resume="latest")


def test_ppo_resume_is_exact(tok, tmp_path):
    def make():
        alg = get_algorithm("ppo")({"max_new_tokens": 5, "ppo_epochs": 2, "mini_batches": 2, "adaptive_kl": True,
                                    "kl_target": 0.1, "kl_horizon": 100}, reward_fn=lambda p, r: float(len(r) % 3))
        return alg, _ppo_models(tok), {}

    (straight, alg_a), (resumed, alg_b) = _straight_and_resumed(make, tok, tmp_path)
    for role in ("policy", "value"):
        for (n, p), q in zip(straight[role].named_parameters(), resumed[role].parameters()):
            assert torch.equal(p, q), f"{role}.{n}"
    assert alg_a.kl_coef == alg_b.kl_coef != 0.05  # the adaptive coefficient is checkpointed


def test_grpo_resume_is_exact(tok, tmp_path):
    def make():
        alg = get_algorithm("grpo")({"group_size": 4, "max_new_tokens": 5, "ppo_epochs": 2, "mini_batches": 2,
                                     "beta": 0.1}, reward_fn=lambda p, r: float(len(r) % 3), oracle_fn=Oracle.score)
        models = {"policy": tiny_model(tok, seed=0, **TINY), "reference": tiny_model(tok, seed=0, **TINY)}
        return alg, models, {"batch_size": 4}

    (straight, alg_a), (resumed, alg_b) = _straight_and_resumed(make, tok, tmp_path)
    for (n, p), q in zip(straight["policy"].named_parameters(), resumed["policy"].parameters()):
        assert torch.equal(p, q), n
    assert alg_a.monitor.state_dict() == alg_b.monitor.state_dict()  # the monitor is checkpointed
    assert alg_a.monitor.count == 4


def test_nan_reward_stops_the_step_without_update(tok, tmp_path):
    alg = get_algorithm("ppo")({"max_new_tokens": 4}, reward_fn=lambda p, r: float("nan"))
    models = _ppo_models(tok)
    tr = _trainer(alg, models, tok, tmp_path, _prompts(alg, tok, 16, 0), max_steps=1)
    before = [p.detach().clone() for p in models["policy"].parameters()]
    with pytest.raises(TrainingDivergedError, match="non-finite reward"):
        tr.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, models["policy"].parameters()))
    assert tr.step == 0


def test_adaptive_kl_controller_math():
    alg = get_algorithm("ppo")({"adaptive_kl": True, "kl_coef": 0.2, "kl_target": 6.0, "kl_horizon": 10000},
                               reward_fn=lambda p, r: 0.0)
    # each side: 0.2 times one or two factors (1 + err n / horizon), every literal and operation
    # rounded once (<= 10 roundings in all, each relative to a factor of magnitude ~1: the
    # err n / horizon terms are 0.002 and 0.001, so their own roundings move the factor by less)
    alg._update_kl_coef(9.0, 100)  # KL 50% over target: error clipped to +0.2
    assert alg.kl_coef == 0.2 * (1 + 0.2 * 100 / 10000)  # the same operations in the same order
    alg._update_kl_coef(5.4, 100)  # 10% under: err = 5.4 / 6 - 1, not the literal -0.1
    want = 0.2 * (1 + 0.2 * 0.01) * (1 - 0.1 * 0.01)
    assert_within(f64(alg.kl_coef), f64(want), gamma(10, torch.float64) * want, "adaptive kl_coef")
    fixed = get_algorithm("ppo")({"kl_coef": 0.2}, reward_fn=lambda p, r: 0.0)
    fixed._update_kl_coef(100.0, 100)
    assert fixed.kl_coef == 0.2


@pytest.mark.parametrize("name,bad,match", [
    ("ppo", {"kl_estimator": "k9"}, "kl_estimator must be one of"),
    ("ppo", {"clip": 1.5}, "clip must be in"),
    ("ppo", {"temperature": 0}, "temperature must be > 0"),
    ("ppo", {"vf_clip": -1.0}, "vf_clip must be None or > 0"),
    ("ppo", {"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
    ("ppo", {"kl_coef": -0.1}, "kl_coef must be >= 0"),
    ("ppo", {"ppo_epochs": 0}, "ppo_epochs must be >= 1"),
    ("ppo", {"nope": 1}, "unknown option"),
    ("grpo", {"group_size": 1}, "group_size must be >= 2"),
    ("grpo", {"agg": "seq-sum"}, "agg must be one of"),
    ("grpo", {"scale": "rank"}, "scale must be"),
    ("grpo", {"beta": -1.0}, "beta must be >= 0"),
])
def test_config_errors(name, bad, match):
    with pytest.raises(ValueError, match=match):
        get_algorithm(name)(bad, reward_fn=lambda p, r: 0.0)


def test_ppo_needs_a_reward(tok):
    with pytest.raises(ValueError, match="needs a reward model"):
        get_algorithm("ppo")().build_models("tiny", tok, tiny_kwargs=TINY)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_grpo_step(tok, tmp_path, agg):
    from fastalign.algorithms import token_logps

    alg = get_algorithm("grpo")({"group_size": 4, "max_new_tokens": 5, "agg": agg, "beta": 0.1},
                                reward_fn=lambda p, r: float(len(r)), oracle_fn=Oracle.score)
    models = {"policy": tiny_model(tok, seed=0, **TINY), "reference": tiny_model(tok, seed=0, **TINY)}
    seen = []
    loss = alg.loss

    def checked_loss(models, batch):
        # the loss's own policy log-probs: the same forward on the same micro-batch, recomputed
        logps, _, mask = token_logps(models["policy"], batch, temperature=alg.config.temperature,
                                     return_entropy=True)
        out = loss(models, batch)
        seen.append((logps.detach(), batch["ref_logps"], batch["old_logps"], mask, out[1]["kl_k3"]))
        return out

    alg.loss = checked_loss
    tr = _trainer(alg, models, tok, tmp_path, _prompts(alg, tok, 16, 0), max_steps=1, batch_size=4)
    m = tr.fit()["train"]
    assert m["optimizer_steps"] == 1 and "kl_k3" in m and "rollout/oracle" in m and 0 <= m["zero_std_groups"] <= 1
    assert seen
    for logps, ref, old, mask, kl in seen:
        # first step: the reference is the policy (the rollout's two log-prob passes are the same
        # computation on the same batch) ...
        assert torch.equal(ref, old)
        # ... and the metric is the k3 estimator of the loss's inputs, sum over the N masked
        # tokens (masked positions: d = 0, k3 = 0 exactly) / N, in fp64 from those fp32 inputs
        d = logps.double() - ref.double()
        k3 = torch.where(mask, (-d).exp() + d - 1, 0.0)
        n = int(mask.sum())
        err = torch.where(mask, k3_error(d, k3), 0.0)
        bound = (err.sum() + sum_bound(k3.abs().sum(), k3.numel())) / n + U32 * k3.sum().abs() / n
        assert_within(f64(kl), k3.sum() / n, bound, "kl_k3")
    assert get_algorithm("grpo")({"beta": 0.0}, reward_fn=lambda p, r: 0.0).models == ("policy",)


@pytest.mark.parametrize("micro", [None, 16, 3])
def test_online_micro_batch_size(tok, tmp_path, micro):
    """algo.micro_batch_size sets the rows of each forward/backward of the update (default:
    trainer.batch_size), independently of the prompts per step: 4 prompts x group 4 = 16 rows."""
    cfg = {"group_size": 4, "max_new_tokens": 4, "beta": 0.0}
    if micro is not None:
        cfg["micro_batch_size"] = micro
    alg = get_algorithm("grpo")(cfg, reward_fn=lambda p, r: float(len(r)))
    rows, loss = [], alg.loss
    alg.loss = lambda models, batch: (rows.append(batch["input_ids"].shape[0]), loss(models, batch))[1]
    tr = _trainer(alg, {"policy": tiny_model(tok, seed=0, **TINY)}, tok, tmp_path, _prompts(alg, tok, 16, 0),
                  max_steps=1, batch_size=4)
    tr.fit()
    expect = {None: [4, 4, 4, 4], 16: [16], 3: [3, 3, 3, 3, 3, 1]}[micro]
    assert rows == expect


# ---- learning (slow: SFT first, then RL on the oracle's score) -------------------------------------


@pytest.fixture(scope="module")
def sft_dir(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    sft = get_algorithm("sft")()
    data = sft.encode(SyntheticTask().demonstrations(4000, seed=1, error_rate=0.3), tok, 64, Counter())
    torch.manual_seed(0)
    model = tiny_model(tok, seed=0, hidden_size=96, num_layers=3, num_heads=4, intermediate_size=192)
    tr = Trainer(sft, {"policy": model}, tok, data, None, dict(
        output_dir=str(out), max_steps=150, batch_size=32, lr=3e-3, warmup_steps=20, progress=False, plot=False,
        save_total_limit=1))
    tr.fit()
    return tr.model_dir("policy")


def _learns(alg, models, tok, out, **kw):
    """Oracle score of the eval samples before and after training (fixed seeds throughout)."""
    train = _prompts(alg, tok, 2000, 3)
    evald = _prompts(alg, tok, 256, 5)
    tr = _trainer(alg, models, tok, out, train, evald, **kw)
    alg.setup(tr)
    before = tr.evaluate()["oracle"]
    after = tr.fit()["eval"]["oracle"]
    return before, after


@pytest.mark.slow
def test_ppo_raises_the_oracle_score(tok, tmp_path, sft_dir):
    alg = get_algorithm("ppo")({"max_new_tokens": 24, "ppo_epochs": 2, "mini_batches": 2, "kl_coef": 0.05},
                               reward_fn=Oracle.score, oracle_fn=Oracle.score)
    before, after = _learns(alg, _ppo_models(tok, policy=sft_dir), tok, tmp_path, max_steps=60, batch_size=32,
                            grad_accum=2, lr=3e-4)
    # 256 held-out prompts, sampled at T = 1: the standard error of a mean score is ~0.02; this
    # run gave 0.368 -> 0.448 (30 steps: 0.425)
    assert after > before + 0.05, (before, after)


@pytest.mark.slow
def test_grpo_raises_the_oracle_score(tok, tmp_path, sft_dir):
    alg = get_algorithm("grpo")({"group_size": 8, "max_new_tokens": 24, "mini_batches": 2, "beta": 0.04},
                                reward_fn=Oracle.score, oracle_fn=Oracle.score)
    models = {"policy": load_model(sft_dir), "reference": load_model(sft_dir)}
    before, after = _learns(alg, models, tok, tmp_path, max_steps=40, batch_size=32, lr=3e-4)
    # 0.368 -> 0.441 (20 steps: 0.426)
    assert after > before + 0.05, (before, after)
