"""online_dpo (fastalign/algorithms/online_dpo.py) and its judges (judges.py): each judge on
hand-made pairs, the LLM judge's position-bias cancellation and order symmetry on the tiny model,
the step in the trainer (pairs as the judge decided them, the DPO loss against its formula), the
length-drift monitor by hand, exact resume, the CLI and its configs, bad configs; slow: online DPO
with the oracle judge beats the SFT model, and a length-biased judge makes responses longer and
is flagged.

Bounds. Judges compare Python floats or the same fp32 numbers: exact. The LLM judge's margin is
checked against the same formula from log-probs of the same rows computed one question at a time
(another batch shape: each log-prob may differ by the summation-order bound of its matmuls and
log-sum-exp, logp_bound below). The DPO loss is checked in fp64 from the fp32 token log-probs the
loss used: the fused sequence sums in any order (sum_bound), the subtractions, one logsigmoid
(EXP_ULPS ulps) per pair and the sum over pairs (sum_bound). Resume is exact (the same arithmetic on
the same inputs). The monitor is Python-float arithmetic: its flags are compared exactly on values
far from the thresholds.
"""

import contextlib
import json
import math
import os
import random

import pytest
import torch

from fastalign.algorithms import get_algorithm, token_logps
from fastalign.algorithms import judges as J
from fastalign.algorithms.monitors import LengthDriftMonitor
from fastalign.data import collate as C
from fastalign.data.synthetic import Oracle
from fastalign.errors import ConfigError
from fastalign.models import ScalarHeadModel, load_model, tiny_model, tiny_tokenizer
from tests.numerics import EXP_ULPS, assert_within, f64, gamma, sum_bound, unit_roundoff
from tests.test_rl_algorithms import TINY, _prompts, _straight_and_resumed, _trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U32 = unit_roundoff(torch.float32)
FN = 2 * EXP_ULPS * U32  # one exp/log in fp32


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


class _Context:
    """What the judges read of a run: models, tokenizer, device, batch size, precision, step."""

    def __init__(self, tok, models=None):
        self.tokenizer, self.models, self.device, self.batch_size, self.step = tok, models or {}, "cpu", 4, 0

    def to_device(self, batch):
        return batch

    def autocast(self):
        return contextlib.nullcontext()


def _first(prompt, a, b):  # a judge_fn importable by dotted path
    return 0


# ---- the judges on hand-made pairs ---------------------------------------------------------------------

P = "reverse 3 1 4"  # answer: 4 1 3


def test_oracle_judge_and_its_biases(tok):
    ctx = _Context(tok)
    a = ["4 1 3", "4 1", "4 1 9", "4 1 3", "4 1 3"]
    b = ["4 1", "4 1 3", "4 9 3", "4 1 3 3 3", "4 1 3!"]
    plain, scores = J.OracleJudge().judge(ctx, [P] * 5, a, b, seed=0)
    # exact answer beats a dropped item both ways; two one-item errors (2/3 each) tie; the padded
    # answer scores 3/5 < 1; "3!" is read as a wrong item (2/3)
    assert plain == [0, 1, None, 0, 0]
    assert torch.equal(scores, torch.tensor([[Oracle.score(P, x), Oracle.score(P, y)] for x, y in zip(a, b)]))
    # length bias 0.5 per item: 1 + 1.5 < 3/5 + 2.5, so the padded answer wins; 4 1 (2 items) still loses
    got, s = J.OracleJudge(length_bias=0.5).judge(ctx, [P] * 5, a, b, seed=0)
    assert got == [0, 1, None, 1, 0]
    assert s[3].tolist() == [pytest.approx(1 + 1.5), pytest.approx(0.6 + 2.5)]
    # style bias 1: "4 1 3!" (2/3 + 1) beats "4 1 3" (1)
    assert J.OracleJudge(style_bias=1.0).judge(ctx, [P] * 5, a, b, seed=0)[0] == [0, 1, None, 0, 1]
    # noise 1 flips every preference (ties stay ties); noise 0.5 is drawn from the seed
    assert J.OracleJudge(noise=1.0).judge(ctx, [P] * 5, a, b, seed=0)[0] == [1, 0, None, 1, 1]
    many_a, many_b = ["4 1 3"] * 200, ["4 1"] * 200
    half = J.OracleJudge(noise=0.5)
    first = half.judge(ctx, [P] * 200, many_a, many_b, seed=7)[0]
    assert first == half.judge(ctx, [P] * 200, many_a, many_b, seed=7)[0]  # a resumed step flips the same
    assert first != half.judge(ctx, [P] * 200, many_a, many_b, seed=8)[0]
    assert 0.3 < sum(first) / 200 < 0.7  # about half flipped (200 fair coins: 6 sigma either side)
    with pytest.raises(ValueError, match="noise must be in"):
        J.OracleJudge(noise=1.5)


