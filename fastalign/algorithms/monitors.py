"""Monitors for the ways RLHF goes wrong, computed from each step's rollouts.

* Over-optimisation (reward hacking): the policy learns to please the learned reward model
  (the proxy) rather than the true objective, so the proxy score rises while the true score
  falls (Gao et al., 2022). `OveroptimisationMonitor` follows both; the synthetic task's oracle
  is the true score here.
* Mode collapse: the policy's distribution narrows (entropy falls, samples repeat):
  `distinct_n` (fraction of distinct n-grams over the batch) and the policy entropy.
* Length / style bias: the reward model (or a judge) rewards length rather than quality:
  `length_correlation` (Pearson correlation of reward and response length), and
  `LengthDriftMonitor`, which flags responses growing while that correlation stays positive.
* Drift from the reference: the per-sequence KL estimate.

Everything here is plain Python on small per-step summaries (no kernels): a few hundred
responses per step. The online algorithms log them every step (online.py); the trainer's
fastalign.trainer.monitors.plot_monitors draws them from a run's metrics.jsonl.
"""

from __future__ import annotations

import math
import warnings


def _as_list(x):
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch tensor
        return [float(v) for v in x.detach().double().reshape(-1).cpu().tolist()]
    if isinstance(x, (int, float)):
        return [float(x)]
    return [float(v) for v in x]


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def distinct_n(responses, n: int) -> float:
    """Distinct n-grams / all n-grams over a batch of responses (token-id lists, or strings split
    into whitespace words). 1.0 means no n-gram repeats anywhere; a collapsed policy that
    answers everything the same way tends to 0. 0.0 when there are no n-grams at all."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    seen, total = set(), 0
    for r in responses:
        toks = r.split() if isinstance(r, str) else list(r)
        for i in range(len(toks) - n + 1):
            seen.add(tuple(toks[i: i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def pearson(xs, ys) -> float:
    """Pearson correlation; 0.0 when there are fewer than 2 points or either side is constant
    (no linear relation can be measured, and NaN would poison the log)."""
    xs, ys = _as_list(xs), _as_list(ys)
    if len(xs) != len(ys):
        raise ValueError(f"pearson: {len(xs)} x values but {len(ys)} y values")
    if len(xs) < 2:
        return 0.0
    mx, my = _mean(xs), _mean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0.0 or syy <= 0.0:
        return 0.0
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def length_correlation(scores, lengths) -> float:
    """Correlation of reward scores with response lengths: persistently large and positive means
    the reward (and soon the policy) prefers long answers whatever their quality."""
    return pearson(scores, lengths)


def rollout_metrics(*, responses_ids, rewards, kl=None, entropy=None, oracle_scores=None, truncated: int = 0,
                    prefix: str = "rollout/") -> dict:
    """The monitor values of one batch of rollouts.

    responses_ids: token-id lists of the responses; rewards: the proxy score per response
    (before the KL penalty); kl: per-sequence KL estimates to the reference (summed over the
    response); entropy: per-sequence mean token entropy, or one float; oracle_scores: the true
    score per response where an oracle exists; truncated: responses cut without EOS.
    """
    rewards = _as_list(rewards)
    lengths = [len(r) for r in responses_ids]
    if len(rewards) != len(lengths):
        raise ValueError(f"rollout_metrics: {len(rewards)} rewards for {len(lengths)} responses")
    out = {
        prefix + "reward": _mean(rewards),
        prefix + "length": _mean(lengths),
        prefix + "distinct_1": distinct_n(responses_ids, 1),
        prefix + "distinct_2": distinct_n(responses_ids, 2),
        prefix + "length_corr": length_correlation(rewards, lengths),
        prefix + "truncated": int(truncated),
    }
    if kl is not None:
        out[prefix + "kl"] = _mean(_as_list(kl))
    if entropy is not None:
        out[prefix + "entropy"] = _mean(_as_list(entropy))
    if oracle_scores is not None:
        oracle = _as_list(oracle_scores)
        out[prefix + "oracle"] = _mean(oracle)
        out[prefix + "proxy_oracle_corr"] = pearson(rewards, oracle)
    return out


class OveroptimisationMonitor:
    """Flags steps where the proxy reward has kept rising while the true (oracle) score has
    fallen from its best: the picture of reward-model over-optimisation in Gao et al. (2022).

    Each update gets the step's mean proxy and oracle scores of the rollouts. Both are smoothed
    with an exponential moving average (`smoothing` = weight of the new value), because a batch
    mean of sampled responses is noisy (64 responses: ~0.04 on a [0, 1] oracle); nothing is
    flagged during the first 1/smoothing updates (their plain mean starts the average). The monitor
    remembers the best smoothed oracle score so far and the smoothed proxy at that step; a step
    is flagged when the smoothed oracle is more than `tolerance` below its best while the
    smoothed proxy is above its value at the best: the policy still pleases the reward model
    more, and the truth less. The first flag of an episode (a run of consecutive flagged steps)
    issues a warning; `flagged_steps` lists every flagged step.
    """

    def __init__(self, smoothing: float = 0.15, tolerance: float = 0.05):
        if not 0 < smoothing <= 1:
            raise ValueError(f"OveroptimisationMonitor: smoothing must be in (0, 1], got {smoothing}")
        if tolerance < 0:
            raise ValueError(f"OveroptimisationMonitor: tolerance must be >= 0, got {tolerance}")
        self.smoothing, self.tolerance = float(smoothing), float(tolerance)
        self.count = 0
        self.proxy = self.oracle = None          # smoothed values
        self.best_oracle = self.proxy_at_best = None
        self.flagged_steps: list[int] = []
        self._in_episode = False

    def update(self, step: int, proxy: float, oracle: float) -> bool:
        proxy, oracle = float(proxy), float(oracle)
        if not (math.isfinite(proxy) and math.isfinite(oracle)):
            raise ValueError(f"OveroptimisationMonitor: step {step}: proxy {proxy} / oracle {oracle} must be finite")
        self.count += 1
        # weight max(smoothing, 1/n): the plain mean of the first 1/smoothing values, then the
        # moving average (an EMA started at the first value would make it the reference)
        a = max(self.smoothing, 1.0 / self.count)
        self.proxy = proxy if self.proxy is None else self.proxy + a * (proxy - self.proxy)
        self.oracle = oracle if self.oracle is None else self.oracle + a * (oracle - self.oracle)
        if self.count < 1.0 / self.smoothing:
            return False  # warming up: the averages are not yet smoother than the moving average
        if self.best_oracle is None or self.oracle > self.best_oracle:
            self.best_oracle, self.proxy_at_best = self.oracle, self.proxy
        flagged = self.oracle < self.best_oracle - self.tolerance and self.proxy > self.proxy_at_best
        if flagged:
            self.flagged_steps.append(int(step))
            if not self._in_episode:
                warnings.warn(
                    f"step {step}: over-optimisation -- the oracle score (smoothed {self.oracle:.3f}) is "
                    f"{self.best_oracle - self.oracle:.3f} below its best while the reward model's score "
                    f"(smoothed {self.proxy:.3f}) is above its value then ({self.proxy_at_best:.3f}); raise the KL "
                    f"penalty or stop here", RuntimeWarning, stacklevel=2)
        self._in_episode = flagged
        return flagged

    def state_dict(self) -> dict:
        return {"smoothing": self.smoothing, "tolerance": self.tolerance, "count": self.count, "proxy": self.proxy,
                "oracle": self.oracle,
                "best_oracle": self.best_oracle, "proxy_at_best": self.proxy_at_best,
                "flagged_steps": list(self.flagged_steps), "in_episode": self._in_episode}

    def load_state_dict(self, state: dict) -> None:
        self.smoothing, self.tolerance = float(state["smoothing"]), float(state["tolerance"])
        self.count, self.proxy, self.oracle = int(state["count"]), state["proxy"], state["oracle"]
        self.best_oracle, self.proxy_at_best = state["best_oracle"], state["proxy_at_best"]
        self.flagged_steps = list(state["flagged_steps"])
        self._in_episode = bool(state["in_episode"])


class LengthDriftMonitor:
    """Flags steps where the responses have grown while the preference signal favours length: the
    picture of a length-biased reward model or judge (Singhal et al. 2023, "A Long Way to Go";
    Park et al. 2024, length-exploiting DPO).

    Each update gets the step's mean response length (tokens) and the correlation of the proxy
    signal (a reward score, or a judge's pick: 1 chosen, 0 rejected) with response length. Both
    are smoothed as in OveroptimisationMonitor (weight max(smoothing, 1/n): the plain mean of the
    first 1/smoothing updates, then a moving average); the smoothed length at the end of that
    warm-up is the baseline. A step is flagged when the smoothed length is more than `tolerance`
    (a fraction) above the baseline while the smoothed correlation is above `min_corr`: the
    responses got longer and the signal still pays for length. The first flag of an episode
    warns; `flagged_steps` lists every flagged step.

    The defaults (15%, 0.05) come from online DPO on the synthetic task (tests/test_online_dpo.py):
    with an unbiased judge the smoothed correlation stayed near 0.03 and the length flat (never
    flagged in 40 steps); with a judge paying 0.5 per item the length rose 9.4 -> 11.9 tokens in
    24 steps while the correlation of the judge's pick (over all responses, so diluted by the
    spread of answer lengths across prompts) fell from ~0.15 to ~0.05 -- a weak signal: a
    stricter min_corr would miss that drift.
    """

    def __init__(self, smoothing: float = 0.15, tolerance: float = 0.15, min_corr: float = 0.05):
        if not 0 < smoothing <= 1:
            raise ValueError(f"LengthDriftMonitor: smoothing must be in (0, 1], got {smoothing}")
        if tolerance < 0:
            raise ValueError(f"LengthDriftMonitor: tolerance must be >= 0, got {tolerance}")
        if not -1 <= min_corr <= 1:
            raise ValueError(f"LengthDriftMonitor: min_corr must be in [-1, 1], got {min_corr}")
        self.smoothing, self.tolerance, self.min_corr = float(smoothing), float(tolerance), float(min_corr)
        self.count = 0
        self.length = self.corr = self.baseline = None
        self.flagged_steps: list[int] = []
        self._in_episode = False

    def update(self, step: int, length: float, corr: float) -> bool:
        length, corr = float(length), float(corr)
        if not (math.isfinite(length) and math.isfinite(corr)):
            raise ValueError(f"LengthDriftMonitor: step {step}: length {length} / correlation {corr} must be finite")
        self.count += 1
        a = max(self.smoothing, 1.0 / self.count)
        self.length = length if self.length is None else self.length + a * (length - self.length)
        self.corr = corr if self.corr is None else self.corr + a * (corr - self.corr)
        if self.count < 1.0 / self.smoothing:
            return False  # warming up
        if self.baseline is None:
            self.baseline = self.length
        flagged = self.length > (1.0 + self.tolerance) * self.baseline and self.corr > self.min_corr
        if flagged:
            self.flagged_steps.append(int(step))
            if not self._in_episode:
                warnings.warn(
                    f"step {step}: length drift -- responses average {self.length:.1f} tokens (smoothed), "
                    f"{self.length / self.baseline - 1:.0%} above the {self.baseline:.1f} of the first steps, while "
                    f"the preference signal still correlates with length ({self.corr:.2f}); the reward or judge may "
                    "be paying for length rather than quality", RuntimeWarning, stacklevel=2)
        self._in_episode = flagged
        return flagged

    def state_dict(self) -> dict:
        return {"smoothing": self.smoothing, "tolerance": self.tolerance, "min_corr": self.min_corr,
                "count": self.count, "length": self.length, "corr": self.corr, "baseline": self.baseline,
                "flagged_steps": list(self.flagged_steps), "in_episode": self._in_episode}

    def load_state_dict(self, state: dict) -> None:
        self.smoothing, self.tolerance = float(state["smoothing"]), float(state["tolerance"])
        self.min_corr, self.count = float(state["min_corr"]), int(state["count"])
        self.length, self.corr, self.baseline = state["length"], state["corr"], state["baseline"]
        self.flagged_steps = list(state["flagged_steps"])
        self._in_episode = bool(state["in_episode"])
