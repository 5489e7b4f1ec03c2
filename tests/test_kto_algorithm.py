"""The unpaired data path and the `kto` / `bco` algorithms: the `kto` JSONL format (TRL's
prompt / completion / label) with file:line errors, the synthetic task's oracle-labelled unpaired
examples, the KL batch (completions rotated by one within the batch, as TRL builds it), the
losses of one micro-batch against the ops on the models' token log-probs, BCO's running reward
shift against TRL's RunningMoments, short runs from the packaged config, and (slow) KTO after
SFT beating the SFT model by the oracle.

Bounds: the algorithm's loss is the op on token log-probs computed by the same model calls
(identical bits on the CPU), so it is compared with the composed reference (sequence sums, then
the loss) within the bounds derived in tests/test_unpaired_losses.py.
"""

import json
import os
from collections import Counter

import pytest
import torch

import fastalign
from fastalign.algorithms import get_algorithm, token_logps
from fastalign.data import collate as C
from fastalign.data.formats import DataFormatError, kind_of, load_records
from fastalign.data.synthetic import Oracle, SyntheticTask
from fastalign.errors import ConfigError
from fastalign.models import load_model, tiny_model, tiny_tokenizer
from fastalign.trainer.generation import generate
from fastalign.trainer.loop import Trainer
from tests.numerics import assert_within, gamma, unit_roundoff
from tests.test_unpaired_losses import _expected, _kl_exact, _seq_err, _seq_exact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "fastalign", "data", "bundled")
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
U32 = unit_roundoff(torch.float32)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---- data -----------------------------------------------------------------------------------------


def test_kto_format_loads_the_bundled_sample():
    records, stats = load_records("kto", os.path.join(BUNDLED, "kto_sample.jsonl"))
    assert kind_of("kto") == "unpaired"
    assert len(records) == 8 and stats["desirable"] == 4 and stats["undesirable"] == 4
    assert records[0] == {"prompt": "reverse 3 1 4", "completion": "4 1 3", "label": True}
    assert records[4]["prompt"] == [{"role": "user", "content": "repeat hi 2"}] and records[4]["completion"] == "hi hi"
    assert records[6]["label"] is True and records[7]["label"] is False  # 1 / 0


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "a", "completion": "b"}', r"bad\.jsonl:2: missing field 'label'"),
    ('{"prompt": "a", "completion": "b", "label": "false"}', r"bad\.jsonl:2: field 'label' must be true/false"),
    ('{"prompt": "a", "completion": "b", "label": 2}', r"bad\.jsonl:2: field 'label' must be true/false"),
    ('{"prompt": "a", "completion": "b", "label": 1.0}', r"bad\.jsonl:2: field 'label' must be true/false"),
    ('{"prompt": " ", "completion": "b", "label": true}', r"bad\.jsonl:2: field 'prompt' is empty"),
    ('{"completion": "b", "label": true}', r"bad\.jsonl:2: missing field 'prompt'"),
    ('{"prompt": "a", "completion": [{"role": "user", "content": "b"}], "label": true}',
     r"bad\.jsonl:2: 'completion' must end with an assistant message"),
    ('[1, 2]', r"bad\.jsonl:2: expected a JSON object"),
])
def test_kto_format_errors_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "x", "completion": "y", "label": true}\n' + line + "\n")
    with pytest.raises(DataFormatError, match=match):
        load_records("kto", str(path))


def test_kto_format_counts_empty_completions(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "x", "completion": "y", "label": false}\n{"prompt": "x", "completion": " ", "label": '
                    'true}\n')
    records, stats = load_records("kto", str(path))
    assert len(records) == 1 and stats["skipped: empty completion"] == 1


def test_synthetic_unpaired_examples_are_oracle_labelled():
    recs = SyntheticTask().unpaired_examples(400, seed=3)
    assert all(r["label"] == (Oracle.score(r["prompt"], r["completion"]) == 1.0) for r in recs)
    share = sum(r["label"] for r in recs) / len(recs)
    assert 0.35 < share < 0.65  # about desirable_rate = 0.5 (400 draws: sd 0.025)
    flipped = SyntheticTask().unpaired_examples(400, Oracle(noise=1.0, seed=3), seed=3)
    assert [r["label"] for r in flipped] == [not r["label"] for r in recs]
    assert recs == SyntheticTask().unpaired_examples(400, seed=3)  # deterministic


