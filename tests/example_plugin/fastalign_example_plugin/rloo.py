"""RLOO (Ahmadian et al. 2024, "Back to Basics"), as a plugin: a whole online algorithm in one
short file. Each prompt is sampled `group_size` times; a response's advantage is its score minus
the mean score of the other k - 1 responses to the same prompt (the leave-one-out baseline),
the same for all its tokens.

Everything else is inherited: sampling, scoring, the optimiser's epochs x mini-batches, the
monitors, evaluation and checkpointed state from fastalign.algorithms.OnlineAlgorithm; the
clipped policy loss with an optional k3 KL to the reference (`beta`, `agg`, `clip`) from
CriticFreeAlgorithm. Registered through the entry point `rloo-example` (a name of its own, so
that a built-in `rloo` can arrive without a clash).
"""

from dataclasses import dataclass

from fastalign.algorithms import CriticFreeAlgorithm, CriticFreeConfig
from fastalign.options import option


@dataclass
class RLOOConfig(CriticFreeConfig):
    group_size: int = option(4, "samples per prompt (each one's baseline: the mean of the others)", ge=2)


class RLOO(CriticFreeAlgorithm):
    """RLOO: leave-one-out baseline over k samples per prompt, clipped policy loss."""

    config_class = RLOOConfig

    @property
    def samples_per_prompt(self) -> int:
        return self.config.group_size

    def advantages(self, context, rollout):
        k = self.samples_per_prompt
        s = rollout.scores.view(-1, k)  # [prompts, k]: a prompt's samples are consecutive
        others = (s.sum(1, keepdim=True) - s) / (k - 1)
        return {"advantages": (s - others).reshape(-1, 1) * rollout.mask}
