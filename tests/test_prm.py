"""Process reward models (`prm`): the stepwise data format and its errors, where the step labels
sit after tokenisation, the token-classification head, the loss against a two-class
cross-entropy at the separator positions only, the metrics on hand-checkable cases, the
synthetic task's step labels, checkpoint save / resume. (No learning test yet: see
docs/reward_models.md, "What a tiny PRM learns".)

Bounds. The loss test compares fastalign's fp32 loss with the same two-class cross-entropy in
float64 on the same logits (the head's forward is deterministic: the logits are computed again).
Per labelled step the fp32 BCE-with-logits evaluates (1 - y) z + max(-z, 0) + log(exp(-m) +
exp(-z - m)): the argument -z - m rounds (u |z|, passed at most 1:1 through the log-sum-exp),
two exps (EXP_ULPS ulps each on values <= 1: their sum moves by <= 2 F relatively, F = 2 EXP_ULPS u)
plus the sum's rounding, the log (F |log| + the argument's relative error), and two adds (u each,
of at most |z| + the term): 4 F + 3 u + 3 u (|z| + term) + u |z| per step; then a sum of N steps
in any order (sum_bound).
"""

import json
import os
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from fastalign.algorithms import get_algorithm
from fastalign.algorithms.prm import (evaluate_steps, first_errors, last_step_mask, prm_reward_fn, reduce_steps,
                                      score_steps, step_cross_entropy)
from fastalign.data import collate as C
from fastalign.data.formats import DataFormatError, load_records
from fastalign.data.stepwise import encode_steps
from fastalign.data.synthetic import STEP_TASKS, TASKS, Oracle, SyntheticTask, solve, solve_steps
from fastalign.errors import ConfigError
from tests.numerics import EXP_ULPS, assert_within, sum_bound, unit_roundoff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
U32 = unit_roundoff(torch.float32)
FN = 2 * EXP_ULPS * U32


@pytest.fixture(scope="module")
def tok():
    from fastalign.models import tiny_tokenizer

    return tiny_tokenizer()


def _prm(config=None):
    return get_algorithm("prm")(config)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---- the stepwise format --------------------------------------------------------------------------


def test_stepwise_format_loads_and_counts(tmp_path):
    good = {"prompt": "countup 1 1", "completions": ["1+1=2"], "labels": [True]}
    chat = {"prompt": [{"role": "user", "content": "q"}], "completions": ["a", "b"], "labels": [True, False]}
    empty = {"prompt": "q", "completions": [], "labels": []}
    recs, stats = load_records("stepwise", _write(tmp_path / "s.jsonl", [good, chat, empty]))
    assert recs == [good, {**chat, "prompt": [{"role": "user", "content": "q"}]}]
    assert stats["skipped: no steps"] == 1 and stats["records kept"] == 2
    bundled, _ = load_records("stepwise", os.path.join(ROOT, "fastalign", "data", "bundled", "stepwise_sample.jsonl"))
    assert len(bundled) == 24 and all(r["labels"] == Oracle.step_labels(r["prompt"], r["completions"]) for r in bundled)


@pytest.mark.parametrize("bad, message", [
    ('["a"]', "expected a JSON object, got list"),
    ({"prompt": "q", "labels": [True]}, "missing field 'completions'"),
    ({"completions": ["a"], "labels": [True]}, "missing field 'prompt'"),
    ({"prompt": 3, "completions": ["a"], "labels": [True]}, "'prompt' must be a non-empty list of messages"),
    ({"prompt": "  ", "completions": ["a"], "labels": [True]}, "field 'prompt' is empty"),
    ({"prompt": "q", "completions": "a\nb", "labels": [True]}, "field 'completions' must be a list of steps"),
    ({"prompt": "q", "completions": ["a", 3], "labels": [True, True]}, r"completions\[1\] must be a non-empty string, got 3"),
    ({"prompt": "q", "completions": ["a", " "], "labels": [True, True]}, r"completions\[1\] must be a non-empty string, got ' '"),
    ({"prompt": "q", "completions": ["a"], "labels": True}, "field 'labels' must be a list of booleans"),
    ({"prompt": "q", "completions": ["a", "b"], "labels": [True, 0]}, r"labels\[1\] must be true or false, got 0"),
    ({"prompt": "q", "completions": ["a", "b"], "labels": [True]}, r"2 steps in 'completions' but 1 'labels'"),
    ({"prompt": [{"role": "robot", "content": "x"}], "completions": ["a"], "labels": [True]}, "has role 'robot'"),
])
def test_stepwise_format_errors_name_file_and_line(tmp_path, bad, message):
    ok = {"prompt": "q", "completions": ["a"], "labels": [True]}
    path = _write(tmp_path / "bad.jsonl", [ok, ok, bad])
    with pytest.raises(DataFormatError, match=rf"bad\.jsonl:3: .*{message}"):
        load_records("stepwise", path)


