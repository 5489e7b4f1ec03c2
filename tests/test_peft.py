"""LoRA adapters (model.peft, the `peft` package) on the tiny model.

* model.peft is checked when the config is read: unknown keys, values out of range, target
  modules of the wrong type or matching nothing are ConfigErrors naming the option;
* the reference is the policy with its adapters disabled: it holds no parameters (every weight
  of the run is the policy's, once), and its log-probs equal the base model's BIT FOR BIT (the
  same modules run the same arithmetic: with the adapters disabled peft calls the base layer
  alone), before and after training; DPO's precomputed reference log-probs and the KL of PPO
  and GRPO go through it (their first-step KL is exactly 0: B = 0 at initialisation, so the
  adapters add exact zeros);
* training moves only the adapters (and a reward model's score head): the base weights stay
  bit-identical;
* checkpoints hold the adapters in peft's format (no model weights, no pickle), and resuming
  continues bit for bit; with merge_adapters the checkpoint also holds merged/<role>, equal bit
  for bit to peft's own merge_and_unload (W + scale B A rounded once in fp32) and loadable as a
  model name, while an adapter-only directory given as a model name is a clear error;
* FSDP2 with adapters is refused before any process group is joined.
"""

import copy
import json
import os
from collections import Counter

import pytest
import torch

from fastalign.algorithms import get_algorithm
from fastalign.data.synthetic import Oracle, SyntheticTask
from fastalign.errors import ConfigError, ModelNotFoundError
from fastalign.models import adapters, load_model, tiny_model, tiny_tokenizer
from fastalign.models.heads import ScalarHeadModel
from fastalign.trainer import Trainer
from fastalign.trainer.config import ModelConfig
from fastalign.trainer.run import _build_models, resolve_config

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
PEFT = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _cfg(out, **kw):
    cfg = dict(output_dir=str(out), max_steps=4, batch_size=4, grad_accum=1, lr=1e-2, progress=False, plot=False,
               warmup_steps=1, precision="fp32", device="cpu", handle_sigint=False)
    cfg.update(kw)
    return cfg


def _models(alg, tok, train, peft=PEFT, **model_kw):
    return _build_models(alg, ModelConfig(policy="tiny", tiny=TINY, peft=peft, **model_kw), tok, 0, train)


def _pairs(tok, n=16):
    recs, _ = SyntheticTask().preference_pairs(n, Oracle(seed=1), 1)
    return get_algorithm("dpo")().encode(recs, tok, 64, Counter())


def _demos(tok, n=24):
    return get_algorithm("sft")().encode(SyntheticTask().demonstrations(n, 0), tok, 64, Counter())


def _base(tok):
    return tiny_model(tok, seed=0, **TINY).eval()


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ---- options --------------------------------------------------------------------------------


