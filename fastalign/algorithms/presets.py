"""The named members of the critic-free family: each is GRPO's algorithm (grpo.py) with other
defaults -- its config is the whole algorithm. Any of them can be reached from `grpo` too (e.g.
`fastalign train grpo algo.advantage_estimator=rloo` is rloo with GRPO's other defaults).

  rloo          RLOO (Ahmadian et al. 2024, arXiv 2402.14740): the leave-one-out baseline,
                A_i = s_i - mean of the other samples' scores (fastalign.advantages "rloo").
  reinforce_pp  REINFORCE++-baseline (Hu et al., arXiv 2501.03262), as OpenRLHF's
                `--advantage_estimator reinforce_baseline --use_kl_loss --kl_estimator k2` and
                verl's `reinforce_plus_plus_baseline`: the group mean subtracted, then whitened
                over every response token of the batch; the KL to the reference a k2 loss term
                (beta 1e-3, OpenRLHF's example), not a reward penalty. The original REINFORCE++
                (k1 KL in the token rewards, no group) is advantage_estimator=reinforce_plus_plus.
  remax         ReMax (Li et al. 2023, arXiv 2310.10505): one sample per prompt and the score of
                the prompt's greedy response as its baseline (an extra greedy sample per prompt,
                scored like the others).
  dapo          DAPO (Yu et al. 2025, arXiv 2503.14476): the ppo loss with clip-higher (1 - 0.2,
                1 + 0.28), token-mean aggregation, no KL (beta 0: no reference model), dynamic
                sampling (constant groups dropped and refilled), soft overlong punishment (the
                last overlong_buffer tokens before max_new_tokens, up to -overlong_penalty);
                mask_truncated (overlong filtering) is an option, off as in the paper's final
                recipe, where the soft punishment replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastalign.algorithms.grpo import GRPO, GRPOConfig
from fastalign.algorithms.registry import register_algorithm
from fastalign.options import option


@dataclass
class RLOOConfig(GRPOConfig):
    advantage_estimator: str = option("rloo", "fastalign.advantages kind (rloo: the leave-one-out baseline)")


@register_algorithm("rloo")
class RLOO(GRPO):
    """RLOO: the leave-one-out baseline over a prompt's samples, clipped policy loss."""

    config_class = RLOOConfig


@dataclass
class ReinforcePPConfig(GRPOConfig):
    group_size: int = option(4, "samples per prompt (the group mean is the baseline)", ge=2)
    advantage_estimator: str = option("reinforce_plus_plus_baseline", "fastalign.advantages kind")
    beta: float = option(1e-3, "weight of the KL to the reference in the loss (0: no reference model)", ge=0)
    kl_estimator: str = option("k2", "the KL estimate of that term per token: k1, k2 or k3", choices=("k1", "k2", "k3"))


@register_algorithm("reinforce_pp")
class ReinforcePP(GRPO):
    """REINFORCE++-baseline: group mean baseline, batch-whitened advantages, k2 KL loss."""

    config_class = ReinforcePPConfig


@dataclass
class ReMaxConfig(GRPOConfig):
    group_size: int = option(1, "samples per prompt (besides the greedy one)", ge=1)
    advantage_estimator: str = option("remax", "fastalign.advantages kind (remax: the greedy response's score)")


@register_algorithm("remax")
class ReMax(GRPO):
    """ReMax: the greedy response's score as the baseline, clipped policy loss."""

    config_class = ReMaxConfig


@dataclass
class DAPOConfig(GRPOConfig):
    beta: float = option(0.0, "weight of the KL to the reference in the loss (0: no reference model)", ge=0)
    clip_high: float | None = option(0.28, "upper ratio clip, 1 + clip_high (clip-higher)", gt=0)
    dynamic_sampling: bool = option(True, "drop groups whose scores are all equal and refill the batch")
    overlong_buffer: int = option(4, "soft overlong punishment over the last N tokens before max_new_tokens "
                                     "(0: off)", ge=0)


@register_algorithm("dapo")
class DAPO(GRPO):
    """DAPO: clip-higher, token-mean, dynamic sampling, soft overlong punishment, no KL."""

    config_class = DAPOConfig
