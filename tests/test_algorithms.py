"""Algorithm registry (built-ins, entry-point plugins, errors), the losses of sft/reward/dpo
against hand-written formulas, and short training runs of each on a tiny model."""

import importlib
import importlib.metadata
import os
import subprocess
import sys
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from fastalign.algorithms import Algorithm, get_algorithm, list_algorithms, register_algorithm
from fastalign.algorithms import registry
from fastalign.data import collate as C
from fastalign.data.synthetic import SyntheticTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_SRC = os.path.join(ROOT, "tests", "example_plugin")
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tok():
    from fastalign.models import tiny_tokenizer

    return tiny_tokenizer()


def _model(tok, seed=0):
    from fastalign.models import tiny_model

    return tiny_model(tok, seed=seed, **TINY)


# ---- registry ------------------------------------------------------------------------------------


def test_builtins_registered():
    names = list_algorithms()
    assert {"sft", "reward", "dpo"} <= set(names)
    assert all(names[n] for n in ("sft", "reward", "dpo"))  # one-line descriptions
    dpo = get_algorithm("dpo")
    assert dpo.data_kind == "preferences" and dpo.models == ("policy", "reference") and dpo.name == "dpo"
    assert get_algorithm("sft").data_kind == "demonstrations" and get_algorithm("reward").models == ("reward",)


def test_unknown_name_lists_known():
    with pytest.raises(KeyError) as e:
        get_algorithm("nope")
    msg = str(e.value)
    assert "unknown algorithm 'nope'" in msg and "dpo" in msg and "sft" in msg and "reward" in msg


def test_duplicate_name_is_an_error():
    with pytest.raises(ValueError, match="'sft' is already registered"):
        @register_algorithm("sft")
        class Other(Algorithm):
            pass
    with pytest.raises(TypeError, match="subclass of fastalign.algorithms.Algorithm"):
        register_algorithm("x-not-an-algorithm")(object)


class _FakeEP:
    def __init__(self, name, obj, value="fake_mod:Obj"):
        self.name, self.obj, self.value, self.loads = name, obj, value, 0
        self.dist = None

    def load(self):
        self.loads += 1
        if isinstance(self.obj, Exception):
            raise self.obj
        return self.obj


@pytest.fixture
def fake_entry_points(monkeypatch):
    eps = []
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    saved = dict(registry._REGISTRY), dict(registry._ORIGIN)
    yield eps
    registry._REGISTRY.clear(), registry._REGISTRY.update(saved[0])
    registry._ORIGIN.clear(), registry._ORIGIN.update(saved[1])


def test_plugins_load_lazily(fake_entry_points):
    class Lazy(Algorithm):
        """A lazily found plugin."""

    ep = _FakeEP("lazy-algo", Lazy)
    fake_entry_points.append(ep)
    get_algorithm("sft")
    assert ep.loads == 0  # a built-in needs no plugin scan
    assert get_algorithm("lazy-algo") is Lazy and ep.loads == 1 and Lazy.name == "lazy-algo"
    list_algorithms()
    assert ep.loads == 1  # loaded once


def test_broken_plugin_warns_and_duplicate_plugin_raises(fake_entry_points):
    fake_entry_points.append(_FakeEP("broken", ImportError("no module named x")))
    with pytest.warns(UserWarning, match="could not load algorithm plugin"):
        names = list_algorithms()
    assert "broken" not in names and "sft" in names

    class Dup(Algorithm):
        pass

    fake_entry_points[:] = [_FakeEP("dpo", Dup)]
    registry._PLUGINS_LOADED = False
    with pytest.raises(ValueError, match="'dpo' is already registered"):
        list_algorithms()


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory):
    """The tests/example_plugin package, really installed: already (CI runs
    `pip install --no-build-isolation -e tests/example_plugin`), else pip-installed here into a
    temporary directory put on sys.path (a real dist-info with the entry points)."""
    added = None
    try:
        importlib.metadata.distribution("fastalign-example-plugin")
    except importlib.metadata.PackageNotFoundError:
        target = str(tmp_path_factory.mktemp("plugin_site"))
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", target, PLUGIN_SRC], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"pip install of the example plugin failed:\n{r.stdout}\n{r.stderr}")
        sys.path.insert(0, target)
        importlib.invalidate_caches()
        added = target
    registry.load_plugins(reload=True)
    yield
    if added:
        sys.path.remove(added)