# ---- tokenisation: where the labels sit -------------------------------------------------------------


def test_labels_sit_on_the_last_separator_token(tok):
    rec = {"prompt": "countup 1 2", "completions": ["1+1=2", "2+1=4"], "labels": [True, False]}
    (ex,) = encode_steps([rec], tok, 128, separator="\n")
    prompt = C._ids(tok, C.prompt_text(tok, "countup 1 2"))
    assert ex["input_ids"] == prompt + C._ids(tok, "1+1=2\n2+1=4\n") and ex["n_steps"] == 2
    p = len(prompt)
    want = [C.IGNORE] * len(ex["input_ids"])
    want[p + 5], want[p + 11] = 1, 0  # the two "\n" (one character = one token here)
    assert ex["labels"] == want
    # a separator of several tokens: the label on its last one
    (ex2,) = encode_steps([rec], tok, 128, separator=" ;;")
    labelled = [i for i, v in enumerate(ex2["labels"]) if v != C.IGNORE]
    assert labelled == [p + 7, p + 15] and all(ex2["input_ids"][i] == tok.convert_tokens_to_ids(";") for i in labelled)
    with pytest.raises(ValueError, match="step_separator must be a string that encodes to at least one token"):
        encode_steps([rec], tok, 128, separator="")


def test_truncation_keeps_whole_steps_and_counts(tok):
    rec = {"prompt": "countup 1 2", "completions": ["1+1=2", "2+1=4"], "labels": [True, False]}
    p = len(C._ids(tok, C.prompt_text(tok, "countup 1 2")))
    st = Counter()
    (ex,) = encode_steps([rec], tok, p + 8, st)  # the first step fits, the second is cut
    assert len(ex["input_ids"]) == p + 8 and [v for v in ex["labels"] if v != C.IGNORE] == [1]
    assert st["truncated: steps cut at max_length"] == 1
    assert encode_steps([rec], tok, p + 3, st) == [] and st["skipped: no whole step fits in max_length"] == 1
    # train_on_last_step_only: the last step of each response, none where it was cut
    batch = _prm().collate(encode_steps([rec], tok, 128) + [ex], tok)
    last = last_step_mask(batch["labels"], batch["n_steps"])
    assert last.sum(1).tolist() == [1, 0] and int(last[0].nonzero()) == p + 11
    assert _prm({"train_on_last_step_only": True}).loss_units(batch) == 1 and _prm().loss_units(batch) == 3


# ---- head, loss, metrics --------------------------------------------------------------------------------


def _synthetic_batch(tok, alg, n=8, seed=0, error_rate=0.5):
    recs = SyntheticTask(tasks=STEP_TASKS).step_labelled(n, seed, error_rate=error_rate)
    return recs, alg.collate(alg.encode(recs, tok, 64, Counter()), tok)


