"""The RLHF monitors on crafted samples whose answers are known by hand.

Bounds. The monitors are plain Python-float (IEEE double) arithmetic in a fixed order, so they
give the same bits on every machine. Where the expected value is the same expression (distinct-n
fractions, a correlation of the same inputs) or all intermediates are exact (small integers and
halves: means, sums, the hand-made correlations), the comparison is exact. Elsewhere it is bounded
by the roundings of the computation: a mean of decimals (mean_error), a Pearson correlation
against torch.corrcoef (pearson_error), a moving average (ema_error).
"""

import math
import pickle

import pytest
import torch

from tests.numerics import assert_within, f64, gamma, unit_roundoff

from fastalign.algorithms.monitors import (OveroptimisationMonitor, distinct_n, length_correlation, pearson,
                                           rollout_metrics)
from fastalign.trainer.monitors import plot_monitors


U64 = unit_roundoff(torch.float64)


def mean_error(xs):
    """One Python mean sum(xs) / n vs the exact mean of the decimals xs: each literal is rounded
    (u |x|), the n-term sum (gamma(n) sum |x|), the division (u |mean|); and the expected literal
    itself is rounded (u |mean|)."""
    a = sum(abs(x) for x in xs)
    return ((U64 + gamma(len(xs), torch.float64)) * a) / len(xs) + 2 * U64 * abs(sum(xs) / len(xs))


def pearson_error(x, y):
    """How far two evaluations of the Pearson correlation of x, y (fp64) can differ (first order).
    One evaluation: the means err by e_m <= gamma(n) sum|x| / n + u |m|; the deviations dx_i by
    e_m + u |dx_i|; sxy = sum dx dy by sum(|dy| e_dx + |dx| e_dy) + (gamma(n) + u) sum |dx dy|
    (products, then the n-term sum); likewise sxx, syy. r = sxy / sqrt(sxx syy) then errs by
    E_xy / sqrt(sxx syy) + |r| (E_xx / 2 sxx + E_yy / 2 syy) plus its last roundings: u |r| each,
    at most 8 of them in either form (fastalign: a product, sqrt, /; torch.corrcoef: / (n - 1)
    three times, two sqrt, two /). Twice the per-evaluation terms for the two evaluations."""
    x, y = x.double(), y.double()
    n, g = len(x), gamma(len(x), torch.float64)
    dx, dy = x - x.mean(), y - y.mean()
    emx = g * x.abs().sum() / n + U64 * x.mean().abs()
    emy = g * y.abs().sum() / n + U64 * y.mean().abs()
    ex, ey = emx + U64 * dx.abs(), emy + U64 * dy.abs()
    sxy, sxx, syy = (dx * dy).sum(), (dx * dx).sum(), (dy * dy).sum()
    exy = (dy.abs() * ex + dx.abs() * ey).sum() + (g + U64) * (dx * dy).abs().sum()
    exx = (2 * dx.abs() * ex).sum() + (g + U64) * sxx
    eyy = (2 * dy.abs() * ey).sum() + (g + U64) * syy
    r = sxy / (sxx * syy).sqrt()
    return 2 * (exy / (sxx * syy).sqrt() + r.abs() * (exx / (2 * sxx) + eyy / (2 * syy))) + 8 * U64 * r.abs()


def ema_error(values):
    """A running average x <- x + a (v - x), a <= 1, of values bounded by M = max|v|: every x
    stays within [-M, M], so one update rounds a (u a), v - x (<= 2M, u 2M a after * a), the
    product (u 2M a) and the sum (u M): <= 7 u M per update, and earlier errors are damped by
    (1 - a) <= 1, so <= 7 u M per update in all; plus the expected expression's own roundings
    (<= one per value, u M each)."""
    m = max(abs(v) for v in values)
    return 8 * U64 * m * len(values)



def test_distinct_n_by_hand():
    # 1-grams: a b a c | a a -> 6 total, distinct {a, b, c} = 3
    assert distinct_n([[1, 2, 1, 3], [1, 1]], 1) == 3 / 6
    # 2-grams: (1,2) (2,1) (1,3) | (1,1) -> 4 total, 4 distinct
    assert distinct_n([[1, 2, 1, 3], [1, 1]], 2) == 1.0
    # a collapsed policy: the same answer everywhere
    assert distinct_n(["4 1 3"] * 10, 1) == 3 / 30
    assert distinct_n(["4 1 3"] * 10, 2) == 2 / 20
    assert distinct_n([[], [5]], 2) == 0.0  # no bigram at all
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n([[1]], 0)


def test_pearson_and_length_correlation():
    # integers: every mean, deviation, product and sum is an exact small dyadic number, sqrt of
    # a perfect square is exact, and the last division rounds like the literal
    assert pearson([1, 2, 3], [2, 4, 6]) == 1.0
    assert pearson([1, 2, 3], [3, 2, 1]) == -1.0
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == 0.8  # sxy 4 / sqrt(5 * 5)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant side: no measurable relation, not NaN
    assert pearson([1], [2]) == 0.0
    x = torch.randn(50, dtype=torch.float64)
    y = 2 * x + 0.5 * torch.randn(50, dtype=torch.float64)
    assert_within(f64(pearson(x, y)), torch.corrcoef(torch.stack([x, y]))[0, 1], pearson_error(x, y), "pearson")
    # rewards that grow with length
    assert length_correlation([0.1, 0.2, 0.3], [3, 5, 9]) > 0.9
    with pytest.raises(ValueError, match="3 x values but 2"):
        pearson([1, 2, 3], [1, 2])


