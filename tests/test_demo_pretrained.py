"""The pretrained-model demo recipe (fastalign/recipes/pretrained_demo.py) and what it relies on:
the oracle reading chat-style responses, the synthetic task rendered through a chat template,
paired standard errors, the recipe end to end on a tiny local model directory (fast), the CLI's
--model, and (slow) a shortened SmolLM2-135M run."""

import json
import math
import os
import statistics

import pytest

from fastalign.data import collate as C
from fastalign.data.synthetic import Oracle, SyntheticTask, response_count, response_items
from fastalign.recipes.steps import format_table, mean_and_se, paired_gains

# ---- the oracle on chat-style responses ---------------------------------------------------------


def test_oracle_tolerates_formatting_but_not_prose():
    s = Oracle.score
    assert response_items("[4, 1, 3].") == ["4", "1", "3"] and response_items(" 4 1 3 ") == ["4", "1", "3"]
    for formatted in ("4 1 3", "4, 1, 3", "[4, 1, 3]", "(4 1 3)", "4 1 3.", "  4,1,3 \n"):
        assert s("reverse 3 1 4", formatted) == 1.0, formatted
    assert s("repeat ab 2", "ab, ab.") == 1.0
    # words around a list are items: they cost credit like wrong items
    assert s("reverse 3 1 4", "The answer is 4 1 3") == 0.0
    assert s("reverse 3 1 4", "4 1 3 is the answer") == 3 / 6  # 3 hits over 6 items
    assert s("reverse 3 1 4", "4 1 3!") == 2 / 3  # only a final period is formatting
    # a count is the response's only number
    assert response_count("The answer is 3.") == 3 and response_count("3") == 3 and response_count("-1") == -1
    assert s("count 1 in 1 1 2", "There are 2.") == 1.0 and s("count 1 in 1 1 2", "3 times") == 0.5
    for hedged in ("2 or 3", "2.5", "two", "", "1 1 2 has 2"):
        assert response_count(hedged) is None and s("count 1 in 1 1 2", hedged) == 0.0, hedged


# ---- the synthetic task through a chat template -------------------------------------------------