def test_head_shapes_and_scores(tok):
    alg = _prm()
    model = alg.build_models("tiny", tok, tiny_kwargs=TINY)["prm"]
    recs, batch = _synthetic_batch(tok, alg)
    z = model(batch["input_ids"], batch["attention_mask"])
    assert z.shape == batch["input_ids"].shape and z.dtype == torch.float32
    one = score_steps(model, tok, recs[0]["prompt"], recs[0]["completions"])
    many = score_steps(model, tok, [r["prompt"] for r in recs], [r["completions"] for r in recs], batch_size=3)
    assert [len(p) for p in many] == [len(r["completions"]) for r in recs] and len(one) == len(recs[0]["completions"])
    # the per-step probabilities are sigmoid of the head's logits at the separators: on the batch
    # the trainer collates (the same tensors, the same forward: exact), and one response alone is
    # the batch of that one response
    mask = batch["labels"] != C.IGNORE
    same = score_steps(model, tok, [r["prompt"] for r in recs], [r["completions"] for r in recs], batch_size=len(recs))
    assert same == [torch.sigmoid(z[j][mask[j]]).tolist() for j in range(len(recs))]
    assert one == score_steps(model, tok, [recs[0]["prompt"]], [recs[0]["completions"]])[0]
    with pytest.raises(ValueError, match=r"steps\[0\] must be a non-empty list of strings"):
        score_steps(model, tok, ["q"], [[]])
    with pytest.raises(ValueError, match="do not fit in max_length=5"):
        score_steps(model, tok, "countup 1 1", ["1+1=2"], max_length=5)
    fn = prm_reward_fn(model, tok, reduce="min")
    r = fn(recs[0]["prompt"], "\n".join(recs[0]["completions"]) + "\n")
    assert r == min(one) and fn("q", "\n \n") == 0.0  # the same steps, the same forward
    assert reduce_steps([0.5, 0.2, 0.9], "prod") == pytest.approx(0.09) and reduce_steps([0.5, 0.2], "last") == 0.2
    with pytest.raises(ValueError, match="reduce must be one of min, prod, mean, last"):
        prm_reward_fn(model, tok, reduce="max")


def test_loss_is_two_class_cross_entropy_at_separators_only(tok):
    alg = _prm()
    models = alg.build_models("tiny", tok, tiny_kwargs=TINY)
    _, batch = _synthetic_batch(tok, alg)
    loss_sum, m = alg.loss(models, batch)
    z = models["prm"](batch["input_ids"], batch["attention_mask"]).detach().double()  # the same forward
    labels = batch["labels"]
    mask = labels != C.IGNORE
    # the token-classification loss of TRL's PRMTrainer (transformers' CrossEntropyLoss over two
    # classes, ignore_index=-100), with the two-class logits (0, z)
    two = torch.stack([torch.zeros_like(z), z], -1)
    terms = F.cross_entropy(two.view(-1, 2), labels.view(-1), ignore_index=C.IGNORE, reduction="none")
    ref = terms.sum()
    n = int(mask.sum())
    zs = z[mask]
    per = 4 * FN + 3 * U32 + 3 * U32 * (zs.abs() + terms[mask.view(-1)]) + U32 * zs.abs()
    assert_within(loss_sum, ref, per.sum() + sum_bound(terms.abs().sum(), n), "PRM summed loss")
    assert alg.loss_units(batch) == n and m["loss"] == float(loss_sum.detach()) / n
    # only the separator positions carry gradient: d loss / d z = sigmoid(z) - y there, exactly 0
    # elsewhere; fp32 sigmoid within (2 EXP_ULPS + 4) u of itself (exp, 1 + e, the division), and
    # the subtraction of y rounds once
    zz = (3 * torch.randn(labels.shape)).requires_grad_()
    (g,) = torch.autograd.grad(step_cross_entropy(zz, labels, mask), zz)
    sig = torch.sigmoid(zz.detach().double())
    want = torch.where(mask, sig - labels.clamp(min=0).double(), 0.0)
    assert torch.equal(g[~mask], torch.zeros_like(g[~mask]))
    assert_within(g[mask], want[mask], (2 * EXP_ULPS + 4) * U32 * sig[mask] + U32 * want[mask].abs(),
                  "gradient at the separators")