def test_fn_judge_registry_and_dotted_paths(tok):
    ctx = _Context(tok)
    longer = J.FnJudge(J.resolve_judge_fn("longer"))
    assert longer.judge(ctx, [P] * 3, ["a b", "a", "a b"], ["a", "a b", "c d"], seed=0) == ([0, 1, None], None)
    assert J.resolve_judge_fn("tests.test_online_dpo:_first") is _first
    assert J.resolve_judge_fn("tests.test_online_dpo._first") is _first
    for bad in (2, True, "a", 0.5):
        with pytest.raises(TypeError, match="judge_fn must return 0 .* got"):
            J.FnJudge(lambda p, a, b, bad=bad: bad).judge(ctx, [P], ["x"], ["y"], seed=0)
    with pytest.raises(ConfigError, match="algo.judge_fn: 'nope' is neither .*registered: .*longer"):
        J.resolve_judge_fn("nope")
    with pytest.raises(ConfigError, match="algo.judge_fn: cannot import 'no_such_module:f'"):
        J.resolve_judge_fn("no_such_module:f")
    with pytest.raises(ConfigError, match="is not callable"):
        J.resolve_judge_fn("tests.test_online_dpo:P")
    with pytest.raises(ValueError, match="already registered"):
        J.register_judge_fn("longer")(_first)


class _LengthRM(torch.nn.Module):
    """A 'reward model' whose score is the number of real tokens: the longer text wins."""

    def score(self, input_ids, attention_mask, packed=False):
        return attention_mask.sum(1).float()


