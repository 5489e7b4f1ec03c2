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
    Under torchrun each rank filters and refills its own share (every rank samples as many
    rounds as the shortest needs); the logged counts are summed over ranks;
  * optimal_token_baseline (verl's estimator): its per-token inputs come from the step --
    old_log_probs are the rollout's old log-probs, sum_pi_squared (sum_v pi(v | s_t)^2 at the
    sampling temperature) one more no-grad forward of the policy with its full logits
    (`sum_pi_squared`; the fused head gives log-probs and entropies only), rollout_is_weights
    the TIS weights when algo.rollout_correction has rollout_is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.algorithms import _rollout as R
from fastalign.kernels import reference_policy_losses as RPL
from fastalign.algorithms.critic_free import CriticFreeAlgorithm, CriticFreeConfig
from fastalign.algorithms.registry import register_algorithm
from fastalign.errors import ConfigError
from fastalign.ops.advantages import ADVANTAGE_ESTIMATORS, advantages
from fastalign.ops.grpo import group_advantages
from fastalign.options import option


_OTB_INPUTS = ("old_log_probs", "sum_pi_squared", "rollout_is_weights")


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
        taken = sorted({"reward_baselines", *_OTB_INPUTS} & set(cfg.advantage_params))
        if taken:
            raise ConfigError(f"algo.advantage_params: {taken} are set by the trainer (the greedy responses' scores "
                              "for remax; the step's log-probs for optimal_token_baseline)")
        try:  # the options checked by the estimator itself, on a dummy batch of two groups
            n = 2 * cfg.group_size
            dummy = {k: torch.zeros(n, 1) for k in _OTB_INPUTS[:2]} if est == "optimal_token_baseline" else {}
            self._estimate(torch.zeros(n), torch.ones(n, 1, dtype=torch.bool), torch.zeros(n), **dummy)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"algo.advantage_params {cfg.advantage_params!r} for {est!r}: {e}") from None

    # ---- advantages ----------------------------------------------------------------------------

    def _estimate(self, scores, mask, baselines, **inputs) -> torch.Tensor:
        """[N, T] advantages of the [N] scores of consecutive groups over mask [N, T]; `inputs`:
        the per-token tensors of optimal_token_baseline."""
        cfg, k = self.config, self.samples_per_prompt
        params = {**cfg.advantage_params, **inputs}
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
        inputs = {}
        if self.config.advantage_estimator == "optimal_token_baseline":
            inputs = {"old_log_probs": rollout.old_logps, "sum_pi_squared": self.sum_pi_squared(context, rollout)}
            tis = {k: v for k, v in self.config.rollout_correction.items() if k.startswith("rollout_is")}
            if tis.get("rollout_is") is not None:
                inputs["rollout_is_weights"] = RPL.rollout_correction(rollout.old_logps, rollout.sampler_logps,
                                                                      rollout.mask, **tis)[0]
        return {"advantages": self._estimate(rollout.scores, rollout.mask, rollout.baseline_scores, **inputs)}

    @torch.no_grad()
    def sum_pi_squared(self, context, rollout) -> torch.Tensor:
        """[N, L-1] sum_v pi(v | s_t)^2 of the sampling policy at each response position (0
        elsewhere), at the sampling temperature T: with z = logits / T,
            sum_v softmax(z)_v^2 = exp(logsumexp(2 z) - 2 logsumexp(z))
        (no softmax materialised twice; fp32), from the policy's full logits, a micro-batch of
        rows at a time (the memory of one [rows, L, V] logits tensor)."""
        b, cfg = rollout.batch, self.config
        model = context.models["policy"]
        out = torch.zeros(rollout.mask.shape, dtype=torch.float32, device=rollout.mask.device)
        rows = cfg.micro_batch_size or context.batch_size
        for i in range(0, len(rollout), rows):
            with context.autocast():
                logits = model(input_ids=b["input_ids"][i: i + rows],
                               attention_mask=b["attention_mask"][i: i + rows]).logits
            z = logits[:, :-1].float() / cfg.temperature
            out[i: i + rows] = torch.exp(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
        return out * rollout.mask

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
        rollout = first = self._round(context, micro_batches, seed)
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
        filled = max(0, want - len(kept))
        # the counts of every rank (a collective: every rank gets here, dropped groups or not)
        total = context.all_reduce([len(dropped), filled]) if context.world > 1 else [len(dropped), filled]
        if not total[0]:  # nothing to drop anywhere: the first round as it is
            return first
        self._sampling = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/dropped": float(total[0]),
                          "dynamic_sampling/filled": float(total[1])}
        if not dropped:  # nothing to drop on this rank (another rank sampled more rounds): its first round
            return first
        parts = kept[:want] + dropped[::-1][:filled]
        return R.subset(context, [(r, list(rows)) for r, rows in parts], max_new_tokens=cfg.max_new_tokens)

    def rollout_metric_parts(self, rollout, data) -> dict:
        groups = rollout.scores.view(-1, self.samples_per_prompt)
        # groups whose samples all scored the same carry no learning signal
        constant = groups.amax(1) == groups.amin(1)
        out = super().rollout_metric_parts(rollout, data)
        out["zero_std_groups"] = (int(constant.sum()), len(groups))
        if self.config.overlong_buffer:
            out["overlong_penalty"] = (float(self.overlong_penalty(rollout).sum()), len(rollout))
        return out

    def step_metrics(self, rollout, data):
        out = super().step_metrics(rollout, data)
        out.update(getattr(self, "_sampling", {}))
        return out
