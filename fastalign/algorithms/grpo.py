"""GRPO (Shao et al. 2024, DeepSeekMath): PPO without a value model. Each prompt is sampled
`group_size` times; a response's advantage is its score standardised within its group
(`fastalign.group_advantages`; scale "batch" or "none" for the Dr. GRPO variants), the same for
all its tokens. The loss is the critic-free one (critic_free.py: a policy loss of `loss_type` +
beta * KL to the reference, aggregated by `agg`); the step, its `ppo_epochs` x `mini_batches`
optimizer steps and the monitors are OnlineAlgorithm's (online.py).

This class is also the rest of the critic-free family (presets.py: rloo, reinforce_pp, remax,
dapo are configs of it):
  * advantage_estimator: any `fastalign.advantages` kind but gae (which needs a critic: ppo),
    with advantage_params as its options and the group ids of the samples as `index`; "grpo"
    (the default) keeps GRPO's group_advantages (the same formula, plus scale="batch"); "remax"
    samples one greedy response per prompt, scores it the same way, and passes those scores
    as reward_baselines;
  * dynamic_sampling (DAPO): groups whose scores are all equal (no learning signal) are dropped
    and the batch is refilled by sampling the next prompts of the run's data order (each round
    one step's worth: context.next_micro_batches), up to max_sampling_rounds extra rounds. When
    the rounds run out, the dropped groups fill the batch up to its size, latest first (their
    advantages are all 0 under every group estimator: they move the policy only through the KL
    term, but count in the token-mean normaliser) -- logged as dynamic_sampling/filled. The
    filter reads the final scores (after overlong shaping), as verl's `seq_final_reward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.algorithms import _rollout as R
from fastalign.algorithms.critic_free import CriticFreeAlgorithm, CriticFreeConfig
from fastalign.algorithms.registry import register_algorithm
from fastalign.errors import ConfigError
from fastalign.ops.advantages import ADVANTAGE_ESTIMATORS, advantages
from fastalign.ops.grpo import group_advantages
from fastalign.options import option


def estimators() -> tuple:
    """The advantage estimators algo.advantage_estimator accepts (gae needs a critic: ppo)."""
    return tuple(sorted(k for k in ADVANTAGE_ESTIMATORS if k != "gae"))


@dataclass
class GRPOConfig(CriticFreeConfig):
    group_size: int = option(8, "samples per prompt (a group of one has no baseline)", ge=2)
    scale: str = option("group", "advantage scaling: group, batch or none (Dr. GRPO); grpo estimator only",
                        choices=("group", "batch", "none"))
    advantage_estimator: str = option("grpo", "fastalign.advantages kind: grpo, rloo, reinforce_plus_plus, "
                                              "reinforce_plus_plus_baseline, remax, opo, grpo_passk, or a registered one")
    advantage_params: dict = option(default_factory=dict, help="options of the estimator (e.g. {epsilon: 1e-4}, "
                                                               "{norm_adv_by_std_in_grpo: false}, {gamma: 0.99})")
    dynamic_sampling: bool = option(False, "drop groups whose scores are all equal and refill the batch (DAPO)")
    max_sampling_rounds: int = option(3, "dynamic sampling: extra sampling rounds per step at most", ge=0, le=1000)


@register_algorithm("grpo")
class GRPO(CriticFreeAlgorithm):
    """Group-relative policy optimisation: group-normalised advantages, clipped loss, optional k3 KL."""

    config_class = GRPOConfig

    @property
    def samples_per_prompt(self) -> int:
        return int(self.config.group_size)

    def check_config(self) -> None:
        super().check_config()
        cfg = self.config
        est = cfg.advantage_estimator
        if est not in estimators():
            why = " (gae needs a value model: use ppo)" if est == "gae" else ""
            raise ConfigError(f"algo.advantage_estimator must be one of {', '.join(estimators())}{why}; got {est!r}")
        if est != "grpo" and cfg.scale != "group":
            raise ConfigError(f"algo.scale applies to the grpo estimator only; with {est!r} leave it at group")
        if est == "grpo" and cfg.scale == "group" and cfg.group_size < 2:
            raise ConfigError("algo.group_size must be >= 2 for grpo's group std (or algo.scale: none)")
        if cfg.dynamic_sampling and cfg.group_size < 2:
            raise ConfigError("algo.dynamic_sampling needs algo.group_size >= 2 (a group of one is always constant)")
        if not isinstance(cfg.advantage_params, dict):
            raise ConfigError(f"algo.advantage_params must be a mapping of options, got {cfg.advantage_params!r}")
        if "reward_baselines" in cfg.advantage_params:
            raise ConfigError("algo.advantage_params: reward_baselines are the greedy responses' scores, set by remax")
        try:  # the options checked by the estimator itself, on a dummy batch of two groups
            self._estimate(torch.zeros(2 * cfg.group_size), torch.ones(2 * cfg.group_size, 1, dtype=torch.bool),
                           torch.zeros(2 * cfg.group_size))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"algo.advantage_params {cfg.advantage_params!r} for {est!r}: {e}") from None

    # ---- advantages ----------------------------------------------------------------------------

    def _estimate(self, scores, mask, baselines) -> torch.Tensor:
        """[N, T] advantages of the [N] scores of consecutive groups over mask [N, T]."""
        cfg, k = self.config, self.samples_per_prompt
        params = dict(cfg.advantage_params)
        if cfg.advantage_estimator == "grpo":  # as GRPO always did (fastalign.advantages' grpo formula)
            unknown = set(params) - {"epsilon", "norm_adv_by_std_in_grpo"}
            if unknown:
                raise TypeError(f"grpo does not take {sorted(unknown)}")
            scale = cfg.scale if params.get("norm_adv_by_std_in_grpo", True) else "none"
            adv = group_advantages(scores, k, eps=params.get("epsilon", 1e-6), scale=scale)
            return adv[:, None] * mask
        if cfg.advantage_estimator == "remax":
            params["reward_baselines"] = baselines
        index = torch.arange(scores.shape[0], device=scores.device) // k
        # masked: the token-level estimators (remax's returns) carry values back over the prompt
        # positions of this [N, L-1] layout, which verl's response-only tensors do not have
        return advantages(cfg.advantage_estimator, scores, mask, index=index, **params)[0] * mask

    def advantages(self, context, rollout):
        return {"advantages": self._estimate(rollout.scores, rollout.mask, rollout.baseline_scores)}

    # ---- sampling: ReMax's greedy baselines, dynamic sampling ------------------------------------

    def _round(self, context, micro_batches, seed) -> R.Rollout:
        """One sampled and scored round (+ the greedy baselines for remax)."""
        cfg = self.config
        rollout = super().make_rollout(context, micro_batches, seed)
        if cfg.advantage_estimator == "remax":
            k = self.samples_per_prompt
            greedy = R.sample(context, rollout.prompts[::k], temperature=cfg.temperature,
                              max_new_tokens=cfg.max_new_tokens, seed=seed, do_sample=False)
            base = R.scores(context, greedy, self.reward_fn, packed=self.packing)
            if cfg.overlong_buffer:
                base = base + self.overlong_penalty(greedy)
            rollout.baseline_scores = base.repeat_interleave(k)
        return rollout

    def make_rollout(self, context, micro_batches, seed):
        cfg = self.config
        rollout = self._round(context, micro_batches, seed)
        self._sampling = {}
        if not cfg.dynamic_sampling:
            return rollout
        k = self.samples_per_prompt
        want = len(rollout) // k
        kept, dropped, rounds = [], [], 0
        while True:
            groups = rollout.scores.view(-1, k)
            varied = (groups.amax(1) != groups.amin(1)).tolist()
            for g, ok in enumerate(varied):
                (kept if ok else dropped).append((rollout, range(g * k, (g + 1) * k)))
            # every rank goes on while any is short (the same number of sampling rounds everywhere)
            if rounds == cfg.max_sampling_rounds or not context.any_rank(len(kept) < want):
                break
            rounds += 1
            rollout = self._round(context, context.next_micro_batches(),
                                  context.derive_seed(R.STEP_SEED_FACTOR * (context.step + 1) + 1 + rounds))
        if not dropped:  # nothing to drop: the first round as it is
            return rollout
        filled = max(0, want - len(kept))
        parts = kept[:want] + dropped[::-1][:filled]
        self._sampling = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/dropped": float(len(dropped)),
                          "dynamic_sampling/filled": float(filled)}
        return R.subset(context, [(r, list(rows)) for r, rows in parts], max_new_tokens=cfg.max_new_tokens)

    def step_metrics(self, rollout, data):
        groups = rollout.scores.view(-1, self.samples_per_prompt)
        # groups whose samples all scored the same carry no learning signal
        constant = groups.amax(1) == groups.amin(1)
        out = super().step_metrics(rollout, data)
        out["zero_std_groups"] = float(constant.float().mean())
        if self.config.overlong_buffer:
            out["overlong_penalty"] = float(self.overlong_penalty(rollout).mean())
        out.update(getattr(self, "_sampling", {}))
        return out
