"""The reference-free preference algorithms orpo, cpo and simpo (fastalign/algorithms/ref_free.py)
in the trainer: registered with no reference model, their loss is the fused op on the policy's
token log-probs with the config's parameters, short runs prefer the chosen responses, the
packaged configs train from the command line, bad configs are refused; and (slow) SimPO after
SFT beats the SFT model by the synthetic task's oracle (ORPO's learning test: open, see below).

Bounds. The wiring test compares the algorithm's loss with the op called on the same token
log-probs (the same deterministic forward) on the same backend: the same arithmetic, so equal
bits. The learning tests compare oracle scores of sampled responses (temperature 1, fixed
seeds) on the same held-out prompts; the margins are stated with the measured figures.
"""

import os
from collections import Counter

import pytest
import torch

import fastalign
from fastalign.algorithms import get_algorithm, token_logps
from fastalign.data.synthetic import Oracle, SyntheticTask
from fastalign.errors import ConfigError
from fastalign.models import load_model, tiny_model, tiny_tokenizer
from fastalign.recipes.steps import mean_and_se
from fastalign.trainer.generation import generate
from fastalign.trainer.loop import Trainer

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("orpo", "cpo", "simpo")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _pairs(alg, tok, n, seed=0):
    pairs, _ = SyntheticTask().preference_pairs(n, seed=seed)
    return alg.encode(pairs, tok, 64, Counter())


def test_registered_without_a_reference(tok):
    for name in NAMES:
        cls = get_algorithm(name)
        assert cls.name == name and cls.models == ("policy",) and cls.data_kind == "preferences"
        alg = cls()
        assert alg.required_models([]) == ("policy",) and alg.precompute_roles() == ()
        assert set(alg.build_models("tiny", tok, tiny_kwargs=TINY)) == {"policy"}


CASES = [
    ("orpo", {"beta": 0.3, "nll_weight": 0.5}, "orpo_loss_from_tokens", {"beta": 0.3, "nll_weight": 0.5}),
    ("cpo", {"beta": 0.2, "loss_type": "sigmoid", "nll_weight": 0.7, "label_smoothing": 0.1},
     "cpo_loss_from_tokens", {"beta": 0.2, "loss_type": "sigmoid", "nll_weight": 0.7, "label_smoothing": 0.1}),
    ("cpo", {"loss_type": "ipo", "beta": 0.5}, "cpo_loss_from_tokens", {"loss_type": "ipo", "beta": 0.5}),
    ("cpo", {"loss_type": "simpo", "simpo_gamma": 0.3, "average_log_prob": True}, "cpo_loss_from_tokens",
     {"loss_type": "simpo", "simpo_gamma": 0.3, "average_log_prob": True}),
    ("simpo", {"beta": 2.5, "gamma": 0.7, "nll_weight": 0.2}, "simpo_loss_from_tokens",
     {"beta": 2.5, "gamma": 0.7, "nll_weight": 0.2}),
]


@pytest.mark.parametrize("name,cfg,op,kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_loss_is_the_op_on_the_policy_token_logps(tok, name, cfg, op, kwargs):
    alg = get_algorithm(name)(cfg)
    policy = tiny_model(tok, seed=0, **TINY)
    exs = _pairs(alg, tok, 12)
    batch = alg.collate(exs, tok)
    loss_sum, metrics = alg.loss({"policy": policy}, batch)
    assert alg.loss_units(batch) == batch["input_ids"].shape[0] // 2 == len(exs) > 2
    logps, mask = token_logps(policy, batch)
    out = getattr(fastalign, op)(logps, mask, **kwargs)
    assert torch.equal(loss_sum, out.losses.sum())
    want = {"loss": out.losses.detach().mean(), "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(), "nll": out.nll.mean(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "logps/chosen": out.chosen_logps.mean(), "logps/rejected": out.rejected_logps.mean()}
    if name == "orpo":
        want["log_odds_ratio"] = torch.nn.functional.logsigmoid(out.logits).mean()
    for k, v in want.items():
        assert metrics[k] == float(v), k
    assert set(metrics) == set(want) | {"log_odds"} and metrics["log_odds"] == metrics["log_odds"]
    loss_sum.backward()  # the gradient reaches the policy
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


@pytest.mark.parametrize("name,cfg", [("orpo", {"beta": 1.0}), ("cpo", {"beta": 0.5}), ("cpo", {"loss_type": "ipo"}),
                                      ("simpo", {})])
def test_short_run_lowers_the_loss_and_widens_the_margin(tok, tmp_path, name, cfg):
    # 30 steps of 8 pairs from an untrained tiny model (measured: orpo loss 5.34 -> 3.83, margin
    # 0.012 -> 0.072; cpo 7.19 -> 5.14, -0.467 -> -0.325; cpo ipo 29.5 -> 26.5, 0.001 -> 0.027;
    # simpo 0.96 -> 0.77, 0.024 -> 0.521): the loss falls, the chosen pull away from the rejected,
    # and where the loss has an NLL term the chosen NLL falls
    alg = get_algorithm(name)(cfg)
    data = _pairs(alg, tok, 200)
    tr = Trainer(alg, {"policy": tiny_model(tok, seed=0, **TINY)}, tok, data, data[:64], dict(
        output_dir=str(tmp_path), max_steps=30, batch_size=8, lr=3e-3, warmup_steps=2, progress=False, plot=False))
    before = tr.evaluate()
    after = tr.fit()["eval"]
    assert after["loss"] < before["loss"] and after["rewards/margins"] > before["rewards/margins"], (before, after)
    if name != "simpo":
        assert after["nll"] < before["nll"], (before, after)


@pytest.mark.parametrize("config,algo", [("orpo", "orpo"), ("simpo", "simpo")])
def test_cli_trains_from_packaged_config(tmp_path, config, algo, capsys):
    from fastalign import cli

    rc = cli.main(["train", algo, "--config", config, f"trainer.output_dir={tmp_path}", "trainer.max_steps=2",
                   "data.train_size=16", "data.eval_size=4", "trainer.progress=false", "trainer.plot=false"])
    assert rc == 0 and "done at step 2" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "metrics.jsonl")


def test_packaged_configs_resolve():
    from fastalign.trainer.run import load_config, resolve_config

    for name, algo in (("orpo", "orpo"), ("simpo", "simpo"), ("orpo_smollm2", "orpo")):
        resolved = resolve_config(algo, load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), []))
        get_algorithm(algo)(resolved["algo"])