def test_entry_point_plugin(example_plugin):
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="fastalign.algorithms")}
    assert eps.get("simpo") == "fastalign_example_plugin:SimPO"
    simpo = get_algorithm("simpo")
    assert simpo.__module__ == "fastalign_example_plugin" and simpo.models == ("policy",)
    assert "simpo" in list_algorithms() and "ln-dpo" in list_algorithms()
    assert get_algorithm("ln-dpo")().logp_reduce == "mean"


# ---- losses against formulas -----------------------------------------------------------------------


def _pairs(tok, n=6, seed=0):
    pairs, _ = SyntheticTask().preference_pairs(n, seed=seed)
    return pairs


def test_sft_loss_is_completion_only_cross_entropy(tok):
    sft = get_algorithm("sft")()
    exs = sft.encode(SyntheticTask().demonstrations(5, 0), tok, 64, Counter())
    batch = sft.collate(exs, tok)
    model = _model(tok)
    loss_sum, metrics = sft.loss({"policy": model}, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss_sum, ref, rtol=1e-5, atol=1e-4)
    n_completion = sum(sum(t != -100 for t in e["labels"]) for e in exs)
    assert sft.loss_units(batch) == n_completion  # prompt and padding carry no loss
    assert metrics["loss"] == pytest.approx(float(ref) / n_completion, rel=1e-5)


