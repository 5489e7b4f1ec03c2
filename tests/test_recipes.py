"""The recipe runner (fastalign/recipes/runner.py): wiring checks before anything runs, artifacts
passed between stages, the "[i/n]" tags, and a training stage's outputs (a two-step SFT)."""

import os

import pytest
import torch

from fastalign.recipes import Context, Stage, run_stages


def _ctx(tmp_path, log=None):
    from fastalign.models import tiny_tokenizer

    return Context(str(tmp_path), tiny_tokenizer(), torch.device("cpu"), 64, log=log or (lambda *a: None),
                   trainer_defaults={"seed": 0, "progress": False, "save_total_limit": 1})


def test_steps_pass_artifacts_in_order_and_are_numbered(tmp_path):
    lines = []
    stages = [
        Stage("a", outputs=("x",), run=lambda ctx: (ctx.announce("a"), {"x": 2, "extra": 0})[1]),
        Stage("b", inputs=("x",), outputs=("y",), run=lambda ctx: {"y": ctx["x"] * 3}),
        Stage("c", inputs=("x", "y"), outputs=("z",), numbered=False,
              run=lambda ctx: (ctx.announce("c"), {"z": ctx["x"] + ctx["y"]})[1]),
    ]
    ctx = _ctx(tmp_path, lines.append)
    out = run_stages(stages, ctx)
    assert out == {"x": 2, "y": 6, "z": 8}  # undeclared keys ("extra") are not published
    assert lines == ["[1/2] a", "c"] and list(ctx.timings) == ["a", "b", "c"]


def test_wiring_is_checked_before_any_stage_runs(tmp_path):
    ran = []
    first = Stage("first", outputs=("x",), run=lambda ctx: ran.append(1) or {"x": 1})
    with pytest.raises(ValueError, match=r"stage 'second' reads \['y'\], which no earlier stage produces"):
        run_stages([first, Stage("second", inputs=("y",), run=lambda ctx: {})], _ctx(tmp_path))
    with pytest.raises(ValueError, match="names must be unique"):
        run_stages([first, first], _ctx(tmp_path))
    with pytest.raises(ValueError, match="outputs are named sft.<role>"):
        run_stages([Stage("sft", algorithm="sft", outputs=("policy",), data=list, models=dict)], _ctx(tmp_path))
    assert ran == []
    with pytest.raises(RuntimeError, match=r"did not produce \['x'\]"):
        run_stages([Stage("s", outputs=("x",), run=lambda ctx: {})], _ctx(tmp_path))
    with pytest.raises(ValueError, match="exactly one of run= .* or algorithm="):
        Stage("both", run=dict, algorithm="sft")
    with pytest.raises(ValueError, match="needs data= and models="):
        Stage("t", algorithm="sft")


def test_training_stage_publishes_its_models_and_checkpoint(tmp_path):
    from fastalign.data import SyntheticTask
    from fastalign.models import load_model, tiny_model

    task = SyntheticTask()
    sft = Stage("sft", algorithm="sft", outputs=("sft.policy", "sft.policy_dir", "sft.summary", "sft.algorithm"),
                data=lambda ctx: (task.demonstrations(16, seed=1), task.demonstrations(8, seed=2)),
                models=lambda ctx: {"policy": tiny_model(ctx.tokenizer, seed=0, hidden_size=32, num_layers=1,
                                                         num_heads=2, intermediate_size=64)},
                trainer=dict(max_steps=2, batch_size=8, lr=1e-3, warmup_steps=0),
                describe=lambda ctx, r: f"SFT on {len(r.train)}")
    reload = Stage("reload", inputs=("sft.policy_dir",), outputs=("n",),
                   run=lambda ctx: {"n": sum(p.numel() for p in load_model(ctx["sft.policy_dir"]).parameters())})
    lines = []
    out = run_stages([sft, reload], _ctx(tmp_path, lines.append))
    assert lines[0] == "[1/2] SFT on 16"
    assert not out["sft.policy"].training and out["sft.summary"]["step"] == 2
    assert out["sft.policy_dir"].startswith(os.path.join(str(tmp_path), "sft"))
    assert out["n"] == sum(p.numel() for p in out["sft.policy"].parameters())
    assert type(out["sft.algorithm"]).__name__ == "SFT"