def test_collate_unpaired_builds_the_rotated_kl_batch(tok):
    recs = [{"prompt": f"sort {i} 1 2", "completion": " ".join(["1"] * (i + 1)), "label": i % 2 == 0}
            for i in range(3)]
    ex = C.encode_unpaired(recs, tok, 64, Counter())
    batch = C.collate_unpaired(ex, tok.pad_token_id)
    assert batch["label"].tolist() == [True, False, True]
    for i in range(3):
        p, c = ex[i]["prompt_ids"], ex[i]["completion_ids"]
        kc = ex[i - 1]["completion_ids"]  # row i: prompt i, completion i-1 (row 0: the last)
        n, k = len(p) + len(c), len(p) + len(kc)
        assert batch["input_ids"][i, :n].tolist() == p + c
        assert batch["labels"][i, :n].tolist() == [-100] * len(p) + c and (batch["labels"][i, n:] == -100).all()
        assert batch["kl_input_ids"][i, :k].tolist() == p + kc
        assert batch["kl_labels"][i, :k].tolist() == [-100] * len(p) + kc
        assert batch["kl_attention_mask"][i].sum() == k
    assert "kl_input_ids" not in C.collate_unpaired(ex, tok.pad_token_id, kl=False)


# ---- the algorithms' losses -------------------------------------------------------------------------


def _batch(alg, tok, n=6, seed=0):
    ex = alg.encode(SyntheticTask().unpaired_examples(n, seed=seed), tok, 64, Counter())
    return alg.collate(ex, tok)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_loss_equals_the_op_on_the_models_token_logps(tok, loss_type):
    alg = get_algorithm("kto")({"beta": 0.5, "loss_type": loss_type, "undesirable_weight": 1.5})
    torch.manual_seed(0)
    models = {"policy": tiny_model(tok, seed=0, **TINY), "reference": tiny_model(tok, seed=1, **TINY)}
    batch = _batch(alg, tok)
    assert ("kl_input_ids" in batch) == (loss_type == "kto")
    loss_sum, metrics = alg.loss(models, batch)
    with torch.no_grad():
        pol, mask = token_logps(models["policy"], batch)
        ref, _ = token_logps(models["reference"], batch)
    p, q = _seq_exact(pol, mask, False), _seq_exact(ref, mask, False)
    ep, eq = _seq_err(pol, mask, False), _seq_err(ref, mask, False)
    z, ez = 0.0, 0.0
    if loss_type == "kto":
        kv = {k: batch["kl_" + k] for k in ("input_ids", "attention_mask", "labels")}
        with torch.no_grad():
            kp, km = token_logps(models["policy"], kv)
            kq, _ = token_logps(models["reference"], kv)
        z, ez = _kl_exact(_seq_exact(kp, km, False), _seq_exact(kq, km, False), _seq_err(kp, km, False),
                          _seq_err(kq, km, False))
        assert_within(torch.tensor(metrics["kl"]), z, ez, "kl metric = z0")
    (el, er, _), (bl, br, _) = _expected(p, q, batch["label"], float(z), float(ez), 0.5, 1.0, 1.5, "kto")
    n = el.shape[0]
    assert_within(loss_sum.detach(), el.sum(), bl.sum() + gamma(n) * el.abs().sum(), "summed loss")
    assert alg.loss_units(batch) == n
    lab = batch["label"]
    assert_within(torch.tensor(metrics["rewards/chosen"]), er[lab].mean(), br[lab].mean() + gamma(n + 1) *
                  er[lab].abs().mean(), "rewards/chosen")
    assert_within(torch.tensor(metrics["rewards/rejected"]), er[~lab].mean(), br[~lab].mean() + gamma(n + 1) *
                  er[~lab].abs().mean(), "rewards/rejected")
    loss_sum.backward()
    assert all(p.grad is not None for p in models["policy"].parameters() if p.requires_grad)
    assert all(p.grad is None for p in models["reference"].parameters())