@pytest.mark.parametrize("peft, message", [
    ({"rank": 4}, r"model.peft: unknown option\(s\) \['rank'\]"),
    ({"r": 0}, r"model.peft.r must be >= 1, got 0"),
    ({"dropout": 1.5}, r"model.peft.dropout must be in \[0, 1\)"),
    ({"alpha": "big"}, r"model.peft.alpha must be a number"),
    ({"bias": "some"}, r"model.peft.bias must be one of none, all, lora_only"),
    ({"target_modules": 3}, r"model.peft.target_modules must be a non-empty list"),
    ({"target_modules": []}, r"model.peft.target_modules must be a non-empty list"),
    ("yes", r"model.peft must be a mapping of options"),
])
def test_bad_options_are_config_errors(peft, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("sft", {"model": {"peft": peft}})


def test_merge_without_adapters_and_unmatched_targets_are_config_errors(tok):
    with pytest.raises(ConfigError, match="model.merge_adapters=true needs LoRA adapters"):
        resolve_config("sft", {"model": {"merge_adapters": True}})
    with pytest.raises(ConfigError, match="model.peft: .*nope"):
        _models(get_algorithm("sft")(), tok, _demos(tok), peft={"target_modules": ["nope"]})


# ---- the reference: the base with the adapters off, one copy of the weights --------------------


def test_reference_is_the_base_model_and_shares_its_weights(tok, tmp_path):
    alg = get_algorithm("dpo")({"beta": 0.5})
    train = _pairs(tok)
    models = _models(alg, tok, train)
    assert isinstance(models["reference"], adapters.AdapterFreeReference)
    tr = Trainer(alg, models, tok, train, None, _cfg(tmp_path))
    policy, ref = tr.models["policy"], tr.models["reference"]
    assert list(ref.parameters()) == [] and list(ref.buffers()) == []
    # one copy of the base weights: every tensor of the run is one of the policy's
    policy_storage = {p.data_ptr() for p in policy.parameters()}
    assert {p.data_ptr() for m in tr.models.values() for p in m.parameters()} == policy_storage
    base = _base(tok)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    lora_bytes = sum(p.numel() * p.element_size() for p in tr.params)
    assert sum(p.numel() * p.element_size() for p in policy.parameters()) == base_bytes + lora_bytes
    # the trainer froze "the reference": the adapters must still train, the policy stays in train mode
    assert tr.params and all(p.requires_grad for p in tr.params)
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    _randomise_adapters(policy)
    batch = alg.collate(train[:6], tok)
    with torch.no_grad():
        ref_logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        policy_logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert policy.training
    assert torch.equal(ref_logits, base_logits)
    assert not torch.allclose(policy_logits, base_logits)  # the adapters do change the policy


def test_dpo_trains_only_the_adapters_and_precomputes_from_the_base(tok, tmp_path):
    alg = get_algorithm("dpo")({"beta": 0.5, "precompute_ref_logps": True})
    train = _pairs(tok)
    tr = Trainer(alg, _models(alg, tok, train), tok, train, None, _cfg(tmp_path))
    before = {n: p.detach().clone() for n, p in tr.models["policy"].named_parameters()}
    tr.fit()
    assert "reference" not in tr.models  # freed after precomputing (only the view: the policy stays)
    base = _base(tok)
    for i in range(0, len(train), 4):  # the precomputation's chunks: the same computation, bit for bit
        batch = alg.collate(train[i: i + 4], tok)
        with torch.no_grad():
            seq, _, _ = alg.sequence_logps(base, batch)
        got = torch.tensor([[e["ref_chosen_logps"] for e in train[i: i + 4]],
                            [e["ref_rejected_logps"] for e in train[i: i + 4]]]).flatten()
        assert torch.equal(got, seq.float().cpu())
    moved = [n for n, p in tr.models["policy"].named_parameters() if not torch.equal(p, before[n])]
    assert moved and all("lora_" in n for n in moved)
    base_sd = base.state_dict()
    for n, p in tr.models["policy"].get_base_model().state_dict().items():
        if "lora_" not in n:
            assert torch.equal(p, base_sd[n.replace(".base_layer.", ".")]), n


@pytest.mark.parametrize("algo, opts", [("grpo", {"group_size": 2, "beta": 0.1, "max_new_tokens": 4}),
                                         ("ppo", {"max_new_tokens": 4, "ppo_epochs": 1, "mini_batches": 1})])
def test_online_kl_is_to_the_base(tok, tmp_path, algo, opts):
    """At the first step the adapters add exact zeros (B = 0), so the policy's log-probs equal
    the reference's and the rollout's KL is exactly 0; the value model gets adapters too."""
    alg = get_algorithm(algo)(opts, reward_fn=lambda p, r: float(len(r) % 3))
    train = alg.encode([{"prompt": r["prompt"]} for r in SyntheticTask().sample(8, 0)], tok, 64, Counter())
    models = _models(alg, tok, train)
    assert isinstance(models["reference"], adapters.AdapterFreeReference)
    if algo == "ppo":
        assert adapters.has_adapters(models["value"]) and models["value"].head.weight.requires_grad
    logs = []
    tr = Trainer(alg, models, tok, train, None, _cfg(tmp_path, max_steps=2, batch_size=4),
                 callbacks=[lambda t, m: logs.append(m)])
    tr.fit()
    assert logs[0]["rollout/kl"] == 0.0
    assert logs[1]["rollout/kl"] != 0.0  # the adapters moved after the first update


# ---- checkpoints -------------------------------------------------------------------------------


def _sft_trainer(tok, out, **kw):
    alg = get_algorithm("sft")()
    train = _demos(tok)
    merge = kw.pop("merge_adapters", False)
    return Trainer(alg, _models(alg, tok, train), tok, train, None,
                   _cfg(out, **{"max_steps": 6, "save_every": 2, "save_total_limit": 5, **kw}), merge_adapters=merge)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def test_checkpoint_holds_adapters_and_resumes_exactly(tok, tmp_path):
    full = tmp_path / "full"
    tr = _sft_trainer(tok, full)
    tr.fit()
    c4 = full / "checkpoints" / "step-000004"
    files = {os.path.relpath(os.path.join(d, n), c4) for d, _, ns in os.walk(c4) for n in ns}
    assert {"policy/adapter_config.json", "policy/adapter_model.safetensors"} <= files
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl")) or f.endswith("model.safetensors")
                and not f.endswith("adapter_model.safetensors")]
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(c4, resumed / "checkpoints" / "step-000004")
    tr2 = _sft_trainer(tok, resumed, resume_from="latest")
    tr2.fit()
    assert _losses(resumed) == _losses(full)[4:]
    from safetensors.torch import load_file

    a = load_file(str(full / "checkpoints" / "step-000006" / "policy" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-000006" / "policy" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ModelNotFoundError, match="holds LoRA adapters only"):
        load_model(str(full / "checkpoints" / "step-000006" / "policy"))


def test_merged_model_is_peft_merge_and_loads_by_name(tok, tmp_path):
    tr = _sft_trainer(tok, tmp_path, max_steps=2, merge_adapters=True)
    tr.fit()
    merged_dir = tr.model_dir("policy")
    assert merged_dir.endswith(os.path.join("merged", "policy"))
    merged = load_model(merged_dir)
    assert type(merged).__name__ == "LlamaForCausalLM"
    expected = copy.deepcopy(tr.models["policy"]).merge_and_unload().state_dict()  # peft's own merge, in place
    got = merged.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert not all(torch.equal(got[k], v) for k, v in _base(tok).state_dict().items())  # the adapters are in


def test_reward_model_keeps_its_head_trainable_and_round_trips(tok, tmp_path):
    alg = get_algorithm("reward")()
    train = _pairs(tok)
    models = _models(alg, tok, train)
    rm = models["reward"]
    assert isinstance(rm, ScalarHeadModel) and adapters.has_adapters(rm)
    tr = Trainer(alg, models, tok, train, None, _cfg(tmp_path, max_steps=2), merge_adapters=True)
    head_before = rm.head.weight.detach().clone()
    tr.fit()
    assert not torch.equal(rm.head.weight, head_before)  # the head trains in full
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    ckpt_dir = os.path.join(tr.last_checkpoint, "reward")
    assert {"adapter_model.safetensors", "score_head.safetensors"} <= set(os.listdir(ckpt_dir))
    loaded = load_model(tr.model_dir("reward"))  # merged/reward: a plain scalar-head model
    assert isinstance(loaded, ScalarHeadModel) and torch.equal(loaded.head.weight, rm.head.weight)
    reference = ScalarHeadModel(copy.deepcopy(rm.lm).merge_and_unload())  # peft's own merge
    reference.head.load_state_dict(rm.head.state_dict())
    batch = alg.collate(train[:4], tok)
    with torch.no_grad():  # the same weights through the same modules: bit for bit
        a = reference.eval().score(batch["input_ids"], batch["attention_mask"])
        b = loaded.eval().score(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b)


def test_fsdp_with_adapters_is_refused(tok, tmp_path):
    alg = get_algorithm("sft")()
    train = _demos(tok, 8)
    with pytest.raises(ConfigError, match="trainer.distributed=fsdp does not support LoRA adapters"):
        Trainer(alg, _models(alg, tok, train), tok, train, None, _cfg(tmp_path, distributed="fsdp"))


# ---- DDP: adapters replicated, the reference through the plain policy ------------------------------


def _ddp_trainer(out, mode, grad_accum):
    tok = tiny_tokenizer()
    alg = get_algorithm("dpo")({"beta": 0.5})  # the reference runs every step (no precomputation)
    train = _pairs(tok)
    return Trainer(alg, _models(alg, tok, train), tok, train, None,
                   _cfg(out, max_steps=3, batch_size=2, grad_accum=grad_accum, distributed=mode))


def test_ddp_with_adapters_matches_a_single_process(tmp_path):
    """2 gloo processes x 1 micro-batch of 2 pairs against one process x 2 micro-batches: the
    same per-micro-batch gradients, summed once (g0 + g1) either way, so losses and adapter
    weights agree bit for bit (the argument of tests/test_distributed.py's exact cases)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.abspath(__file__), "--ddp-worker", str(tmp_path / "ddp")], env=env, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        _ddp_trainer(tmp_path / "single", "none", 2).fit()
    finally:
        torch.set_num_threads(threads)
    assert _losses(tmp_path / "ddp") == _losses(tmp_path / "single")
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / run / "checkpoints" / "step-000003" / "policy" / adapters.ADAPTER_WEIGHTS))
            for run in ("ddp", "single"))
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":  # the torchrun worker of test_ddp_with_adapters_matches_a_single_process
    import sys

    if sys.argv[1:2] == ["--ddp-worker"]:
        from fastalign.trainer import distributed as D

        torch.set_num_threads(1)
        _ddp_trainer(sys.argv[2], "ddp", 1).fit()
        D.shutdown()