def test_sft_mixing_and_packing(tok, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some plain text here\n\nand another document\n")
    sft = get_algorithm("sft")({"pretrain_data": str(text), "pretrain_ratio": 0.25})
    st = Counter()
    rows = sft.encode(SyntheticTask().demonstrations(30, 0), tok, 64, st)
    assert len(rows) == 40 and st["pretrain rows mixed in"] == 10
    assert sum(all(t != -100 for t in r["labels"]) for r in rows) >= 10  # text rows: loss on every token
    packed = get_algorithm("sft")({"packing": True}).encode(SyntheticTask().demonstrations(30, 0), tok, 64, Counter())
    assert all(len(r["input_ids"]) == 64 for r in packed[:-1]) and len(packed) < 30
    with pytest.raises(ValueError, match="pretrain_data"):
        get_algorithm("sft")({"pretrain_ratio": 0.5}).encode([], tok, 64, Counter())


def test_reward_loss_and_accuracy(tok):
    rm_alg = get_algorithm("reward")()
    models = rm_alg.build_models("tiny", tok, tiny_kwargs=TINY)
    exs = rm_alg.encode(_pairs(tok), tok, 64, Counter())
    batch = rm_alg.collate(exs, tok)
    loss_sum, m = rm_alg.loss(models, batch)
    scores = models["reward"].score(batch["input_ids"], batch["attention_mask"])
    b = len(exs)
    # the score is read at each sequence's last real token
    last = batch["attention_mask"].sum(1) - 1
    per_tok = models["reward"](batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(scores, per_tok[torch.arange(2 * b), last])
    ref = -F.logsigmoid(scores[:b] - scores[b:]).sum()
    torch.testing.assert_close(loss_sum, ref, rtol=1e-5, atol=1e-6)
    assert m["accuracy"] == pytest.approx(float((scores[:b] > scores[b:]).float().mean()))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_loss_matches_formula(tok, loss_type):
    beta, eps = 0.2, 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    dpo = get_algorithm("dpo")({"beta": beta, "loss_type": loss_type, "label_smoothing": eps})
    policy, ref = _model(tok, 0), _model(tok, 1)
    exs = dpo.encode(_pairs(tok), tok, 64, Counter())
    batch = dpo.collate(exs, tok)
    loss_sum, m = dpo.loss({"policy": policy, "reference": ref}, batch)

    def seq(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        tok_lp = lp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
        return tok_lp.sum(-1) / (mask.sum(-1) if loss_type == "ipo" else 1)

    b = len(exs)
    p, r = seq(policy), seq(ref).detach()
    d = (p[:b] - r[:b]) - (p[b:] - r[b:])
    if loss_type == "sigmoid":
        want = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif loss_type == "ipo":
        want = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        want = torch.relu(1 - beta * d)
    else:
        want = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    torch.testing.assert_close(loss_sum, want.sum(), rtol=1e-4, atol=1e-5)
    rc, rr = beta * (p[:b] - r[:b]), beta * (p[b:] - r[b:])
    assert m["rewards/chosen"] == pytest.approx(float(rc.mean()), rel=1e-4, abs=1e-5)
    assert m["rewards/margins"] == pytest.approx(float((rc - rr).mean()), rel=1e-4, abs=1e-5)
    assert m["rewards/accuracies"] == pytest.approx(float((rc > rr).float().mean()))


def test_dpo_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type 'nope'"):
        get_algorithm("dpo")({"loss_type": "nope"})
    with pytest.raises(ValueError, match="unknown option"):
        get_algorithm("dpo")({"betta": 0.1})


def test_dpo_precomputed_reference_logps_equal_reference_model(tok, tmp_path):
    from fastalign.trainer import Trainer

    pairs = _pairs(tok, 12)
    out = {}
    for pre in (False, True):
        dpo = get_algorithm("dpo")({"precompute_ref_logps": pre})
        data = dpo.encode(pairs, tok, 64, Counter())
        tr = Trainer(dpo, {"policy": _model(tok, 0), "reference": _model(tok, 1)}, tok, data, None,
                     dict(output_dir=str(tmp_path / str(pre)), max_steps=3, batch_size=4, lr=1e-3, progress=False,
                          plot=False, save_final=False))
        tr.fit()
        out[pre] = [p.detach().clone() for p in tr.models["policy"].parameters()]
        assert ("reference" in tr.models) != pre  # precomputing frees the reference model
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- short runs -----------------------------------------------------------------------------------------


def _run(alg, models, tok, data, tmp_path, steps, lr, eval_data=None, bs=16):
    from fastalign.trainer import Trainer

    tr = Trainer(alg, models, tok, data, eval_data, dict(output_dir=str(tmp_path), max_steps=steps, batch_size=bs,
                                                         lr=lr, progress=False, plot=False, warmup_steps=2))
    return tr, tr.fit()


def test_short_sft_run_learns(tok, tmp_path):
    sft = get_algorithm("sft")()
    data = sft.encode(SyntheticTask().demonstrations(400, 0), tok, 64, Counter())
    ev = sft.encode(SyntheticTask().demonstrations(32, 1), tok, 64, Counter())
    tr, s = _run(sft, {"policy": _model(tok)}, tok, data, tmp_path, 40, 5e-3, ev)
    first = tr.evaluate.__self__  # noqa: F841 (the trainer ran)
    import json

    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    train = [r["loss"] for r in rows if r["split"] == "train"]
    assert train[-1] < 0.6 * train[0] and s["eval"]["loss"] < 0.6 * train[0]


def test_short_reward_run_learns(tok, tmp_path):
    rm = get_algorithm("reward")()
    pairs, _ = SyntheticTask().preference_pairs(400, seed=0)
    data = rm.encode(pairs, tok, 64, Counter())
    _, s = _run(rm, rm.build_models("tiny", tok, tiny_kwargs=TINY), tok, data, tmp_path, 60, 3e-3, data[:64])
    assert s["eval"]["accuracy"] > 0.6 and s["eval"]["loss"] < 0.65


def test_short_dpo_run_prefers_chosen(tok, tmp_path):
    dpo = get_algorithm("dpo")({"beta": 0.1})
    pairs, _ = SyntheticTask().preference_pairs(200, seed=0)
    data = dpo.encode(pairs, tok, 64, Counter())
    m = _model(tok)
    ref = _model(tok)
    _, s = _run(dpo, {"policy": m, "reference": ref}, tok, data, tmp_path, 25, 3e-3, data[:64])
    assert s["eval"]["rewards/accuracies"] > 0.7 and s["eval"]["rewards/margins"] > 0 and s["eval"]["loss"] < 0.69


def test_short_plugin_run(tok, tmp_path, example_plugin):
    simpo = get_algorithm("simpo")()
    pairs, _ = SyntheticTask().preference_pairs(200, seed=0)
    data = simpo.encode(pairs, tok, 64, Counter())
    _, s = _run(simpo, {"policy": _model(tok)}, tok, data, tmp_path, 30, 3e-3, data[:64])
    assert s["eval"]["rewards/accuracies"] > 0.7


def test_scalar_head_init_is_seeded(tok):
    """A new reward/value head does not depend on what consumed the global RNG before."""
    from fastalign.models import load_model

    kw = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    a = load_model("tiny", tokenizer=tok, scalar_head=True, tiny_kwargs=kw, seed=3)
    torch.randn(1000)
    b = load_model("tiny", tokenizer=tok, scalar_head=True, tiny_kwargs=kw, seed=3)
    c = load_model("tiny", tokenizer=tok, scalar_head=True, tiny_kwargs=kw, seed=4)
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