def test_bco_delta_follows_trl_running_moments(tok):
    alg = get_algorithm("bco")({"beta": 0.5})
    torch.manual_seed(0)
    models = {"policy": tiny_model(tok, seed=0, **TINY), "reference": tiny_model(tok, seed=1, **TINY)}
    mean, count = 0.0, 1e-24  # trl RunningMoments.__init__
    for seed in (0, 1):
        batch = _batch(alg, tok, n=5, seed=seed)
        with torch.no_grad():
            pol, mask = token_logps(models["policy"], batch)
            ref, _ = token_logps(models["reference"], batch)
            rewards = 0.5 * (fastalign.sequence_logps(pol, mask) - fastalign.sequence_logps(ref, mask))
        # RunningMoments.update: xs_mean from torch.var_mean, then mean += delta * xs_count / tot_count
        _, xs_mean = torch.var_mean(rewards, unbiased=False)
        tot = count + rewards.numel()
        mean += float(xs_mean - mean) * rewards.numel() / tot
        count = tot
        loss_sum, metrics = alg.loss(models, batch)
        # the same fp32 rewards; their mean in another order: gamma(n) sum|r| / n
        assert abs(metrics["delta"] - mean) <= 2 * gamma(6) * float(rewards.abs().mean()) + 1e-12
        # the loss at that delta: the bco formula on the same fp32 sequence log-probs (exact in fp64,
        # within one evaluation's bound, summed over the batch)
        p, q = fastalign.sequence_logps(pol, mask), fastalign.sequence_logps(ref, mask)
        d = alg.delta_mean
        (el, _, _), (bl, _, _) = _expected(p, q, batch["label"], d, U32 * abs(d), 0.5, 1.0, 1.0, "bco")
        assert_within(loss_sum.detach(), el.sum(), bl.sum() + gamma(len(el)) * el.abs().sum(), "bco summed loss")
    state = alg.state_dict()
    assert state == {"delta_mean": alg.delta_mean, "delta_count": count}
    before = alg.delta_mean

    class _Ctx:  # eval_step only needs context.models
        pass

    ctx = _Ctx()
    ctx.models = models
    alg.eval_step(ctx, _batch(alg, tok, n=5, seed=2))
    assert alg.delta_mean == before  # evaluation leaves delta alone (TRL do_train=False)
    fresh = get_algorithm("bco")()
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert fresh.state_dict() == state


def test_kto_refuses_micro_batches_of_one(tok, tmp_path):
    alg = get_algorithm("kto")()
    data = alg.encode(SyntheticTask().unpaired_examples(8, seed=0), tok, 64, Counter())
    models = {"policy": tiny_model(tok, seed=0, **TINY), "reference": tiny_model(tok, seed=0, **TINY)}
    tr = Trainer(alg, models, tok, data, None, dict(output_dir=str(tmp_path), max_steps=1, batch_size=1,
                                                    progress=False, plot=False))
    with pytest.raises(ConfigError, match="trainer.batch_size must be >= 2"):
        tr.fit()
    with pytest.raises(ConfigError):
        get_algorithm("kto")({"loss_type": "sigmoid"})


def test_short_kto_run_from_the_packaged_config(tmp_path, capsys):
    from fastalign import cli

    rc = cli.main(["train", "kto", "--config", "kto", f"trainer.output_dir={tmp_path}", "trainer.max_steps=2",
                   "trainer.batch_size=8", "data.train_size=64", "data.eval_size=16", "trainer.progress=false",
                   "trainer.plot=false"])
    assert rc == 0 and "done at step 2" in capsys.readouterr().out
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(r) for r in f]
    train = [r for r in rows if r.get("split", "train") == "train" and "loss" in r]
    assert len(train) == 2 and all("kl" in r and r["kl"] >= 0 and "rewards/margins" in r for r in train)


