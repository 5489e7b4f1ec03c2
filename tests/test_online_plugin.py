"""A new online algorithm is one short file: the example plugin's RLOO
(tests/example_plugin/fastalign_example_plugin/rloo.py), found through its entry point, trains,
computes its leave-one-out advantages, resumes exactly and logs the monitors -- everything but
its advantages inherited from fastalign.algorithms.OnlineAlgorithm / CriticFreeAlgorithm.

Bounds. The advantage check is exact against the same fp32 expression and, against the fp64
formula, within one rounding of the division and one of the subtraction (integer scores: the
sums are exact). Resume is exact (the same arithmetic on the same inputs).
"""

import math
import os

import torch

from fastalign.algorithms import get_algorithm
from fastalign.data.synthetic import Oracle
from fastalign.models import tiny_model
from tests.numerics import assert_within, f64, unit_roundoff
from tests.test_algorithms import example_plugin  # noqa: F401 (the installed plugin, a fixture)
from tests.test_rl_algorithms import TINY, _prompts, _straight_and_resumed, _trainer, tok  # noqa: F401

PLUGIN_FILE = os.path.join(os.path.dirname(__file__), "example_plugin", "fastalign_example_plugin", "rloo.py")
U32 = unit_roundoff(torch.float32)


def _rloo(**cfg):
    return get_algorithm("rloo-example")({"group_size": 4, "max_new_tokens": 5, **cfg},
                                         reward_fn=lambda p, r: float(len(r) % 3), oracle_fn=Oracle.score)


def test_an_online_algorithm_is_one_short_file():
    with open(PLUGIN_FILE) as f:
        assert len(f.read().splitlines()) <= 80


def test_rloo_plugin_step(tok, tmp_path, example_plugin):  # noqa: F811
    alg = _rloo(beta=0.1)
    seen = []
    advantages = alg.advantages

    def recorded(context, rollout):
        out = advantages(context, rollout)
        seen.append((rollout.scores.clone(), rollout.mask.clone(), out["advantages"]))
        return out

    alg.advantages = recorded
    models = {"policy": tiny_model(tok, seed=0, **TINY), "reference": tiny_model(tok, seed=0, **TINY)}
    tr = _trainer(alg, models, tok, tmp_path, _prompts(alg, tok, 16, 0), max_steps=1, batch_size=4)
    m = tr.fit()["train"]
    assert m["optimizer_steps"] == 1 and math.isfinite(m["loss"]) and "kl_k3" in m and "rollout/oracle" in m
    assert alg.models == ("policy", "reference")  # no reward model with a reward_fn
    (scores, mask, adv), = seen
    s = scores.view(-1, 4)
    same = (s - (s.sum(1, keepdim=True) - s) / 3).reshape(-1, 1) * mask
    assert torch.equal(adv, same)
    # the leave-one-out formula in fp64: r_i - mean of the others
    s64 = f64(s)
    others = (s64.sum(1, keepdim=True) - s64) / 3
    want = (s64 - others).reshape(-1, 1) * mask
    bound = (U32 * (others.abs() + (s64 - others).abs())).reshape(-1, 1) * mask
    assert_within(f64(adv), want, bound, "rloo advantages")


def test_rloo_plugin_resume_is_exact(tok, tmp_path, example_plugin):  # noqa: F811
    def make():
        models = {"policy": tiny_model(tok, seed=0, **TINY), "reference": tiny_model(tok, seed=0, **TINY)}
        return _rloo(beta=0.05, ppo_epochs=2, mini_batches=2), models, {"batch_size": 4}

    (straight, alg_a), (resumed, alg_b) = _straight_and_resumed(make, tok, tmp_path)
    for (n, p), q in zip(straight["policy"].named_parameters(), resumed["policy"].parameters()):
        assert torch.equal(p, q), n
    assert alg_a.monitor.state_dict() == alg_b.monitor.state_dict() and alg_a.monitor.count == 4
