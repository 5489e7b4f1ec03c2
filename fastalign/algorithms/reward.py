"""Reward model: Bradley-Terry loss on preference pairs with a scalar head on a causal LM.

Per pair, with scores c (chosen) and r (rejected):
    -log sigmoid(c - r - m)  +  center_rewards_coefficient * (c + r)^2
averaged over pairs, as TRL 1.16's RewardTrainer.compute_loss: m is the pair's `margin` from the
data (TRL's margin column; `preference` JSONL records carry it as "margin") or the fixed
algo.margin, never both; the centring term (Eisenstein et al. 2023) keeps the scores near mean
zero. Both run in the reward_loss op (torch on every backend: B numbers, nothing to fuse).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastalign.algorithms.base import Algorithm, AlgorithmConfig
from fastalign.algorithms.registry import register_algorithm
from fastalign.errors import ConfigError, DataError
from fastalign.models import load_model
from fastalign.ops.preference import reward_loss
from fastalign.options import option


@dataclass
class RewardConfig(AlgorithmConfig):
    margin: float | None = option(None, "a fixed margin m in -log sigmoid(r_chosen - r_rejected - m) (data with a "
                                        "per-pair 'margin' field use theirs; not both)")
    center_rewards_coefficient: float | None = option(None, "TRL's centring regulariser: + coef * mean((r_chosen + "
                                                            "r_rejected)^2), scores kept near mean 0 (0.01 "
                                                            "recommended); null: off", ge=0)


@register_algorithm("reward")
class RewardModel(Algorithm):
    """Bradley-Terry reward model (scalar head on a causal LM), accuracy metric."""

    config_class = RewardConfig
    data_kind = "preferences"
    models = ("reward",)
    trainable = ("reward",)

    def build_models(self, policy, tokenizer, *, reference=None, seed=0, tiny_kwargs=None):
        return {"reward": load_model(policy, tokenizer=tokenizer, scalar_head=True, seed=seed, tiny_kwargs=tiny_kwargs)}

    def encode(self, records, tokenizer, max_length, stats):
        with_margin = sum("margin" in r for r in records)
        if with_margin and with_margin != len(records):
            raise DataError(f"reward: {with_margin} of {len(records)} preference records carry a 'margin' and the "
                              "others do not; give every pair a margin or none")
        if with_margin and self.config.margin is not None:
            raise ConfigError("reward: the data carry per-pair margins and algo.margin is set too; use one of them")
        return super().encode(records, tokenizer, max_length, stats)

    def loss_units(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    def loss(self, models, batch):
        scores = models["reward"].score(batch["input_ids"], batch["attention_mask"], packed=self.packing)
        b = scores.shape[0] // 2
        chosen, rejected = scores[:b], scores[b:]
        margin = batch["margin"].to(scores.device) if "margin" in batch else self.config.margin
        coef = self.config.center_rewards_coefficient
        loss_mean = reward_loss(chosen, rejected, margin=margin, center_rewards_coefficient=coef)
        c, r = chosen.detach(), rejected.detach()
        metrics = {
            "loss": float(loss_mean.detach()),
            "accuracy": float((c > r).float().mean()),
            "margin": float((c - r).mean()),
            "score/chosen": float(c.mean()),
            "score/rejected": float(r.mean()),
        }
        if coef is not None:  # the centring term alone: how far the scores sit from mean zero
            metrics["center_penalty"] = float((c + r).square().mean())
        return loss_mean * b, metrics