def test_reward_model_judge(tok):
    ctx = _Context(tok, {"reward": _LengthRM()})
    got, scores = J.RewardModelJudge().judge(ctx, [P] * 3, ["4 1 3", "4", "ab"], ["4 1", "4 1", "cd"], seed=0)
    assert got == [0, 1, None]
    # each scored as prompt_text + the completion with the template's end of turn, as reward training encodes it
    def n_tokens(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    want = [n_tokens(C.prompt_text(tok, P)) + n_tokens(C.completion_text(tok, P, r)) for r in ("4 1 3", "4 1")]
    assert scores[0].tolist() == want

    class _NaN(_LengthRM):
        def score(self, input_ids, attention_mask, packed=False):
            return torch.full((input_ids.shape[0],), float("nan"))

    with pytest.raises(FloatingPointError, match="non-finite score"):  # TrainingDivergedError
        J.RewardModelJudge().judge(_Context(tok, {"reward": _NaN()}), [P], ["a"], ["b"], seed=0)


def _logp_bound(model, batch):
    """Bound on how far one log-prob sum of `batch` can move with another batch shape (another
    blocking of every matmul, another log-sum-exp order): the final logits' matmul bound plus
    logp_error's log-softmax bound, per label token, summed over the row's label tokens. Earlier
    layers' roundings move the hidden state too; they are of the same relative size and are
    covered by a factor 4 on the whole."""
    from tests.numerics import logp_error, matmul_bound

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    h = out.hidden_states[-1][:, :-1]
    w = model.get_output_embeddings().weight
    z = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != C.IGNORE
    idx = labels.clamp(min=0)[..., None]
    per = (matmul_bound(h, w.t()).gather(-1, idx) * 2 + logp_error(z).gather(-1, idx))[..., 0]
    return 4 * (per * mask).sum(1)


def test_llm_judge_margin_formula_and_symmetry(tok):
    torch.manual_seed(0)
    model = tiny_model(tok, seed=3, **TINY).eval()
    ctx = _Context(tok, {"judge": model})
    rng = random.Random(0)
    prompts = [f"sort {rng.randint(0, 9)} {rng.randint(0, 9)} {rng.randint(0, 9)}" for _ in range(6)]
    a = [" ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 4))) for _ in range(6)]
    b = [" ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 4))) for _ in range(6)]
    judge = J.LLMJudge("judge")
    with torch.no_grad():
        m = judge.margins(ctx, prompts, a, b)
        m_swapped = judge.margins(ctx, prompts, b, a)
        assert torch.equal(m_swapped, -m)  # one canonical order per pair: exactly antisymmetric
        got, scores = judge.judge(ctx, prompts, a, b, seed=0)
        assert got == [None if x == 0 else (0 if x > 0 else 1) for x in m.tolist()]
        assert set(got) <= {0, 1, None} and torch.equal(scores, torch.stack([m / 2, -m / 2], 1))
        assert judge.judge(ctx, prompts, b, a, seed=0)[0] == [None if c is None else 1 - c for c in got]
        # the formula, one question at a time: ((lA - lB)(a, b) - (lA - lB)(b, a)) / 2
        for i, (p, x, y) in enumerate(zip(prompts, a, b)):
            lp, bound = {}, 0.0
            for order, (u, v) in (("ab", (x, y)), ("ba", (y, x))):
                for lab in ("A", "B"):
                    q = J.DEFAULT_TEMPLATE.format(prompt=p, a=u, b=v)
                    batch = J._rows(tok, [q], [lab], labelled=True)
                    logps, mask = token_logps(model, batch)
                    lp[order, lab] = f64(logps.float().mul(mask).sum())
                    bound = bound + _logp_bound(model, batch)[0].double()
            want = ((lp["ab", "A"] - lp["ab", "B"]) - (lp["ba", "A"] - lp["ba", "B"])) / 2
            assert_within(m[i], want, bound / 2 + U32 * 8 * abs(float(want)), f"margin {i}")


def test_llm_judge_cancels_position_bias(tok):
    # every layer's output projections zeroed: each position's logits depend on its own token
    # only, so the answer after any question is the same -- a judge that only ever says one
    # letter (pure position bias). Asked in both orders, every margin is 0 up to the rounding of
    # the same computation in another batch row (0 where the rows' blocking agrees): ties.
    model = tiny_model(tok, seed=1, **TINY).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    ctx = _Context(tok, {"judge": model})
    prompts, a, b = [P] * 4, ["4 1 3", "4", "1 1", "3"], ["4 1", "4 1 3", "9", "3 3 3 3"]
    with torch.no_grad():
        biased = J.LLMJudge("judge").margins(ctx, prompts, a, b)
        # margin = (4 log-probs, each computed once) / 2: within twice one log-prob's bound
        q = J.DEFAULT_TEMPLATE.format(prompt=P, a=a[0], b=b[0])
        bound = 2 * float(_logp_bound(model, J._rows(tok, [q, q], ["A", "B"], labelled=True)).max())
    assert (biased.abs() <= bound).all(), (biased, bound)
    ties, _ = J.LLMJudge("judge", min_margin=float(bound)).judge(ctx, prompts, a, b, seed=0)
    assert ties == [None] * 4


def test_llm_judge_options_are_checked():
    with pytest.raises(ConfigError, match="judge_template must contain"):
        J.LLMJudge(template="{prompt} {a}")
    with pytest.raises(ConfigError, match="judge_template must be a format string"):
        J.LLMJudge(template="{prompt} {a} {b} {c}")
    with pytest.raises(ConfigError, match="judge_labels must be two different"):
        J.LLMJudge(labels=["A", "A"])
    with pytest.raises(ConfigError, match="judge_min_margin"):
        J.LLMJudge(min_margin=float("nan"))


# ---- the length-drift monitor by hand --------------------------------------------------------------


def test_length_drift_monitor_by_hand():
    # smoothing 0.25: the plain mean of the first 4 updates (10 each) is the baseline
    mon = LengthDriftMonitor(smoothing=0.25, tolerance=0.2, min_corr=0.1)
    flags = [mon.update(s, 10.0, 0.5) for s in range(1, 5)]
    assert flags == [False] * 4 and mon.baseline == 10.0
    # lengths 20: EMA 10 -> 12.5 (flag: > 12 and corr 0.5 > 0.1) -> ...
    with pytest.warns(RuntimeWarning, match="length drift"):
        assert mon.update(5, 20.0, 0.5)
    assert mon.length == 12.5 and mon.flagged_steps == [5]
    # a correlation that turns negative ends the flag (EMA of corr: 0.5 -> 0.5 + 0.25 (-2 - 0.5) < 0.1)
    assert not mon.update(6, 20.0, -2.0)
    state = json.loads(json.dumps(mon.state_dict()))
    other = LengthDriftMonitor()
    other.load_state_dict(state)
    assert other.state_dict() == mon.state_dict()
    # flat lengths are never flagged, whatever the correlation
    flat = LengthDriftMonitor(smoothing=0.25)
    assert not any(flat.update(s, 10.0, 0.9) for s in range(1, 30))
    with pytest.raises(ValueError, match="smoothing must be in"):
        LengthDriftMonitor(smoothing=0)
    with pytest.raises(ValueError, match="must be finite"):
        LengthDriftMonitor().update(1, float("nan"), 0.0)


# ---- the step in the trainer -----------------------------------------------------------------------


def _models(tok, alg, **extra):
    out = {"policy": tiny_model(tok, seed=0, **TINY), "reference": tiny_model(tok, seed=0, **TINY)}
    out.update(extra)
    return out


def test_step_pairs_as_judged_and_the_dpo_loss(tok, tmp_path):
    """A judge_fn that records what it saw: the loss's rows are the chosen responses then the
    rejected ones as it decided, and the loss is DPO's sigmoid formula on them."""
    seen = {}

    def by_chars(prompt, a, b):  # the longer text (in characters) wins; equal lengths tie
        c = None if len(a) == len(b) else (0 if len(a) > len(b) else 1)
        if c is not None:
            seen[prompt, (a, b)[c], (a, b)[1 - c]] = True
        return c

    beta = 0.3
    alg = get_algorithm("online_dpo")({"judge": "fn", "max_new_tokens": 6, "truncated": "judge", "beta": beta},
                                      judge_fn=by_chars, oracle_fn=Oracle.score)
    assert alg.models == ("policy", "reference")
    checks, loss = [], alg.loss

    def checked(models, batch):
        logps, mask = token_logps(models["policy"], batch)
        out = loss(models, batch)
        checks.append((batch, logps.detach(), mask, out[0].detach()))
        return out

    alg.loss = checked
    tr = _trainer(alg, _models(tok, alg), tok, tmp_path, _prompts(alg, tok, 16, 0), max_steps=1, batch_size=8)
    m = tr.fit()["train"]
    n = m["pairs/kept"] + m["pairs/ties"] + m["pairs/both_invalid"] + m["pairs/one_invalid"]
    assert n == 8 and m["pairs/both_invalid"] == m["pairs/one_invalid"] == 0  # truncated: judge
    assert m["pairs/kept"] == len(seen) and m["optimizer_steps"] == 1 and math.isfinite(m["loss"])
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "rollout/length", "rollout/distinct_2", "rollout/length_corr", "rollout/oracle", "length_drift"):
        assert k in m, k
    assert "rollout/reward" not in m  # the mean pick is 1/2 by construction
    rows = 0
    for batch, logps, mask, loss_sum in checks:
        b = batch["input_ids"].shape[0] // 2
        rows += b
        for i in range(b):
            text = [tok.decode([t for t in batch["labels"][r].tolist() if t != C.IGNORE], skip_special_tokens=True)
                    for r in (i, b + i)]
            prompt = tok.decode(batch["input_ids"][i][batch["labels"][i] == C.IGNORE], skip_special_tokens=True)
            assert any(k[1:] == tuple(text) and k[0] in prompt for k in seen), text  # chosen first, as judged
        # DPO sigmoid in fp64 from the fp32 token log-probs of this loss
        seq = f64(logps * mask).sum(1)
        ref = f64(batch["ref_logps"] * mask).sum(1)
        delta = (seq[:b] - ref[:b]) - (seq[b:] - ref[b:])
        losses = -torch.nn.functional.logsigmoid(beta * delta)
        t = mask.shape[1]
        seq_err = sum_bound(f64(logps * mask).abs().sum(1), t) + sum_bound(f64(batch["ref_logps"] * mask).abs().sum(1), t)
        d_err = seq_err[:b] + seq_err[b:] + 3 * U32 * (seq.abs() + ref.abs()).view(2, b).sum(0)
        bound = (beta * d_err + FN * losses + U32 * beta * delta.abs()).sum() + sum_bound(losses.sum(), b)
        assert_within(loss_sum, losses.sum(), bound, "dpo loss")
    assert rows == m["pairs/kept"]


def test_step_with_reward_model_and_llm_judges(tok, tmp_path):
    rm = ScalarHeadModel(tiny_model(tok, seed=5, **TINY))
    before = [p.detach().clone() for p in rm.parameters()]
    alg = get_algorithm("online_dpo")({"judge": "reward_model", "max_new_tokens": 5, "truncated": "judge"})
    assert alg.models == ("policy", "reference", "reward")
    tr = _trainer(alg, _models(tok, alg, reward=rm), tok, tmp_path / "rm", _prompts(alg, tok, 8, 0), max_steps=1,
                  batch_size=8)
    m = tr.fit()["train"]
    assert math.isfinite(m["judge/score"]) and m["pairs/kept"] > 0 and "rollout/oracle" not in m
    assert all(torch.equal(x, y) for x, y in zip(before, rm.parameters()))  # frozen
    # the policy judging its own samples (self-rewarding): no third model
    alg = get_algorithm("online_dpo")({"judge": "llm", "judge_model": "policy", "max_new_tokens": 5,
                                       "truncated": "judge"})
    assert alg.models == ("policy", "reference")
    m = _trainer(alg, _models(tok, alg), tok, tmp_path / "llm", _prompts(alg, tok, 8, 0), max_steps=1,
                 batch_size=8).fit()["train"]
    assert m["pairs/kept"] + m["pairs/ties"] == 8 and math.isfinite(m["judge/score"])


def test_truncated_pairs_rule(tok):
    """prefer_complete: the complete response of a pair wins without asking the judge, two cut
    ones are dropped; identical texts are ties; the rest go to the judge."""
    from fastalign.algorithms import _rollout as R

    eos = tok.eos_token_id
    ids = [[40, 41, eos], [40, 41, 42, 43], [40, 41, 42, 43], [44, 45, 46, 47], [40, eos], [40, eos],
           [40, 41, eos], [42, eos]]
    texts = ["a", "bcde", "bcde", "fghi", "x", "x", "ab", "c"]
    ctx = _Context(tok)
    rollout = R.build(ctx, [P] * 8, texts, ids, None, None, max_new_tokens=4)
    asked = []

    def judge(p, a, b):
        asked.append((a, b))
        return 1

    alg = get_algorithm("online_dpo")({"judge": "fn", "max_new_tokens": 4}, judge_fn=judge)
    choices, counts, _ = alg.judge_pairs(ctx, rollout, seed=0)
    assert choices == [0, None, None, 1] and asked == [("ab", "c")]
    assert counts == {"pairs/ties": 1.0, "pairs/both_invalid": 1.0, "pairs/one_invalid": 1.0, "pairs/kept": 2.0}
    alg = get_algorithm("online_dpo")({"judge": "fn", "max_new_tokens": 4, "truncated": "judge"}, judge_fn=judge)
    asked.clear()
    assert alg.judge_pairs(ctx, rollout, seed=0)[0] == [1, 1, None, 1] and len(asked) == 3


def test_judge_metrics_by_hand(tok):
    """judge/oracle_agreement over the pairs the oracle does not tie; judge/chose_longer over the
    pairs of unequal token length."""
    from fastalign.algorithms import _rollout as R

    texts = ["4 1 3", "4 1", "4", "4 1 3", "9", "8"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    rollout = R.build(_Context(tok), [P] * 6, texts, ids, None, None, max_new_tokens=24)
    alg = get_algorithm("online_dpo")()  # the oracle judge: Oracle.score is its oracle_fn
    # pair 0: the right answer chosen (agrees, longer); pair 1: "4" over "4 1 3" (disagrees,
    # shorter); pair 2: "9" over "8", both worth 0 to the oracle and of one length (in neither)
    m = alg._judge_metrics(rollout, [0, 1, 2], [0, 2, 4], [1, 3, 5], None)
    assert m == {"judge/chose_longer": 0.5, "judge/oracle_agreement": 0.5}


def test_peft_reference_is_the_policy_without_adapters(tok, tmp_path):
    from fastalign.models import adapters
    from fastalign.trainer.config import ModelConfig
    from fastalign.trainer.run import _build_models

    # the untrained model's samples all score 0 with the oracle: a judge that tells texts apart
    alg = get_algorithm("online_dpo")({"judge": "fn", "max_new_tokens": 5, "truncated": "judge"},
                                      judge_fn=lambda p, a, b: 0 if a > b else 1)
    train = _prompts(alg, tok, 8, 0)
    peft = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    models = _build_models(alg, ModelConfig(policy="tiny", tiny=TINY, peft=peft), tok, 0, train)
    assert sorted(models) == ["policy", "reference"]
    assert isinstance(models["reference"], adapters.AdapterFreeReference)  # no second copy of the weights
    before = {n: p.detach().clone() for n, p in models["policy"].named_parameters()}
    m = _trainer(alg, models, tok, tmp_path, train, max_steps=1, batch_size=8).fit()["train"]
    moved = [n for n, p in models["policy"].named_parameters() if not torch.equal(p, before[n])]
    assert m["pairs/kept"] > 0 and moved and all("lora_" in n for n in moved)


def test_resume_is_exact(tok, tmp_path):
    def make():
        # the untrained model's samples all score 0: a length bias tells them apart, the noise is seeded
        alg = get_algorithm("online_dpo")({"max_new_tokens": 5, "truncated": "judge", "oracle_noise": 0.3,
                                           "oracle_length_bias": 0.5, "mini_batches": 2, "epochs": 2})
        return alg, _models(tok, alg), {"batch_size": 4}

    (straight, alg_a), (resumed, alg_b) = _straight_and_resumed(make, tok, tmp_path)
    for (n, p), q in zip(straight["policy"].named_parameters(), resumed["policy"].parameters()):
        assert torch.equal(p, q), n
    start = tiny_model(tok, seed=0, **TINY)
    assert not all(torch.equal(p, q) for p, q in zip(start.parameters(), straight["policy"].parameters()))  # trained
    assert alg_a.length_monitor.state_dict() == alg_b.length_monitor.state_dict()
    assert alg_a.length_monitor.count == 4


def test_a_step_with_no_pairs_makes_no_update(tok, tmp_path):
    alg = get_algorithm("online_dpo")({"judge": "fn", "max_new_tokens": 4, "truncated": "judge"},
                                      judge_fn=lambda p, a, b: None)
    models = _models(tok, alg)
    before = [p.detach().clone() for p in models["policy"].parameters()]
    m = _trainer(alg, models, tok, tmp_path, _prompts(alg, tok, 8, 0), max_steps=1, batch_size=8).fit()["train"]
    assert m["optimizer_steps"] == 0 and m["pairs/kept"] == 0 and math.isnan(m["loss"])
    assert all(torch.equal(x, y) for x, y in zip(before, models["policy"].parameters()))


# ---- the CLI and configs, bad configs ------------------------------------------------------------------


def test_cli_trains_from_the_packaged_config(tmp_path, capsys):
    from fastalign import cli

    rc = cli.main(["train", "online_dpo", "--config", "online_dpo", f"trainer.output_dir={tmp_path}",
                   "trainer.max_steps=2", "trainer.batch_size=4", "data.eval_size=4", "algo.max_new_tokens=6",
                   "algo.truncated=judge", "algo.oracle_length_bias=0.5", "trainer.progress=false",
                   "trainer.plot=false"])
    assert rc == 0 and "done at step 2" in capsys.readouterr().out
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 2 and all("pairs/kept" in r and "rollout/oracle" in r for r in train)
    assert "oracle" in [r for r in rows if r["split"] == "eval"][-1]


def test_packaged_configs_resolve_and_print(capsys):
    import yaml

    from fastalign import cli
    from fastalign.trainer.run import load_config, resolve_config

    for name in ("online_dpo", "online_dpo_smollm2"):
        resolved = resolve_config("online_dpo", load_config(os.path.join(ROOT, "configs", f"{name}.yaml")))
        get_algorithm("online_dpo")(resolved["algo"])
    assert cli.main(["train", "online_dpo", "--config", "online_dpo_smollm2", "--print-config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["algo"]["judge_template"] == J.DEFAULT_TEMPLATE and out["algo"]["judge"] == "llm"
    assert out["model"]["judge"] is None


@pytest.mark.parametrize("bad,match", [
    ({"judge": "human"}, "judge must be one of"),
    ({"loss_type": "nope"}, "algo.loss_type 'nope'"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"judge": "fn"}, "algo.judge: fn needs algo.judge_fn"),
    ({"judge_fn": "longer"}, "judge_fn .* is for algo.judge: fn"),
    ({"judge": "fn", "judge_fn": "nope"}, "algo.judge_fn: 'nope'"),
    ({"judge": "llm", "judge_template": "{a} {b}"}, "judge_template must contain"),
    ({"judge_model": "critic"}, "judge_model must be one of"),
    ({"oracle_noise": 2.0}, r"oracle_noise must be in \[0, 1\]"),
    ({"truncated": "keep"}, "truncated must be one of"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"clip": 0.2}, "unknown option"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        get_algorithm("online_dpo")(bad)


def test_missing_models_are_named(tok):
    with pytest.raises(ConfigError, match="needs model.reward"):
        get_algorithm("online_dpo")({"judge": "reward_model"}).build_models("tiny", tok, tiny_kwargs=TINY)
    with pytest.raises(ConfigError, match="needs model.judge"):
        get_algorithm("online_dpo")({"judge": "llm"}).build_models("tiny", tok, tiny_kwargs=TINY)
    models = get_algorithm("online_dpo")({"judge": "llm"}).build_models("tiny", tok, tiny_kwargs=TINY, judge="tiny")
    assert sorted(models) == ["judge", "policy", "reference"]


# ---- learning (slow: the SFT model of test_rl_algorithms, then online DPO judged by the oracle) -------

from tests.test_rl_algorithms import _learns, sft_dir  # noqa: E402,F401  (the module-scoped SFT fixture)


@pytest.mark.slow
def test_online_dpo_with_the_oracle_judge_beats_sft(tok, tmp_path, sft_dir):  # noqa: F811
    alg = get_algorithm("online_dpo")({"max_new_tokens": 24, "beta": 0.1})
    models = {"policy": load_model(sft_dir), "reference": load_model(sft_dir)}
    before, after = _learns(alg, models, tok, tmp_path, max_steps=40, batch_size=32, lr=1e-4)
    # 256 held-out prompts at T = 1, the same prompts and sampling seed before and after. Measured
    # on a loaded AMD EPYC (2026-12-08) in the same setting: 0.376 -> 0.418 (evaluations at steps
    # 10 / 20 / 30: 0.395 / 0.414 / 0.411), 32 pairs a step, ~20 kept after ties. The margin 0.02 is
    # half the measured gain: online DPO at this learning rate learns more slowly than GRPO's 256
    # samples a step (lr 3e-4 was not measured).
    assert after > before + 0.02, (before, after)


@pytest.mark.slow
def test_a_length_biased_judge_makes_responses_longer_and_is_flagged(tok, tmp_path, sft_dir):  # noqa: F811
    alg = get_algorithm("online_dpo")({"max_new_tokens": 24, "beta": 0.1, "oracle_length_bias": 0.5})
    models = {"policy": load_model(sft_dir), "reference": load_model(sft_dir)}
    train = _prompts(alg, tok, 2000, 3)
    evald = _prompts(alg, tok, 64, 5)
    tr = _trainer(alg, models, tok, tmp_path, train, evald, max_steps=24, batch_size=32, lr=1e-4)
    start = tr.evaluate()
    with pytest.warns(RuntimeWarning, match="length drift"):
        end = tr.fit()["eval"]
    # measured (loaded AMD EPYC, 2026-12-08): eval length 8.36 -> 12.36 tokens (x1.48; the oracle
    # score 0.363 -> 0.392: the SFT model drops items, so longer also helps it, up to a point);
    # the monitor (15% over the first 7 steps' 9.37, smoothed correlation > 0.05) flagged steps
    # 15-17 and 23 -- close to its threshold: see LengthDriftMonitor's docstring
    assert end["length"] > 1.3 * start["length"], (start, end)
    assert alg.length_monitor.flagged_steps, alg.length_monitor.state_dict()
