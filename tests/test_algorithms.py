"""Algorithm registry (built-ins, entry-point plugins, errors), the losses of sft/reward/dpo
against hand-written formulas, and short training runs of each on a tiny model.

Bounds. The loss tests capture the logits (scores) the algorithm's own forward produced (a forward
hook), so model and formula see the same fp32 inputs; the formula is evaluated in fp64 from them and
only fastalign's fp32 evaluation errs: per token the log-softmax (logp_error: a log-sum-exp over V
logits), per sequence a sum of T of those (sum_bound of sum |log p|), per pair the DPO margin (three
subtractions, u times the magnitudes added) and the pair loss (its derivative in the margin times
the margin's error, plus its own evaluation: softplus_error), then a sum over the pairs (sum_bound).
Metrics that compare two numbers (accuracies) may flip only for pairs whose margin lies within its
error bound; those are counted. The DPO precompute test compares a training run with itself (the
same reference forward on the same one-pair batches): exact.
"""

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
from tests.numerics import EXP_ULPS, assert_within, f64, logp_error, matmul_bound, sum_bound, unit_roundoff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_SRC = os.path.join(ROOT, "tests", "example_plugin")
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


U32 = unit_roundoff(torch.float32)
FN = 2 * EXP_ULPS * U32  # one exp/log/log1p: EXP_ULPS ulps, and one ulp of x is at most 2 u |x|


def token_logps64(logits, labels, gemm=None):
    """(log p [B, T-1] in fp64, the bound of one fp32 evaluation of each, mask): position t scores
    labels[t + 1] from logits[t]; masked positions are 0 with bound 0. `gemm` [B, T, V]: the bound
    on the fp32 logits' own error when `logits` are the exact ones (_capture_logits): log p_j moves
    by at most gemm_j + max_k gemm_k (LSE is 1-Lipschitz in the max norm)."""
    z, lab = logits[:, :-1].detach(), labels[:, 1:]
    mask = lab != -100
    at = lab.clamp(min=0)[..., None]
    lp = z.double().log_softmax(-1).gather(-1, at)[..., 0]
    err = logp_error(z).gather(-1, at)[..., 0]
    if gemm is not None:
        g = gemm[:, :-1]
        err = err + g.gather(-1, at)[..., 0] + g.amax(-1)
    return torch.where(mask, lp, 0.0), torch.where(mask, err, 0.0), mask


def seq_logps64(lp, err, mask, mean=False):
    """Per-row sum (or mean) of the token log-probs in fp64 and the bound of fastalign's fp32 one:
    the tokens' own errors plus a sum of T terms in any order (and u |mean| for the division)."""
    s, e = lp.sum(-1), err.sum(-1) + sum_bound(lp.abs().sum(-1), lp.shape[-1])
    if mean:
        n = mask.sum(-1).clamp(min=1)
        s, e = s / n, e / n + U32 * (s / n).abs()
    return s, e


def softplus_error(y):
    """The error of one fp32 softplus (= -logsigmoid(-x)) whose value is y, x given exactly:
    max(x, 0) + log1p(exp(-|x|)): the exp's relative error F = 2 EXP_ULPS u moves log1p by at
    most F (its derivative e / (1 + e) <= 1), log1p's own F |log1p| <= F,
    and the add (or a log(1 + e) form's 1 + e) rounds: u + u |y|."""
    return 2 * FN + U32 + U32 * y.abs()


