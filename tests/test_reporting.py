"""trainer.report_to: the metrics also go to TensorBoard and Weights & Biases, as `<split>/<name>`
at each record's step, and equal what metrics.jsonl holds (TensorBoard stores fp32, so the
comparison is to the fp32 rounding of each value; W&B receives the Python floats themselves)."""

import json
import sys
import types

import pytest
import torch

from fastalign.algorithms import get_algorithm
from fastalign.data.synthetic import SyntheticTask
from fastalign.errors import ConfigError
from fastalign.models import tiny_model, tiny_tokenizer
from fastalign.trainer import Trainer
from collections import Counter


def _fit(tmp_path, **kw):
    tok = tiny_tokenizer()
    data = get_algorithm("sft")().encode(SyntheticTask().demonstrations(16, 0), tok, 48, Counter())
    cfg = dict(output_dir=str(tmp_path), max_steps=3, batch_size=4, lr=1e-3, progress=False, plot=False, **kw)
    model = tiny_model(tok, seed=0, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    tr = Trainer(get_algorithm("sft")(), {"policy": model}, tok, data, data[:4], cfg)
    tr.fit()
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_tensorboard_holds_the_jsonl_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _fit(tmp_path, report_to=["tensorboard"])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for split in ("train", "eval"):
        want = [(r["step"], r["loss"]) for r in rows if r["split"] == split]
        got = [(e.step, e.value) for e in events.Scalars(f"{split}/loss")]
        assert want and got == [(s, float(torch.tensor(v, dtype=torch.float32))) for s, v in want]
    assert "train/grad_norm" in events.Tags()["scalars"]


def test_wandb_receives_the_jsonl_metrics(tmp_path, monkeypatch):
    logged, finished, init_args = [], [], {}

    class Run:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            finished.append(True)

    def init(**kw):
        init_args.update(kw)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    rows = _fit(tmp_path, report_to=["wandb"])
    assert init_args["dir"] == str(tmp_path) and init_args["config"]["max_steps"] == 3
    assert finished == [True]
    assert [(s, v["train/loss"]) for s, v in logged if "train/loss" in v] == \
        [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]
    assert [(s, v["eval/loss"]) for s, v in logged if "eval/loss" in v] == \
        [(r["step"], r["loss"]) for r in rows if r["split"] == "eval"]


def test_report_to_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"trainer.report_to: unknown tracker\(s\) \['mlflow'\]"):
        _fit(tmp_path, report_to=["mlflow"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="wandb needs the wandb package"):
        _fit(tmp_path, report_to=["wandb"])