# ChatML with a default system prompt, as SmolLM2's template does
CHATML = ("{% if messages[0]['role'] != 'system' %}<|user|>SYS<|user|>{% endif %}"
          "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
          "{% else %}<|assistant|>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_synthetic_records_render_through_the_chat_template():
    import copy

    from fastalign.models import tiny_tokenizer

    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = CHATML
    task = SyntheticTask()
    (demo,) = task.demonstrations(1, seed=3)
    prompt, answer = demo["messages"][0]["content"], demo["messages"][1]["content"]
    (ex,) = C.encode_demonstrations([demo], tok, 64)
    assert tok.decode(ex["input_ids"]) == f"<|user|>SYS<|user|><|user|>{prompt}<|assistant|>{answer}<eos>"
    assert tok.decode([t for t in ex["labels"] if t != C.IGNORE]) == f"{answer}<eos>"  # the loss: answer + end of turn
    (rec,) = C.encode_prompts(task.sample(1, seed=3), tok, 64)
    assert tok.decode(rec["prompt_ids"]) == f"<|user|>SYS<|user|><|user|>{prompt}<|assistant|>"
    (pair,) = C.encode_preferences([{"prompt": prompt, "chosen": answer, "rejected": "0"}], tok, 64)
    assert pair["prompt_ids"] == rec["prompt_ids"] and tok.decode(pair["rejected_ids"]) == "0<eos>"


# ---- statistics ----------------------------------------------------------------------------------


def test_paired_gains_are_mean_differences_with_their_standard_error():
    import random

    rng = random.Random(0)
    n = 50
    base = [rng.random() for _ in range(n)]
    outputs = {name: (["x"] * n, [min(1.0, b + shift * rng.random()) for b in base],
                      [rng.random() for _ in range(n)]) for name, shift in (("base", 0.0), ("SFT", 0.5), ("RL", 0.2))}
    outputs["base"] = (["x"] * n, base, outputs["base"][2])
    gains = paired_gains(outputs)
    assert [(g["model"], g["vs"]) for g in gains] == [("SFT", "base"), ("RL", "SFT")]
    for g in gains:
        for key, i in (("", 1), ("greedy_", 2)):
            d = [a - b for a, b in zip(outputs[g["model"]][i], outputs[g["vs"]][i])]
            assert math.isclose(g[key + "gain"], statistics.fmean(d), rel_tol=1e-12, abs_tol=1e-15)
            assert math.isclose(g[key + "se"], statistics.stdev(d) / math.sqrt(n), rel_tol=1e-12)
    m, se = mean_and_se([1.0])
    assert m == 1.0 and math.isnan(se)
    assert mean_and_se([0.0, 1.0, 0.0, 1.0]) == (0.5, (1 / 3 / 4) ** 0.5)  # var 1/3 (n - 1), / n


def test_table_shows_the_standard_error_and_drops_an_absent_reward_model():
    row = {"oracle score": 0.5, "oracle SE": 0.02, "oracle score (greedy)": 0.6, "win rate vs base": 0.7,
           "KL to ref": 1.0, "entropy": 0.3, "mean length": 5.0, "reward model": float("nan")}
    table = format_table({"base": row}, baseline="base")
    assert "0.500 ± 0.020" in table and "reward model" not in table
    assert "reward model" in format_table({"SFT": {**row, "win rate vs SFT": 0.5, "reward model": -1.0}})


# ---- the recipe on a tiny local model ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from fastalign.models import save_model, tiny_model, tiny_tokenizer

    d = str(tmp_path_factory.mktemp("tiny_model"))
    tok = tiny_tokenizer()
    save_model(tiny_model(tok, seed=0, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), d, tok)
    return d


def _small(model_dir, out, **kw):
    from fastalign.recipes.pretrained_demo import PretrainedDemoConfig

    values = dict(model=model_dir, output_dir=str(out), progress=False, precision="fp32", sft_examples=64,
                  sft_steps=3, sft_batch_size=8, sft_lr=1e-3, grpo_steps=2, grpo_prompts_per_step=2,
                  grpo_group_size=3, eval_prompts=12, max_new_tokens=8)
    return PretrainedDemoConfig(**{**values, **kw})


def test_recipe_runs_sft_grpo_and_judges_base_sft_grpo(tiny_dir, tmp_path):
    from fastalign.recipes.pretrained_demo import run_pretrained_demo

    lines = []
    s = run_pretrained_demo(_small(tiny_dir, tmp_path), log=lines.append)
    res = s["results"]
    assert list(res) == ["base", "SFT", "GRPO"] and list(s["timings"]) == ["sft", "grpo", "eval"]
    assert res["base"]["KL to ref"] == 0.0 and res["base"]["win rate vs base"] == 0.5  # the base is the reference
    for name, r in res.items():
        assert 0 <= r["oracle score"] <= 1 and r["oracle SE"] >= 0 and 0 < r["mean length"] <= 8, name
    for g in s["gains"]:  # a mean of differences is the difference of the means (up to rounding)
        assert math.isclose(g["gain"], res[g["model"]]["oracle score"] - res[g["vs"]]["oracle score"], abs_tol=1e-12)
        assert math.isclose(g["greedy_gain"], res[g["model"]]["oracle score (greedy)"]
                            - res[g["vs"]]["oracle score (greedy)"], abs_tol=1e-12)
    # GRPO was trained against the oracle from the SFT checkpoint, and its steps were logged
    rows = [json.loads(x) for x in open(tmp_path / "grpo" / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(0 <= r["rollout/oracle"] <= 1 for r in train)
    assert all(math.isclose(r["rollout/oracle"], r["score"], rel_tol=1e-6) for r in train)  # the reward: the oracle
    for stage in ("sft", "grpo"):
        assert os.path.exists(tmp_path / stage / "checkpoints" / "latest")
    saved = json.load(open(tmp_path / "summary.json"))
    assert saved["results"] == json.loads(json.dumps(res)) and saved["config"]["model"] == tiny_dir
    assert any("GRPO vs SFT: oracle" in line for line in lines)


def test_recipe_can_stop_after_sft_and_refuses_other_stage_lists(tiny_dir, tmp_path):
    from fastalign.errors import ConfigError
    from fastalign.recipes.pretrained_demo import run_pretrained_demo

    s = run_pretrained_demo(_small(tiny_dir, tmp_path, stages=("sft",)), log=lambda *a: None)
    assert list(s["results"]) == ["base", "SFT"] and not os.path.exists(tmp_path / "grpo")
    for stages in (("grpo",), ("sft", "dpo"), ()):
        with pytest.raises(ConfigError, match="stages must be"):
            run_pretrained_demo(_small(tiny_dir, tmp_path, stages=stages), log=lambda *a: None)
    with pytest.raises(ConfigError, match="precision must be bf16 or fp32"):
        run_pretrained_demo(_small(tiny_dir, tmp_path, precision="fp16"), log=lambda *a: None)


def test_cli_demo_model_selects_the_pretrained_recipe(monkeypatch, capsys, tiny_dir):
    from fastalign import cli
    from fastalign.recipes import demo, pretrained_demo

    got = {}
    monkeypatch.setattr(pretrained_demo, "run_pretrained_demo", lambda cfg: got.__setitem__("cfg", cfg))
    monkeypatch.setattr(demo, "run_demo", lambda cfg: got.__setitem__("tiny", cfg))
    assert cli.main(["demo", "--model", tiny_dir, "--set", "grpo_steps=3", "--set", "grpo_lr=2e-5", "--seed", "4"]) == 0
    cfg = got["cfg"]
    assert (cfg.model, cfg.grpo_steps, cfg.grpo_lr, cfg.seed) == (tiny_dir, 3, 2e-5, 4)
    assert cfg.output_dir == "runs/demo_pretrained" and "tiny" not in got
    assert cli.main(["demo", "--model", "tiny", "--output-dir", "x"]) == 0 and got["tiny"].output_dir == "x"
    # the tiny recipe's options are not the pretrained one's, and the reverse
    assert cli.main(["demo", "--model", tiny_dir, "--set", "ppo_kl_coef=0"]) == 2
    assert "--set takes KEY=VALUE with KEY one of" in capsys.readouterr().err
    assert cli.main(["demo", "--set", "grpo_steps=3"]) == 2
    assert cli.main(["demo", "--model", tiny_dir, "--set", "model=x"]) == 2  # the model is --model
    assert cli.main(["demo", "--model", "/nonexistent/model"]) == 2
    assert "demo --model: no such model directory" in capsys.readouterr().err


# ---- SmolLM2-135M-Instruct, shortened (slow) -------------------------------------------------------


@pytest.mark.slow
def test_smollm2_demo_sft_lifts_the_oracle_score_and_grpo_trains(tmp_path):
    """`fastalign demo --model smollm2-135m-instruct` shortened to a few steps: the base chat model
    answers the terse task commands with prose (oracle ~0.04); a few SFT steps teach the answer
    format (short responses ending at the template's end of turn) and lift the oracle score far
    beyond its standard error; GRPO trains from the SFT checkpoint against the oracle."""
    pytest.importorskip("gguf")
    from fastalign.recipes.pretrained_demo import PretrainedDemoConfig, run_pretrained_demo

    # 4.5 min on the 2-core dev box (AMD EPYC, load average 1-3.5 from other jobs), 2026-12-07

    cfg = PretrainedDemoConfig(output_dir=str(tmp_path), progress=False, sft_steps=6, sft_batch_size=8,
                               grpo_steps=1, grpo_prompts_per_step=2, grpo_group_size=4, eval_prompts=32)
    s = run_pretrained_demo(cfg, log=lambda *a: None)
    base, sft = s["results"]["base"], s["results"]["SFT"]
    assert base["oracle score"] < 0.25 and base["mean length"] > 10  # prose, mostly cut at 16 tokens
    assert sft["mean length"] < base["mean length"] - 3 and sft["no EOS"] < base["no EOS"]
    gain = s["gains"][0]
    assert gain["model"] == "SFT" and gain["gain"] > 3 * gain["se"] and gain["gain"] > 0.1
    assert sft["KL to ref"] > 0  # moved away from the base model
    rows = [json.loads(x) for x in open(tmp_path / "grpo" / "metrics.jsonl")]
    (step,) = [r for r in rows if r["split"] == "train"]
    assert math.isfinite(step["loss"]) and 0 <= step["rollout/oracle"] <= 1
    assert os.path.exists(tmp_path / "grpo" / "checkpoints" / "latest")