def test_short_bco_run(tmp_path):
    from fastalign.trainer.run import run_training

    cfg = {"model": {"policy": "tiny", "tiny": dict(TINY)},
           "data": {"format": "synthetic", "train_size": 64, "eval_size": 16, "max_length": 64},
           "algo": {"beta": 0.1},
           "trainer": {"output_dir": str(tmp_path), "max_steps": 2, "batch_size": 8, "progress": False,
                       "plot": False}}
    summary = run_training("bco", cfg)
    assert summary["eval"]["loss"] > 0 and "delta" in summary["eval"]


# ---- learning (slow): KTO after SFT beats the SFT model by the oracle ------------------------------------

from tests.test_rl_algorithms import sft_dir  # noqa: E402,F401  (the module-scoped SFT fixture)


def _oracle_score(model, tok, prompts, sample):
    """Mean oracle score of the answers to `prompts`: greedy, or sampled at T = 1 with a fixed seed."""
    texts, _, _ = generate(model, tok, prompts, max_new_tokens=24, do_sample=sample, seed=0)
    return sum(Oracle.score(p, t) for p, t in zip(prompts, texts)) / len(prompts)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 21 open: in the three setups measured (on-policy 40 steps lr 1e-4: "
                   "sampled 0.345 -> 0.343; 60 steps lr 5e-4: -> 0.260; offline answers vs corruptions: -> 0.362) "
                   "KTO did not beat SFT by +0.04; strict, so the day it passes it must be un-marked")
def test_kto_beats_the_sft_model_by_the_oracle(tok, tmp_path, sft_dir):  # noqa: F811
    # KTO's setting: binary feedback on the model's own outputs. The SFT model answers 1280 training
    # prompts (T = 1); the oracle labels each answer (desirable = correct); KTO trains on those
    # unpaired examples, desirable_weight = n_undesirable / n_desirable (the lower end of TRL's
    # recommended range, the KTO paper's eq. 8).
    base = load_model(sft_dir)
    train_prompts = [r["prompt"] for r in SyntheticTask().sample(1280, seed=11)]
    texts, _, _ = generate(base, tok, train_prompts, max_new_tokens=24, do_sample=True, seed=1)
    oracle = Oracle(seed=11)
    recs = [{"prompt": p, "completion": t, "label": oracle.label(p, t)} for p, t in zip(train_prompts, texts)
            if t.strip()]
    n_good = sum(r["label"] for r in recs)
    alg = get_algorithm("kto")({"beta": 0.1, "desirable_weight": round((len(recs) - n_good) / max(n_good, 1), 2)})
    train = alg.encode(recs, tok, 64, Counter())
    prompts = [r["prompt"] for r in SyntheticTask().sample(256, seed=5)]
    before = _oracle_score(base, tok, prompts, True)
    models = {"policy": load_model(sft_dir), "reference": load_model(sft_dir)}
    tr = Trainer(alg, models, tok, train, None, dict(output_dir=str(tmp_path), max_steps=40, batch_size=32, lr=1e-4,
                                                     warmup_steps=5, progress=False, plot=False, save_total_limit=1))
    tr.fit()
    after = _oracle_score(tr.models["policy"], tok, prompts, True)
    # 256 held-out prompts sampled at T = 1 (fixed seed): the standard error of a mean score is ~0.02,
    # of a difference ~0.03; the margin 0.04 is the RL learning tests' (test_rl_family). NOT MET YET:
    # measured on a loaded 2-core machine (2026-12-08), sampled / greedy score before -> after:
    #   this setup (on-policy, 40 steps, lr 1e-4):           0.345 -> 0.343 / 0.560 -> 0.481
    #   on-policy, 60 steps, lr 5e-4 (1920 prompts):         0.345 -> 0.260 / 0.560 -> 0.318
    #   offline answers vs corruptions (unpaired_examples),
    #   60 steps, lr 3e-4, desirable_weight 1:               0.345 -> 0.362 / 0.560 -> 0.547
    # (z0 stayed clamped at 0 throughout). An open problem: this test fails until KTO's setup is tuned.
    assert after > before + 0.04, (before, after)
