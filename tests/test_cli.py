"""The command line as a user meets it: every kind of user error is `fastalign: error: <message>`
on stderr with status 2 and no traceback (FASTALIGN_DEBUG=1 shows it; internal errors keep
theirs), packaged configs by name, config-relative and bundled: paths, `fastalign configs` and
`train --print-config`.

Most cases call fastalign.cli.main in this process (fast); two run `python -m fastalign` in a
child to see exactly what a terminal sees.
"""

import os
import subprocess
import sys

import pytest

from fastalign import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64"]


def _user_error(capsys, argv, *fragments):
    """main(argv) is a user error: status 2, `fastalign: error: ` + a message holding fragments."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastalign: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)
    return err


def _dpo(*extra):
    return ["train", "dpo", "--config", "dpo_bundled", "trainer.progress=false", "trainer.plot=false", *TINY, *extra]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a directory that is not the clone (as a wheel user would)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- one test per user-error class ---------------------------------------------------------------------


def test_option_out_of_range_names_the_option(capsys, elsewhere):  # ConfigError
    _user_error(capsys, _dpo("trainer.lr=-1"), "trainer.lr must be > 0, got -1")
    _user_error(capsys, _dpo("algo.clip=1"), "algo: unknown option(s) ['clip']")
    _user_error(capsys, _dpo("trainer.schedule=cos"), "trainer.schedule must be one of constant, linear, cosine")
    _user_error(capsys, _dpo("data.max_length=many"), "data.max_length must be a number")
    _user_error(capsys, ["train", "ppo", "algo.gamma=2"], "algo.gamma must be in [0, 1], got 2")


def test_unknown_option_and_section(capsys, elsewhere):  # ConfigError
    _user_error(capsys, _dpo("trainer.lrr=1"), "trainer: unknown option(s) ['lrr']", "known options:")
    _user_error(capsys, _dpo("optim.lr=1"), "unknown config section(s) ['optim']")


def test_unknown_loss_type(capsys, elsewhere):  # ConfigError, from the algorithm's own check
    _user_error(capsys, _dpo("algo.loss_type=nope"), "unknown loss_type 'nope'", "sigmoid, ipo, hinge, robust")


def test_malformed_config_file(capsys, elsewhere):  # ConfigError
    (elsewhere / "bad.yaml").write_text("trainer: {lr: [1\n")
    _user_error(capsys, ["train", "sft", "--config", "bad.yaml"], "bad.yaml: not valid YAML")


def test_missing_files(capsys, elsewhere):  # DataNotFoundError
    _user_error(capsys, ["train", "dpo", "--config", "nope"], "--config nope: no such file", "dpo_bundled")
    _user_error(capsys, _dpo("data.train=missing.jsonl"), "data file not found: missing.jsonl")
    _user_error(capsys, _dpo("data.train=bundled:nope.jsonl"), "bundled:nope.jsonl: no such bundled data file",
                "preference_sample.jsonl")


def test_malformed_jsonl(capsys, elsewhere):  # DataFormatError (a DataError)
    (elsewhere / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a",\n')
    _user_error(capsys, _dpo("data.train=bad.jsonl"), "bad.jsonl:2: invalid JSON")


def test_unknown_model_lists_what_is_accepted(capsys, elsewhere):  # ModelNotFoundError
    _user_error(capsys, _dpo("model.policy=/nonexistent/model"),
                "model.policy: no such model directory or known model name: /nonexistent/model",
                "'tiny'", "a local model directory", ".gguf", "hub id")
    _user_error(capsys, _dpo("model.reference=missing.gguf"), "model.reference: no such model")


def test_unknown_algorithm(capsys):  # UnknownAlgorithmError
    _user_error(capsys, ["train", "nope"], "unknown algorithm 'nope'", "dpo")


def test_nothing_to_resume(capsys, elsewhere):  # ResumeError
    _user_error(capsys, _dpo("trainer.resume_from=latest", "trainer.output_dir=run"),
                "trainer.resume_from: resume_from='latest' but there is no checkpoint under run")


def test_damaged_checkpoint(capsys, elsewhere):  # CheckpointError (fastalign.trainer.checkpoint)
    from fastalign.trainer import manifest

    os.makedirs("ckpt")
    (elsewhere / "ckpt" / manifest.NAME).write_text("{not json")
    _user_error(capsys, _dpo("trainer.resume_from=ckpt", "trainer.output_dir=run"), "ckpt", "malformed")


def test_bad_command_line_is_argparse_status_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "dpo", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


# ---- what a terminal sees: no traceback, unless asked for; internal errors keep theirs ----------------


def _child(args, env=None, code=None):
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "fastalign", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, **(env or {})))


def test_terminal_sees_one_line_or_the_traceback_with_debug():
    res = _child(["train", "sft", "trainer.lr=-1"])
    assert res.returncode == 2 and res.stderr == "fastalign: error: trainer.lr must be > 0, got -1\n", res.stderr
    res = _child(["train", "sft", "trainer.lr=-1"], env={"FASTALIGN_DEBUG": "1"})
    assert res.returncode == 1 and "Traceback" in res.stderr and "ConfigError: trainer.lr must be > 0" in res.stderr


def test_internal_error_keeps_its_traceback():
    code = ("import sys; from fastalign import cli; from fastalign.trainer import run\n"
            "def boom(*a, **k): raise RuntimeError('a bug')\n"
            "run.run_training = boom\n"
            "sys.exit(cli.main(['train', 'sft']))\n")
    res = _child([], code=code)
    assert res.returncode == 1 and "Traceback" in res.stderr and "RuntimeError: a bug" in res.stderr


# ---- packaged configs, paths, --print-config -----------------------------------------------------------


def test_configs_lists_the_packaged_configs(capsys):
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in ("dpo_bundled", "sft_alpaca", "ppo", "grpo", "reward_synthetic", "sft_synthetic"):
        assert f"\n{name} " in "\n" + out
    assert "fastalign train dpo --config dpo_bundled" in out


def test_train_packaged_config_by_name_from_elsewhere(capsys, elsewhere):
    assert cli.main(_dpo("trainer.max_steps=1", "trainer.output_dir=out")) == 0
    assert "dpo: done at step 1" in capsys.readouterr().out
    assert (elsewhere / "out" / "metrics.jsonl").exists()


def test_print_config_every_option_default_and_help(capsys, elsewhere):
    import dataclasses

    from fastalign.algorithms.dpo import DPOConfig
    from fastalign.trainer.config import DataConfig, ModelConfig, TrainerConfig

    assert cli.main(["train", "dpo", "--config", "dpo_bundled", "--print-config", "algo.beta=0.3"]) == 0
    out = capsys.readouterr().out
    for cls in (ModelConfig, DataConfig, DPOConfig, TrainerConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            assert f"  {f.name}: " in out and f.metadata["help"] in out, f.name
    assert "  beta: 0.3 " in out and "  warmup_steps: 0 " in out  # a value given, a default
    bundled = os.path.join(ROOT, "fastalign", "data", "bundled", "preference_sample.jsonl")
    assert f"  train: {bundled} " in out  # bundled:NAME resolved
    import yaml

    assert yaml.safe_load(out)["trainer"]["lr"] == 5e-4  # the output is a config file again


def test_paths_resolve_relative_to_the_config_file(capsys, elsewhere):
    (elsewhere / "exp").mkdir()
    (elsewhere / "exp" / "c.yaml").write_text("data: {format: preference, train: d/train.jsonl}\n"
                                              "algo: {pretrain_data: bundled:text_sample.txt}\n")
    assert cli.main(["train", "sft", "--config", "exp/c.yaml", "--print-config", "data.eval=e.jsonl"]) == 0
    out = capsys.readouterr().out
    assert f"  train: {elsewhere / 'exp' / 'd' / 'train.jsonl'} " in out  # from the file: its directory
    assert "  eval: e.jsonl " in out  # typed on the command line: the working directory
    assert os.path.join("bundled", "text_sample.txt") in out


def test_bench_suite_ships_in_the_package(capsys):
    import fastalign
    import fastalign.benchmarks.bench_rl  # noqa: F401 (a suite imports from inside the package)

    assert os.path.dirname(fastalign.benchmarks.__file__) == os.path.join(os.path.dirname(fastalign.__file__), "benchmarks")
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0 and "usage: fastalign bench" in capsys.readouterr().out