def _capture_logits(model):
    """The exact (fp64) logits of the model's last forward, from the last hidden states (a forward
    hook on its decoder, not on lm_head: the trainer's fused head computes no logits and a hooked
    head would be refused, see fastalign/models/fused_head.py), and the bound of their fp32 GEMM
    (one evaluation: gamma(H) |h| |W|, tests/numerics.py): (store {"z", "gemm"}, handle)."""
    store = {}
    head = model.get_output_embeddings()

    def hook(mod, args, out):
        h, w = out.last_hidden_state.detach().double(), head.weight.detach().double()
        store["z"] = h @ w.T
        store["gemm"] = matmul_bound(h, w.T) / 2

    return store, model.get_decoder().register_forward_hook(hook)



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
    assert eps.get("simpo-example") == "fastalign_example_plugin:SimPO"
    simpo = get_algorithm("simpo-example")
    assert simpo.__module__ == "fastalign_example_plugin" and simpo.models == ("policy",)
    assert "simpo-example" in list_algorithms() and "ln-dpo" in list_algorithms()
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
    store, hook = _capture_logits(model)
    loss_sum, metrics = sft.loss({"policy": model}, batch)
    hook.remove()
    # cross-entropy over the completion labels, in fp64 from the logits the loss saw
    lp, err, mask = token_logps64(store["z"], batch["labels"], store["gemm"])
    ref = -lp.sum()
    n = int(mask.sum())
    # fastalign: N fp32 log-probs (their errors) summed in fp32 in some order
    bound = err.sum() + sum_bound(lp.abs().sum(), n)
    assert_within(loss_sum, ref, bound, "sft summed loss")
    n_completion = sum(sum(t != -100 for t in e["labels"]) for e in exs)
    assert sft.loss_units(batch) == n_completion == n  # prompt and padding carry no loss
    assert_within(f64(metrics["loss"]), ref / n, bound / n + U32 * (ref / n).abs(), "sft mean loss")  # + the division


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
    # the score is read at each sequence's last real token: the same forward, the same numbers
    last = batch["attention_mask"].sum(1) - 1
    per_tok = models["reward"](batch["input_ids"], batch["attention_mask"])
    assert torch.equal(scores, per_tok[torch.arange(2 * b), last])
    # Bradley-Terry in fp64 from the fp32 scores (the loss's forward computed the same scores).
    # fastalign: d = c - r rounds (u |d|, softplus is 1-Lipschitz), one softplus each, the mean
    # of b terms (sum_bound, then u for / b), then * b (u)
    d = scores[:b].double() - scores[b:].double()
    terms = F.softplus(-d)
    ref = terms.sum()
    bound = (U32 * d.abs() + softplus_error(terms)).sum() + sum_bound(terms.sum(), b) + 2 * U32 * ref
    assert_within(loss_sum, ref, bound, "reward summed loss")
    assert m["accuracy"] == float((scores[:b] > scores[b:]).float().mean())  # the same scores


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_loss_matches_formula(tok, loss_type):
    beta, eps = 0.2, 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    dpo = get_algorithm("dpo")({"beta": beta, "loss_type": loss_type, "label_smoothing": eps})
    policy, ref = _model(tok, 0), _model(tok, 1)
    exs = dpo.encode(_pairs(tok), tok, 64, Counter())
    batch = dpo.collate(exs, tok)
    (ps, ph), (rs, rh) = _capture_logits(policy), _capture_logits(ref)
    loss_sum, m = dpo.loss({"policy": policy, "reference": ref}, batch)
    ph.remove(), rh.remove()

    # sequence log-probs in fp64 from the logits each model's forward produced, with the bound of
    # fastalign's fp32 evaluation
    p, p_err = seq_logps64(*token_logps64(ps["z"], batch["labels"], ps["gemm"]), mean=loss_type == "ipo")
    r, r_err = seq_logps64(*token_logps64(rs["z"], batch["labels"], rs["gemm"]), mean=loss_type == "ipo")
    b = len(exs)
    d = (p[:b] - r[:b]) - (p[b:] - r[b:])
    # the margin: four inputs' errors, three subtractions (any grouping: each result is at most
    # the sum of the four magnitudes)
    mags = p[:b].abs() + r[:b].abs() + p[b:].abs() + r[b:].abs()
    d_err = p_err[:b] + r_err[:b] + p_err[b:] + r_err[b:] + 3 * U32 * mags
    x = beta * d
    sp = F.softplus
    if loss_type == "sigmoid":
        want = (1 - eps) * sp(-x) + eps * sp(x)
        slope = beta  # |d loss / d d| <= beta ((1 - eps) sigmoid(-x) + eps sigmoid(x)) <= beta
        own = (1 - eps) * softplus_error(sp(-x)) + eps * softplus_error(sp(x)) + U32 * x.abs() + 3 * U32 * want
    elif loss_type == "ipo":
        k = 1 / (2 * beta)
        want = (d - k) ** 2
        slope = 2 * (d - k).abs() + d_err  # (d + e - k)^2 - (d - k)^2 = e (2 (d - k) + e)
        own = 2 * (d - k).abs() * U32 * (k + (d - k).abs()) + U32 * want  # 1 / (2 beta), the -, the square
    elif loss_type == "hinge":
        want = torch.relu(1 - x)
        slope = beta
        own = U32 * (x.abs() + (1 - x).abs())
    else:
        want = ((1 - eps) * sp(-x) - eps * sp(x)) / (1 - 2 * eps)
        slope = beta / (1 - 2 * eps)
        own = (((1 - eps) * softplus_error(sp(-x)) + eps * softplus_error(sp(x)) + U32 * x.abs()
                + 3 * U32 * ((1 - eps) * sp(-x) + eps * sp(x))) / (1 - 2 * eps) + 2 * U32 * want.abs())
    pair_err = slope * d_err + own
    assert_within(loss_sum, want.sum(), pair_err.sum() + sum_bound(want.abs().sum(), b), f"dpo {loss_type} loss")

    # implicit rewards beta (logp - ref): the two inputs' errors, the subtraction, * beta; the mean
    # of b (sum_bound, / b)
    rc, rr = beta * (p[:b] - r[:b]), beta * (p[b:] - r[b:])
    rc_err = beta * (p_err[:b] + r_err[:b]) + 2 * U32 * rc.abs()
    rr_err = beta * (p_err[b:] + r_err[b:]) + 2 * U32 * rr.abs()

    def mean_bound(v, e):
        return e.sum() / b + sum_bound(v.abs().sum(), b) / b + U32 * v.mean().abs()

    assert_within(f64(m["rewards/chosen"]), rc.mean(), mean_bound(rc, rc_err), "rewards/chosen")
    margin_err = rc_err + rr_err + U32 * (rc - rr).abs()
    assert_within(f64(m["rewards/margins"]), (rc - rr).mean(), mean_bound(rc - rr, margin_err), "rewards/margins")
    # an accuracy may flip only where the margin is within its error; the fp32 mean of the b
    # indicators rounds k / b once
    ambiguous = int(((rc - rr).abs() <= margin_err).sum())
    acc = (rc > rr).double().mean()
    assert_within(f64(m["rewards/accuracies"]), acc, ambiguous / b + U32 * acc, "rewards/accuracies")