def test_step_and_first_error_accuracy_by_hand(tok):
    # three responses; logits at their steps (p > 1/2 iff z > 0):
    #   labels [1, 1, 0]  logits [2, -1, -3] -> predicted [1, 0, 0]: steps right 2/3; first wrong 1 vs 2: miss
    #   labels [1, 0]     logits [.5, .7]    -> predicted [1, 1]:    1/2;              none vs 1: miss
    #   labels [1, 0]     logits [1, -1]     -> predicted [1, 0]:    2/2;              1 vs 1: hit
    # step accuracy 5/7, first-error accuracy 1/3, labels correct 4/7
    labels = torch.full((3, 6), C.IGNORE)
    logits = torch.zeros(3, 6)
    for row, (pos, lab, zs) in enumerate((([1, 3, 5], [1, 1, 0], [2, -1, -3]), ([0, 4], [1, 0], [0.5, 0.7]),
                                          ([2, 3], [1, 0], [1, -1]))):
        labels[row, pos] = torch.tensor(lab)
        logits[row, pos] = torch.tensor(zs, dtype=torch.float32)
    logits[labels == C.IGNORE] = -50.0  # never read: a wrong mask would show
    batch = {"input_ids": torch.ones(3, 6, dtype=torch.long), "attention_mask": torch.ones(3, 6, dtype=torch.long),
             "labels": labels, "n_steps": torch.tensor([3, 2, 2])}
    alg = _prm()
    _, m = alg.loss({"prm": lambda ids, mask, packed=False: logits}, batch)
    assert m["step_accuracy"] == pytest.approx(5 / 7) and m["first_error_accuracy"] == pytest.approx(1 / 3)
    assert m["step_label_rate"] == pytest.approx(4 / 7)
    pred, true = first_errors(logits > 0, labels == 1, labels != C.IGNORE)
    assert pred.tolist() == [1, 2, 1] and true.tolist() == [2, 1, 1]
    # train_on_last_step_only: the last steps (z = -3 / 0.7 / -1 vs 0 / 0 / 0): 2 of 3 right
    _, m_last = _prm({"train_on_last_step_only": True}).loss({"prm": lambda *a, **k: logits}, batch)
    assert m_last["step_accuracy"] == pytest.approx(2 / 3)


class _StubPRM(torch.nn.Module):
    """Logit -2 where the step just ended in "x" (the token before the separator), +2 elsewhere."""

    def __init__(self, tok):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.x = tok.convert_tokens_to_ids("x")

    def forward(self, input_ids, attention_mask=None, packed=False):
        prev = torch.nn.functional.pad(input_ids, (1, 0))[:, :-1]
        return torch.where(prev == self.x, -2.0, 2.0) + self.w


def test_evaluate_steps_by_hand(tok):
    recs = [{"prompt": "q", "completions": ["a", "bx", "c"], "labels": [True, False, False]},  # pred T F T
            {"prompt": "q", "completions": ["ax", "b"], "labels": [True, True]},  # pred F T
            {"prompt": "q", "completions": ["a"], "labels": [False]}]  # pred T
    got = evaluate_steps(_StubPRM(tok), tok, recs, batch_size=2)
    # steps right: 2 + 1 + 0 = 3 of 6; first wrong: (1 vs 1) hit, (0 vs none) miss, (none vs 0) miss
    assert got == {"step_accuracy": 0.5, "first_error_accuracy": 1 / 3, "step_label_rate": 0.5,
                   "majority_baseline": 0.5, "steps": 6, "responses": 3}


def test_bad_options(tok):
    with pytest.raises(ConfigError, match="step_separator must be a non-empty string"):
        _prm({"step_separator": ""})
    with pytest.raises(ConfigError, match="train_on_last_step_only must be true or false"):
        _prm({"train_on_last_step_only": "yes"})


# ---- the synthetic task's step labels ------------------------------------------------------------------