@pytest.mark.parametrize("name,bad,match", [
    ("orpo", {"beta": 0}, "beta must be > 0"),
    ("orpo", {"nll_weight": -1}, "nll_weight must be >= 0"),
    ("orpo", {"loss_type": "sigmoid"}, "loss_type"),
    ("cpo", {"loss_type": "robust"}, "loss_type must be one of"),
    ("cpo", {"label_smoothing": 0.5}, "label_smoothing must be in"),
    ("cpo", {"average_log_prob": "yes"}, "average_log_prob must be true or false"),
    ("simpo", {"gamma": "big"}, "gamma must be a number"),
    ("simpo", {"beta": -2}, "beta must be > 0"),
])
def test_config_errors(name, bad, match):
    with pytest.raises(ConfigError, match=match):
        get_algorithm(name)(bad)


# ---- learning (slow): the oracle's score of sampled responses -----------------------------------------

from tests.test_rl_algorithms import sft_dir  # noqa: E402,F401  (the module-scoped SFT model)



def _oracle_scores(model, tok, n=512, seed=5):
    """The oracle's score of one response per held-out prompt, sampled at temperature 1."""
    prompts = [r["prompt"] for r in SyntheticTask().sample(n, seed=seed)]
    texts, _, _ = generate(model, tok, prompts, temperature=1.0, max_new_tokens=24, seed=seed + 1, device="cpu")
    return [Oracle.score(p, t) for p, t in zip(prompts, texts)]


def _gain(after, before):
    """Mean paired gain (same prompts, same sampling seed) and its standard error."""
    return mean_and_se([a - b for a, b in zip(after, before)])


def _train(alg, model, tok, data, tmp_path, **kw):
    cfg = dict(output_dir=str(tmp_path), batch_size=32, progress=False, plot=False, save_total_limit=1)
    cfg.update(kw)
    torch.manual_seed(0)
    Trainer(alg, {"policy": model}, tok, data, None, cfg).fit()
    return model


# ORPO from the untrained model against the SFT model (open, no test yet): on the SFT model's 4000
# demonstrations each paired with a fresh corruption (oracle-labelled), the same steps, batch and
# learning rate as SFT (150 x 32, 3e-3), measured 2026-12-08 on 512 prompts, paired against SFT's
# 0.356: beta 0.5 -> 0.373 (+0.017 +- 0.017), beta 1 -> 0.329 (-0.027), beta 2 -> 0.294 (-0.062).
# Not beyond noise: a learning test needs another recipe (more steps, on-policy pairs).


@pytest.mark.slow
def test_simpo_after_sft_beats_sft(tok, tmp_path, sft_dir):  # noqa: F811
    # From the SFT model, on 2000 oracle-labelled pairs of the synthetic task (an answer or a
    # corruption against another corruption), no reference model; with an NLL term on the chosen
    # responses (nll_weight 1, TRL's cpo_alpha): plain SimPO drifts on this tiny model, as plain
    # DPO does in the demo. Measured (2-core CPU, 2026-12-08; 512 prompts, paired): SFT 0.356;
    # SimPO with nll_weight 1: 0.411, gain +0.056 +- 0.016; plain SimPO (nll_weight 0): 0.331,
    # -0.024 +- 0.017. The margin 0.035 is about 1.3 standard errors below the measured gain.
    alg = get_algorithm("simpo")({"beta": 2.0, "gamma": 0.5, "nll_weight": 1.0})
    data = _pairs(alg, tok, 2000, seed=3)
    model = _train(alg, load_model(sft_dir), tok, data, tmp_path, max_steps=60, lr=5e-4, warmup_steps=10)
    sft, simpo = _oracle_scores(load_model(sft_dir), tok), _oracle_scores(model, tok)
    gain, se = _gain(simpo, sft)
    assert gain > 0.035, (sum(sft) / len(sft), sum(simpo) / len(simpo), gain, se)