def test_dpo_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type 'nope'"):
        get_algorithm("dpo")({"loss_type": "nope"})
    with pytest.raises(ValueError, match="unknown option"):
        get_algorithm("dpo")({"betta": 0.1})


def test_dpo_precomputed_reference_logps_equal_reference_model(tok, tmp_path):
    """Precomputing runs the reference over the data in chunks of batch_size; with batch_size 1
    those chunks are exactly the one-pair micro-batches the other run's reference sees in its
    steps, so both runs do the same arithmetic on the same inputs: bit-identical parameters."""
    from fastalign.trainer import Trainer

    pairs = _pairs(tok, 12)
    out = {}
    for pre in (False, True):
        dpo = get_algorithm("dpo")({"precompute_ref_logps": pre})
        data = dpo.encode(pairs, tok, 64, Counter())
        tr = Trainer(dpo, {"policy": _model(tok, 0), "reference": _model(tok, 1)}, tok, data, None,
                     dict(output_dir=str(tmp_path / str(pre)), max_steps=3, batch_size=1, grad_accum=4, lr=1e-3,
                          progress=False, plot=False, save_final=False))
        tr.fit()
        out[pre] = [p.detach().clone() for p in tr.models["policy"].parameters()]
        assert ("reference" in tr.models) != pre  # precomputing frees the reference model
    assert not torch.equal(out[False][0], _model(tok, 0).get_input_embeddings().weight)  # it trained
    for a, b in zip(out[False], out[True]):
        assert torch.equal(a, b)


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
    simpo = get_algorithm("simpo-example")()
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