def test_synthetic_step_labels_come_from_the_solver():
    assert solve_steps("countup 8 3") == ["8+1=9", "9+1=0", "0+1=1"] and solve("countup 8 3") == "8+1=9\n9+1=0\n0+1=1"
    assert Oracle.score("countup 8 3", "8+1=9\n9+1=0\n0+1=2") == pytest.approx(2 / 3)
    # a step that adds right from a wrong carried value is still off the solver's track
    assert Oracle.step_labels("countup 8 3", ["8+1=9", "9+1=1", "1+1=2"]) == [True, False, False]
    for bad in ("sort 3 1 2", "countup 12 3", "countup 1 0", "countup 1"):
        with pytest.raises(ValueError, match="not a multi-step task prompt"):
            solve_steps(bad)
    # the default task mix is unchanged: no countup prompt
    assert "countup" not in TASKS and all(not r["prompt"].startswith("countup") for r in SyntheticTask().sample(200))
    n, rate = 2000, 0.3
    recs = SyntheticTask(tasks=STEP_TASKS).step_labelled(n, seed=5, error_rate=rate)
    assert recs == SyntheticTask(tasks=STEP_TASKS).step_labelled(n, seed=5, error_rate=rate)  # deterministic
    wrong = 0
    for r in recs:
        want = solve_steps(r["prompt"])
        assert r["labels"] == [s == w for s, w in zip(r["completions"], want)] and len(r["completions"]) == len(want)
        k = r["labels"].index(False) if False in r["labels"] else None
        assert r["labels"] == [True] * (len(want) if k is None else k) + [False] * (0 if k is None else len(want) - k)
        wrong += k is not None
    # the wrong-response count is Binomial(n, rate): within 5 standard deviations (a miss chance of ~6e-7)
    assert abs(wrong - n * rate) <= 5 * (n * rate * (1 - rate)) ** 0.5
    assert all(all(r["labels"]) for r in SyntheticTask(tasks=STEP_TASKS).step_labelled(50, error_rate=0.0))
    assert not any(all(r["labels"]) for r in SyntheticTask(tasks=STEP_TASKS).step_labelled(50, error_rate=1.0))
    with pytest.raises(ValueError, match="no multi-step task among"):
        SyntheticTask().step_labelled(5)
    with pytest.raises(ValueError, match=r"error_rate must be in \[0, 1\]"):
        SyntheticTask(tasks=STEP_TASKS).step_labelled(5, error_rate=1.5)
    # the mistakes are of both kinds: a wrong sum, and a wrong value carried in
    firsts = set()
    for r in recs:
        if False in r["labels"]:
            k = r["labels"].index(False)
            a = r["completions"][k].split("+")[0]
            want_a = solve_steps(r["prompt"])[k].split("+")[0]
            firsts.add("carry" if a != want_a else "sum")
    assert firsts == {"carry", "sum"}


# ---- training: checkpoint and resume, the CLI -----------------------------------------------------------


def _trainer(tok, out, data, **kw):
    from fastalign.trainer import Trainer

    alg = _prm()
    cfg = dict(output_dir=str(out), max_steps=6, batch_size=8, lr=3e-3, progress=False, plot=False, warmup_steps=1,
               save_every=2, save_total_limit=5)
    cfg.update(kw)
    return Trainer(alg, alg.build_models("tiny", tok, tiny_kwargs=TINY), tok, data, data[:16], cfg)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def test_checkpoint_resume_is_exact_and_the_saved_prm_scores(tok, tmp_path):
    from safetensors.torch import load_file

    from fastalign.models import load_model
    from fastalign.models.heads import HEAD_FILE, ScalarHeadModel

    recs = SyntheticTask(tasks=STEP_TASKS).step_labelled(64, seed=3)
    data = _prm().encode(recs, tok, 64, Counter())
    full = tmp_path / "full"
    tr = _trainer(tok, full, data)
    tr.fit()
    out = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step-000004", out / "checkpoints" / "step-000004")
    _trainer(tok, out, data, resume_from="latest").fit()
    assert _losses(out) == _losses(full)[4:]
    a, b = (os.path.join(d, "checkpoints", "step-000006", "prm") for d in (full, out))
    for f in ("model.safetensors", HEAD_FILE):
        wa, wb = load_file(os.path.join(a, f)), load_file(os.path.join(b, f))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the saved directory loads as a PRM and scores as the trained model does
    saved = load_model(a)
    assert isinstance(saved, ScalarHeadModel)
    got = score_steps(saved, tok, recs[0]["prompt"], recs[0]["completions"])
    want = score_steps(tr.models["prm"], tok, recs[0]["prompt"], recs[0]["completions"])
    assert got == want


def test_cli_trains_prm_from_config(tmp_path, capsys):
    from fastalign import cli

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = cli.main(["train", "prm", "--config", "prm", f"trainer.output_dir={tmp_path / 'a'}", "trainer.max_steps=2",
                       "trainer.progress=false", "data.train_size=64", "data.eval_size=16"])
        assert rc == 0 and "done at step 2" in capsys.readouterr().out
        rc = cli.main(["train", "prm", "--config", "prm", f"trainer.output_dir={tmp_path / 'b'}", "trainer.max_steps=2",
                       "trainer.progress=false", "data.format=stepwise", "data.train=bundled:stepwise_sample.jsonl",
                       "data.eval=bundled:stepwise_sample.jsonl"])
        assert rc == 0
        rows = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
        assert any(r["split"] == "eval" and "step_accuracy" in r for r in rows)
    finally:
        os.chdir(cwd)
