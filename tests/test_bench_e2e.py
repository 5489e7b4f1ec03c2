"""The end-to-end benchmark's harness (fastalign/benchmarks/e2e.py and its _e2e_* helpers).

Fast tests, on the tiny model: which runs a selection plans; the data every contender gets
(SFT / DPO sequences truncated to exactly seq_len by fastalign's own encoding, GRPO prompts within
prompt_len); the median, tokens/s and the issue's PASS/FAIL thresholds computed from given step
times; `generate` held to exactly the requested new tokens although EOS comes first; an override
the installed fastalign does not know reported as "not available" (not a crash); and one child
process of fastalign's trainer end to end. The slow test runs `fastalign bench --e2e-quick` on
SmolLM2-135M-Instruct: every contender measured, TRL stock and patched losses equal within the
bound of the patch's own tests.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import torch

from fastalign.benchmarks import _e2e_data, _e2e_fastalign, _e2e_report, e2e
from fastalign.benchmarks._e2e_steps import StepLog


def _args(*argv):
    return e2e._args(list(argv))[1]


def test_plan_selects_cases_and_runs_each_once():
    args = _args("--e2e", "--model", "tiny", "--cases", "dpo,rollout fp32 batch 64")
    runs = e2e.plan(args, e2e.settings_of(args), "cpu")
    ids = [r["id"] for r in runs]
    assert len(ids) == len(set(ids))
    # the main contenders in both precisions, the variants in fp32 (the CPU default), both rollout sizes filtered
    expected = {f"dpo {p} {c}" for p in ("bf16", "fp32") for c in e2e.CONTENDERS}
    expected |= {f"dpo fp32 fastalign + {v}" for v in e2e.VARIANTS} | {"rollout fp32 batch 64"}
    assert set(ids) == expected
    # the rollout cases in bf16 (both engines on the bf16 model), selected by precision as the training ones
    bf16 = e2e.plan(_args("--e2e", "--model", "tiny", "--cases", "rollout bf16"), e2e.settings_of(args), "cpu")
    assert {r["id"]: r["spec"]["precision"] for r in bf16} == {"rollout bf16 batch 16": "bf16",
                                                              "rollout bf16 batch 64": "bf16"}
    spec = next(r for r in runs if r["id"] == "dpo fp32 fastalign + gradient checkpointing")["spec"]
    assert spec["overrides"] == ["trainer.gradient_checkpointing=true"]
    assert (spec["batch"], spec["seq_len"], spec["warmup"], spec["steps"]) == (4, 512, 1, 2)
    quick = _args("--e2e-quick", "--variants", "none", "--contenders", "trl")
    qruns = e2e.plan(quick, e2e.settings_of(quick), "cpu")
    # without fastalign among the contenders no variant baseline is needed when there are no variants
    assert {r["id"] for r in qruns if r["spec"]["kind"] == "train"} == {f"{a} fp32 trl" for a in e2e.ALGOS}
    assert all(r["spec"]["seq_len"] == 64 and r["spec"]["steps"] == 1 for r in qruns)


def test_bad_selection_options_are_named():
    with pytest.raises(SystemExit):
        _args("--e2e", "--contenders", "fastalign,vllm")
    with pytest.raises(SystemExit):
        _args("--e2e", "--variants", "flash attention")


def test_data_is_truncated_to_seq_len_and_prompts_fit():
    from fastalign.algorithms import get_algorithm
    from fastalign.models import load_tokenizer

    tok = load_tokenizer("tiny")
    for algo in ("sft", "dpo"):
        data = _e2e_data.build(algo, tok, n_records=3, seq_len=48, prompt_len=24, seed=5)
        alg = get_algorithm(algo)()
        examples = alg.encode(data["records"], tok, 48, Counter())
        batch = alg.collate(examples, tok)
        # every sequence (chosen and rejected for DPO) fills the max_length exactly: no padding anywhere
        masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
        assert masks and all(m.shape[-1] == 48 and bool(m.all()) for m in masks)
        assert len(_e2e_data.trl_dataset(algo, data["records"])) == 3
    g = _e2e_data.build("grpo", tok, n_records=3, seq_len=48, prompt_len=24, seed=5)
    lengths = [len(_e2e_data._prompt_ids(tok, r["prompt"][0]["content"])) for r in g["records"]]
    assert max(lengths) <= 24 and g["prompt_tokens"] == min(lengths) and min(lengths) > 12


def test_summary_median_rounds_and_targets():
    run = {"id": "dpo bf16 trl", "group": "dpo bf16",
           "spec": {"kind": "train", "algo": "dpo", "precision": "bf16", "contender": "trl", "overrides": []}}
    rec = e2e.summarize(run, {"step_seconds": [4.0, 1.0, 2.0, 8.0], "tokens_per_step": 4096, "peak_rss_bytes": 1000,
                              "losses": [0.7]})
    assert rec["median_step_s"] == 3.0 and rec["tokens_per_s"] == 4096 / 3.0 and rec["peak_bytes"] == 1000

    # rounds: the steps pooled (median over all), the lowest peak, an error in any round kept
    merged = e2e.merge(e2e.merge(None, {"step_seconds": [4.0, 1.0], "tokens_per_step": 4096, "peak_rss_bytes": 1000,
                                        "losses": [0.7]}),
                       {"step_seconds": [2.0, 8.0], "tokens_per_step": 4096, "peak_rss_bytes": 990, "losses": [0.6]})
    assert e2e.summarize(run, merged)["median_step_s"] == 3.0 and merged["peak_rss_bytes"] == 990
    assert merged["losses"] == [0.7] and "error" in e2e.merge(merged, {"error": "boom"})
    ro = e2e.merge({"rollout": {"g": {"tokens_per_s": 5.0, "all_tokens_per_s": [5.0, 9.0]}}},
                   {"rollout": {"g": {"tokens_per_s": 1.0, "all_tokens_per_s": [1.0, 2.0, 3.0]}}})
    assert ro["rollout"]["g"]["tokens_per_s"] == 3.0 and ro["rollout"]["g"]["all_tokens_per_s"] == [1.0, 2.0, 3.0, 5.0, 9.0]

    def rec_of(group, contender, tps, peak):
        return {"kind": "train", "group": group, "contender": contender, "variant": None, "tokens_per_s": tps,
                "peak_bytes": peak}

    records = [rec_of("dpo bf16", "fastalign", 400.0, 80), rec_of("dpo bf16", "trl", 100.0, 100),
               rec_of("dpo bf16", "trl+patch", 401.0, 90), rec_of("dpo fp32", "fastalign", 124.0, 81),
               rec_of("dpo fp32", "trl", 100.0, 100), rec_of("sft fp32", "fastalign", 120.0, 1),
               rec_of("sft fp32", "trl", 100.0, 1),
               {"kind": "rollout", "id": "rollout fp32 batch 64", "rollout": {
                   "fastalign.FastSampler": {"note": "not available: no module"},
                   "transformers.generate": {"tokens_per_s": 200.0}}}]
    status = {t["target"]: t["status"] for t in _e2e_report.targets(records, quick=False)}
    assert status == {
        "DPO bf16: fastalign tokens/s vs TRL stock": "PASS",  # exactly 4x
        "DPO bf16: fastalign peak memory vs TRL stock": "PASS",  # exactly 0.8x
        "DPO bf16: fastalign tokens/s vs TRL + patch_trl": "FAIL",
        "DPO fp32: fastalign tokens/s vs TRL stock": "FAIL",  # 1.24x < 1.25x
        "DPO fp32: fastalign peak memory vs TRL stock": "FAIL",  # 0.81x
        "DPO fp32: fastalign tokens/s vs TRL + patch_trl": "n/a (not measured here)",
        "SFT fp32: fastalign tokens/s vs TRL stock": "PASS",  # exactly 1.2x
        "sampler fp32: tokens/s vs generate, batch 64": "n/a (not measured here)"}
    assert all(t["status"] == "n/a (quick mode)" for t in _e2e_report.targets(records, quick=True))


def test_generate_is_held_to_the_requested_new_tokens():
    from fastalign.models import load_model, load_tokenizer

    tok = load_tokenizer("tiny")
    model = load_model("tiny", tokenizer=tok, seed=3).eval()
    ids = torch.tensor([tok("hello there", add_special_tokens=False)["input_ids"]])
    first = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                           pad_token_id=tok.pad_token_id)[0, -1].item()
    # the greedy first token is made the EOS: unheld, generation stops after one token
    stopped = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=first)
    assert stopped.shape[1] == ids.shape[1] + 1
    log = StepLog("cpu")
    log.force_new_tokens(model, 7)
    held = model.generate(input_ids=ids.repeat(2, 1), attention_mask=torch.ones_like(ids).repeat(2, 1),
                          max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=first)
    assert held.shape[1] == ids.shape[1] + 7 and log.generated_tokens == 14 and log.generate_calls == 1
    for t, loss in ((1.0, 0.5), (3.5, None), (4.0, 0.25)):
        log.ends.append(t) if loss is None else (log.ends.append(t), log.losses.append(loss))
    assert log.step_seconds(warmup=1) == [2.5, 0.5] and log.step_seconds(warmup=2) == [0.5]


def test_unknown_override_is_not_available_and_known_one_is_accepted():
    assert _e2e_fastalign.check_overrides("sft", ["trainer.gradient_checkpointing=true"]) is None
    why = _e2e_fastalign.check_overrides("dpo", ["data.no_such_option_yet=true"])
    assert why.startswith("not available in this fastalign") and "no_such_option_yet" in why


def test_one_fastalign_run_end_to_end_in_a_child(tmp_path):
    out = tmp_path / "out"
    rc = e2e.main(["--e2e-quick", "--model", "tiny", "--out", str(out), "--cases", "sft fp32 fastalign",
                   "--precisions", "fp32", "--variants", "none", "--rollout-batches", "", "--steps", "2",
                   "--threads", "2"])
    assert rc == 0
    res = json.load(open(out / "e2e.json"))
    (rec,) = res["runs"]
    assert rec["id"] == "sft fp32 fastalign" and "error" not in rec, rec
    assert len(rec["step_seconds"]) == 2 and len(rec["losses"]) == 3 and all(map(math.isfinite, rec["losses"]))
    assert rec["tokens_per_step"] == 4 * 64 and rec["tokens_per_s"] == 4 * 64 / rec["median_step_s"]
    assert rec["peak_bytes"] > 50 * 2**20  # a whole Python + torch process
    assert os.path.exists(out / "e2e.md") and os.path.exists(out / "e2e.png")


@pytest.mark.slow
def test_quick_mode_on_smollm2(tmp_path):
    """`fastalign bench --e2e-quick` on SmolLM2-135M-Instruct: every run measured (no contender
    failed), the targets listed, and every DPO contender really runs DPO against the policy's
    start: its first loss (before any update, policy == reference, computed by the same code on the
    same weights, so the margin is exactly 0) is fp32 log 2, -logsigmoid(0)."""
    pytest.importorskip("trl")
    pytest.importorskip("gguf")
    out = tmp_path / "out"
    assert e2e.main(["--e2e-quick", "--out", str(out), "--threads", "2"]) == 0
    res = json.load(open(out / "e2e.json"))
    train = [r for r in res["runs"] if r["kind"] == "train"]
    assert {r["group"] for r in train} == {"sft fp32", "dpo fp32", "grpo fp32"} and len(train) == 9
    for r in train:
        assert "error" not in r and (r.get("tokens_per_s") or r.get("note", "").startswith("not available")), r
    log2 = float(torch.tensor(2.0).log())
    for c in e2e.CONTENDERS:
        dpo = next(r for r in train if r["id"] == f"dpo fp32 {c}")
        assert len(dpo["losses"]) == 2 and dpo["losses"][0] == log2, dpo["losses"]
    assert len(res["targets"]) == 7 and "Losses, TRL stock vs TRL + patch_trl" in open(out / "e2e.md").read()
