"""GRPO (Shao et al. 2024, DeepSeekMath): PPO without a value model. Each prompt is sampled
`group_size` times; a response's advantage is its score standardised within its group
(`fastalign.group_advantages`; scale "batch" or "none" for the Dr. GRPO variants), the same for
all its tokens. The loss is the critic-free one (critic_free.py: clipped surrogate + beta * k3 KL
to the reference, aggregated by `agg`); the step, its `ppo_epochs` x `mini_batches` optimizer
steps and the monitors are OnlineAlgorithm's (online.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastalign.algorithms.critic_free import CriticFreeAlgorithm, CriticFreeConfig
from fastalign.algorithms.registry import register_algorithm
from fastalign.ops.grpo import group_advantages
from fastalign.options import option


@dataclass
class GRPOConfig(CriticFreeConfig):
    group_size: int = option(8, "samples per prompt (a group of one has no baseline)", ge=2)
    scale: str = option("group", "advantage scaling: group, batch or none (Dr. GRPO)", choices=("group", "batch", "none"))


@register_algorithm("grpo")
class GRPO(CriticFreeAlgorithm):
    """Group-relative policy optimisation: group-normalised advantages, clipped loss, optional k3 KL."""

    config_class = GRPOConfig

    @property
    def samples_per_prompt(self) -> int:
        return int(self.config.group_size)

    def advantages(self, context, rollout):
        adv = group_advantages(rollout.scores, self.samples_per_prompt, scale=self.config.scale)
        return {"advantages": adv[:, None] * rollout.mask}

    def step_metrics(self, rollout, data):
        groups = rollout.scores.view(-1, self.samples_per_prompt)
        # groups whose samples all scored the same carry no learning signal
        return {"score": float(rollout.scores.mean()), "zero_std_groups": float((groups.std(1) == 0).float().mean())}
