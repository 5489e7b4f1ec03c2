"""The reward model's margin-aware Bradley-Terry loss and TRL's centring regulariser: the
reward_loss op and the `reward` algorithm against TRL 1.16's formula, re-derived here from its
source (trl/trainer/reward_trainer.py, RewardTrainer.compute_loss):

    loss = -nn.functional.logsigmoid(rewards_chosen - rewards_rejected - inputs["margin"]).mean()
    if self.args.center_rewards_coefficient is not None:
        loss += self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)

evaluated in float64 on the same (dtype-rounded) scores. Bounds: the BT part as in
tests/test_preference.py (_reward_exact, derived there); the centring part, k mean(s^2) with
s = c + r: s rounds once (u |s|, so s^2 moves by 2u s^2), the square rounds (u s^2), the mean of n
squares in any order (gamma(n+1) mean s^2 with the division), k is rounded to fp32 and multiplies
(gamma(2)): gamma(n+6) k mean(s^2) in all; the final add rounds once (u |loss|). Its gradient
2 k s / n: s's rounding, the backward's products by 2, k and 1/n and its upstream factor (gamma(5)
relative), and the add into the BT gradient (u |total|).
"""

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import fastalign
from fastalign.algorithms import get_algorithm
from fastalign.data import collate as C
from fastalign.data.formats import DataFormatError, load_records
from fastalign.data.synthetic import SyntheticTask
from fastalign.errors import ConfigError, DataError
from tests.numerics import assert_within, gamma, unit_roundoff
from tests.test_preference import BACKENDS, DTYPES, _reward_exact, _stored

U32 = unit_roundoff(torch.float32)
# A gradient stored below the dtype's normal range (30-sigma scores give sigmoid(-d) ~ 1e-7 < fp16's
# 6e-5) rounds to the subnormal grid: an absolute error of up to half its spacing, not u |g|.
SUBNORMAL_HALF_SPACING = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def trl_reward_loss(c, r, margin=None, center=None):
    """TRL 1.16 RewardTrainer.compute_loss, in float64 (see the module docstring)."""
    c, r = c.double(), r.double()
    if margin is not None:
        m = margin.double() if isinstance(margin, torch.Tensor) else torch.tensor(float(margin), dtype=torch.float64)
        loss = -F.logsigmoid(c - r - m).mean()
    else:
        loss = -F.logsigmoid(c - r).mean()
    if center is not None:
        loss = loss + center * torch.mean((c + r) ** 2)
    return loss


def _center_err(c, r, k, loss):
    s2 = (c.double() + r.double()).square().mean()
    return gamma(c.numel() + 6) * k * s2 + U32 * abs(float(loss))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reward_loss_margin_and_centring_match_trl(backend, device, dtype):
    n = 37
    for scale in (1.0, 30.0):  # ordinary scores, and scores far from zero (the centring term dominates)
        c = (scale * torch.randn(n, device=device)).to(dtype).requires_grad_()
        r = (scale * torch.randn(n, device=device)).to(dtype).requires_grad_()
        margin = 2 * torch.rand(n, device=device)  # per pair, as TRL's margin column
        for k in (None, 0.01, 0.5):
            got = fastalign.reward_loss(c, r, margin=margin, center_rewards_coefficient=k, backend=backend)
            assert got.dtype == torch.float32 and got.shape == ()
            want = trl_reward_loss(c.detach().cpu(), r.detach().cpu(), margin.cpu(), k)
            _, bt_err, wc, wc_err = _reward_exact(c, r, margin)
            err = bt_err + (_center_err(c, r, k, want) if k is not None else 0.0)
            assert_within(got, want, err, f"reward_loss (k={k}) vs TRL's formula")
            gc, gr = torch.autograd.grad(got, (c, r))
            # exact gradients: BT's -sig(-d)/n (c), +sig(-d)/n (r), plus 2 k s / n for both
            s = c.detach().double().cpu() + r.detach().double().cpu()
            cen = 2 * (k or 0.0) * s / n
            cen_err = gamma(6) * cen.abs()
            for g, want_g in ((gc, wc + cen), (gr, -wc + cen)):
                e = wc_err + cen_err + U32 * want_g.abs()
                e = e + _stored(dtype) * (want_g.abs() + e) + SUBNORMAL_HALF_SPACING[dtype]
                assert_within(g, want_g, e, f"reward_loss gradient (k={k})")