def test_rollout_metrics_by_hand():
    ids = [[1, 2, 3], [1, 2], [4]]
    m = rollout_metrics(responses_ids=ids, rewards=torch.tensor([0.5, 0.0, 1.0]), kl=[0.1, 0.2, 0.3],
                        entropy=torch.tensor([1.0, 2.0, 3.0]), oracle_scores=[1.0, 0.0, 0.5], truncated=1)
    # sums of halves and small integers are exact, and so is their mean here
    assert m["rollout/reward"] == 0.5 and m["rollout/length"] == 2.0
    assert m["rollout/distinct_1"] == 4 / 6  # the same division
    assert m["rollout/distinct_2"] == 2 / 3  # (1,2) (2,3) (1,2)
    assert_within(f64(m["rollout/kl"]), f64(0.2), mean_error([0.1, 0.2, 0.3]), "rollout/kl")  # decimals: rounded
    assert m["rollout/entropy"] == 2.0 and m["rollout/oracle"] == 0.5
    assert m["rollout/truncated"] == 1
    # the same function on the same values (the fp32 tensor's elements are exact halves)
    assert m["rollout/length_corr"] == pearson([0.5, 0.0, 1.0], [3, 2, 1])
    assert m["rollout/proxy_oracle_corr"] == pearson([0.5, 0.0, 1.0], [1.0, 0.0, 0.5])
    m2 = rollout_metrics(responses_ids=ids, rewards=[0, 0, 0], prefix="x/")
    assert set(m2) == {"x/reward", "x/length", "x/distinct_1", "x/distinct_2", "x/length_corr", "x/truncated"}
    with pytest.raises(ValueError, match="2 rewards for 3 responses"):
        rollout_metrics(responses_ids=ids, rewards=[1, 2])


def test_overoptimisation_monitor_flags_proxy_up_oracle_down():
    # smoothing 1: no smoothing, the numbers below are the smoothed values
    mon = OveroptimisationMonitor(smoothing=1.0, tolerance=0.05)
    healthy = [(0.1, 0.40), (0.2, 0.45), (0.3, 0.50), (0.4, 0.48)]  # best oracle 0.50 (proxy 0.3 then)
    assert [mon.update(s, p, o) for s, (p, o) in enumerate(healthy)] == [False] * 4  # 0.48: within tolerance
    with pytest.warns(RuntimeWarning, match="over-optimisation"):
        got = [mon.update(4 + s, p, o) for s, (p, o) in enumerate([(0.6, 0.44), (0.8, 0.40), (0.2, 0.30)])]
    # 0.44 < 0.50 - 0.05 with proxy 0.6 > 0.3: flagged; 0.40 likewise; proxy back to 0.2 < 0.3: not
    assert got == [True, True, False]
    assert mon.flagged_steps == [4, 5]
    # a new best oracle resets the reference point
    assert mon.update(7, 2.0, 0.60) is False and mon.best_oracle == 0.60 and mon.proxy_at_best == 2.0


def test_overoptimisation_monitor_smooths_noise():
    """A flat oracle with batch noise (+-0.04) and a rising proxy is not flagged; a falling one is."""
    import random

    rng = random.Random(0)
    flat, falling = OveroptimisationMonitor(), OveroptimisationMonitor()
    for s in range(40):
        noise = rng.gauss(0, 0.04)
        assert flat.update(s, 0.05 * s, 0.45 + noise) is False
    assert flat.flagged_steps == []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in range(40):
            falling.update(s, 0.05 * s, 0.45 - 0.005 * s + rng.gauss(0, 0.04))
    assert falling.flagged_steps and falling.flagged_steps[0] > 10
    # by hand: the plain mean of the first 1/smoothing = 5 values (no flags while warming up),
    # then 0.2 of each new value
    m = OveroptimisationMonitor(smoothing=0.2)
    assert [m.update(s, float(s + 1), 0.5 - s) for s in range(4)] == [False] * 4
    m.update(4, 5.0, 0.5)
    proxies, oracles = [1.0, 2.0, 3.0, 4.0, 5.0], [0.5, -0.5, -1.5, -2.5, 0.5]
    assert_within(f64(m.proxy), f64(3.0), ema_error(proxies), "smoothed proxy")
    assert_within(f64(m.best_oracle), f64((0.5 - 0.5 - 1.5 - 2.5 + 0.5) / 5), ema_error(oracles), "best oracle")
    m.update(5, 8.0, 0.5)
    assert_within(f64(m.proxy), f64(4.0), ema_error(proxies + [8.0]), "smoothed proxy")


def test_overoptimisation_monitor_state_round_trip_and_errors():
    import warnings

    a = OveroptimisationMonitor(smoothing=1.0, tolerance=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s, (p, o) in enumerate([(0.1, 0.5), (0.2, 0.4), (0.3, 0.3)]):
            a.update(s, p, o)
    b = OveroptimisationMonitor()
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert a.update(3, 0.4, 0.2) == b.update(3, 0.4, 0.2) is True
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="smoothing must be in"):
        OveroptimisationMonitor(smoothing=0)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        OveroptimisationMonitor(tolerance=-1)
    with pytest.raises(ValueError, match="must be finite"):
        a.update(9, math.nan, 0.1)


def test_plot_monitors(tmp_path):
    import json

    log = tmp_path / "metrics.jsonl"
    with open(log, "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "split": "train", "rollout/reward": 0.1 * s, "rollout/oracle": 0.5 - 0.05 * s,
                                "rollout/kl": 0.2 * s, "rollout/entropy": 1.0, "rollout/distinct_2": 0.5,
                                "rollout/length_corr": 0.1, "rollout/length": 5, "overoptimisation": float(s > 3)}) + "\n")
    out = plot_monitors(str(log), str(tmp_path / "m.png"), title="t")
    assert (tmp_path / "m.png").stat().st_size > 1000 and out.endswith("m.png")
