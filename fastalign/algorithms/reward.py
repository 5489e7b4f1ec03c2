"""Reward model: Bradley-Terry loss on preference pairs with a scalar head on a causal LM."""

from __future__ import annotations

from dataclasses import dataclass

from fastalign.algorithms.base import Algorithm, AlgorithmConfig
from fastalign.algorithms.registry import register_algorithm
from fastalign.models import load_model
from fastalign.ops.preference import reward_loss
from fastalign.options import option


@dataclass
class RewardConfig(AlgorithmConfig):
    margin: float | None = option(None, "a fixed margin m in -log sigmoid(r_chosen - r_rejected - m)")


@register_algorithm("reward")
class RewardModel(Algorithm):
    """Bradley-Terry reward model (scalar head on a causal LM), accuracy metric."""

    config_class = RewardConfig
    data_kind = "preferences"
    models = ("reward",)
    trainable = ("reward",)

    def build_models(self, policy, tokenizer, *, reference=None, seed=0, tiny_kwargs=None):
        return {"reward": load_model(policy, tokenizer=tokenizer, scalar_head=True, seed=seed, tiny_kwargs=tiny_kwargs)}

    def loss_units(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    def loss(self, models, batch):
        scores = models["reward"].score(batch["input_ids"], batch["attention_mask"], packed=self.packing)
        b = scores.shape[0] // 2
        chosen, rejected = scores[:b], scores[b:]
        margin = self.config.margin
        loss_mean = reward_loss(chosen, rejected, margin=margin)
        c, r = chosen.detach(), rejected.detach()
        metrics = {
            "loss": float(loss_mean.detach()),
            "accuracy": float((c > r).float().mean()),
            "margin": float((c - r).mean()),
            "score/chosen": float(c.mean()),
            "score/rejected": float(r.mean()),
        }
        return loss_mean * b, metrics