def test_reward_loss_centring_hand_computed():
    # c = (1, 3), r = (0, -1), no margin: BT mean(-logsig(1), -logsig(4)) = (0.31326168751822286 +
    # 0.01814992791780978) / 2; centring 0.1 * mean(1^2, 2^2) = 0.25
    c, r = torch.tensor([1.0, 3.0]), torch.tensor([0.0, -1.0])
    got = fastalign.reward_loss(c, r, center_rewards_coefficient=0.1)
    want = (0.31326168751822286 + 0.01814992791780978) / 2 + 0.25
    assert_within(got, torch.tensor(want, dtype=torch.float64), 1e-6, "hand-computed")  # a few fp32 roundings of ~0.4
    assert float(fastalign.reward_loss(c, r, center_rewards_coefficient=0.0)) == float(fastalign.reward_loss(c, r))
    for bad in (-0.1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="center_rewards_coefficient must be None or a finite number >= 0"):
            fastalign.reward_loss(c, r, center_rewards_coefficient=bad)


def _margin_pairs(n=6, seed=0):
    pairs, _ = SyntheticTask().preference_pairs(n, seed=seed)
    for i, p in enumerate(pairs):
        p["margin"] = 0.25 * i
    return pairs


def test_reward_algorithm_uses_data_margin_and_centring_as_trl():
    tok = fastalign_tok()
    rm = get_algorithm("reward")({"center_rewards_coefficient": 0.05})
    models = rm.build_models("tiny", tok, tiny_kwargs=TINY)
    pairs = _margin_pairs()
    exs = rm.encode(pairs, tok, 64, Counter())
    batch = rm.collate(exs, tok)
    assert torch.equal(batch["margin"], torch.tensor([p["margin"] for p in pairs], dtype=torch.float32))
    loss_sum, m = rm.loss(models, batch)
    scores = models["reward"].score(batch["input_ids"], batch["attention_mask"])  # the same forward again
    b = len(exs)
    c, r = scores[:b].detach(), scores[b:].detach()
    want = trl_reward_loss(c, r, batch["margin"], 0.05)
    _, bt_err, _, _ = _reward_exact(c, r, batch["margin"])
    err = b * (bt_err + _center_err(c, r, 0.05, want)) + U32 * b * float(want)  # the sum = mean * b: one product
    assert_within(loss_sum, b * want, err, "reward summed loss vs TRL")
    assert m["center_penalty"] == float((c + r).square().mean())  # the same fp32 computation
    # the margin matters: the same scores without it give TRL's margin-free loss
    plain = get_algorithm("reward")({"center_rewards_coefficient": 0.05})
    no_margin = plain.collate(plain.encode([{k: v for k, v in p.items() if k != "margin"} for p in pairs], tok, 64,
                                           Counter()), tok)
    assert "margin" not in no_margin
    loss0, _ = plain.loss(models, no_margin)
    assert_within(loss0, b * trl_reward_loss(c, r, None, 0.05), err, "reward summed loss without margin vs TRL")


def test_margin_errors_name_the_problem(tmp_path):
    tok = fastalign_tok()
    pairs = _margin_pairs()
    with pytest.raises(ConfigError, match="per-pair margins and algo.margin is set too"):
        get_algorithm("reward")({"margin": 1.0}).encode(pairs, tok, 64, Counter())
    pairs[2].pop("margin")
    with pytest.raises(DataError, match=f"{len(pairs) - 1} of {len(pairs)} preference records carry a 'margin'"):
        get_algorithm("reward")().encode(pairs, tok, 64, Counter())
    with pytest.raises(ConfigError, match="center_rewards_coefficient must be None or >= 0"):
        get_algorithm("reward")({"center_rewards_coefficient": -1})
    # the preference file format: a margin per record, checked with file:line
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5},
            {"prompt": "p", "chosen": "a", "rejected": "c", "margin": None}]
    path.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    recs, _ = load_records("preference", str(path))
    assert recs[0]["margin"] == 1.5 and "margin" not in recs[1]
    for bad in ('"1"', "true", "NaN", "[1]"):
        path.write_text(json.dumps(rows[0]) + "\n" + '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": '
                        + bad + "}\n")
        with pytest.raises(DataFormatError, match=rf"{path.name}:2: field 'margin' must be a finite number"):
            load_records("preference", str(path))


def test_collate_pairs_margin_only_when_every_pair_has_one():
    exs = [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "margin": 0.5},
           {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [4]}]
    assert "margin" not in C.collate_pairs(exs, 0)
    assert C.collate_pairs(exs[:1], 0)["margin"].tolist() == [0.5]


def fastalign_tok():
    from fastalign.models import tiny_tokenizer

    return tiny_tokenizer()


def test_extreme_margins_keep_the_loss_finite():
    # a per-pair margin of any size keeps the loss finite (the logsigmoid is stable)
    c, r = torch.zeros(2), torch.zeros(2)
    got = fastalign.reward_loss(c, r, margin=torch.tensor([1e4, -1e4]))
    assert math.isfinite(float(got)) and abs(float(got) - 5e3) < 1e-2
