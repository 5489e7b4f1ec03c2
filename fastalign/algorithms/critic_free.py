"""The critic-free online algorithms' shared loss: the clipped surrogate (`ppo_policy_loss`) plus,
with beta > 0, beta times the k3 estimate of KL(pi || ref) per token (the DeepSeekMath form;
gradients flow through it). agg "token-mean" normalises by all response tokens of the batch (DAPO
/ Dr. GRPO); "seq-mean-token-mean" averages per response first (the original GRPO). With 1 epoch
x 1 mini-batch (the on-policy case) the ratio is 1 and the clip is inactive.

A subclass chooses only its advantages (and its config): GRPO (grpo.py) standardises scores
within each prompt's group; docs/algorithms.md shows a leave-one-out baseline in a short file.
Models: policy (trained), reference (frozen; only with beta > 0), reward (frozen; not with a
reward_fn).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastalign.algorithms.base import token_logps
from fastalign.algorithms.online import OnlineAlgorithm, OnlineConfig
from fastalign.data import collate as C
from fastalign.ops.kl import kl_penalty
from fastalign.ops.ppo import ppo_policy_loss
from fastalign.options import option

AGGS = ("token-mean", "seq-mean-token-mean")


@dataclass
class CriticFreeConfig(OnlineConfig):
    beta: float = option(0.04, "weight of the k3 KL to the reference (0: no reference model)", ge=0)
    agg: str = option("token-mean", "loss aggregation", choices=AGGS)


class CriticFreeAlgorithm(OnlineAlgorithm):
    """Base class of the critic-free online algorithms (not registered)."""

    config_class = CriticFreeConfig

    def uses_model(self, role: str) -> bool:
        return super().uses_model(role) and not (role == "reference" and self.config.beta == 0)

    def loss_units(self, batch) -> int:
        mask = batch["labels"][:, 1:] != C.IGNORE
        return int(mask.sum()) if self.config.agg == "token-mean" else int(mask.any(1).sum())

    def loss(self, models, batch):
        cfg = self.config
        logps, entropy, mask = token_logps(models["policy"], batch, temperature=cfg.temperature, return_entropy=True,
                                           packed=self.packing, fused_head=self.fused_head)
        pl, ps = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip_low=cfg.clip,
                                 agg=cfg.agg, global_count=1.0)  # the sum over tokens / responses
        loss = pl
        metrics = {"policy_loss": float(pl.detach()) / max(self.loss_units(batch), 1),
                   "clipfrac": float(ps["clipfrac"]), "approx_kl": float(ps["approx_kl"]),
                   "entropy": float((entropy.detach() * mask).sum()) / max(int(mask.sum()), 1)}
        if cfg.beta > 0:
            k3 = kl_penalty(logps, batch["ref_logps"], kind="k3") * mask
            per = k3.sum(1) if cfg.agg == "token-mean" else k3.sum(1) / mask.sum(1).clamp(min=1)
            loss = loss + cfg.beta * per.sum()
            metrics["kl_k3"] = float(k3.detach().sum()) / max(int(mask.sum()), 1)
        return loss, metrics
