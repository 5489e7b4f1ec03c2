"""KTO and BCO: alignment from unpaired, binary-labelled completions (data kind "unpaired": TRL's
{"prompt", "completion", "label"}, fastalign.data.formats `kto`, or the synthetic task's
oracle-labelled examples).

kto  Kahneman-Tversky Optimisation (Ethayarajh et al. 2024) as TRL 1.16's KTOTrainer computes it:
     each micro-batch also carries a KL batch -- the same completions under mismatched prompts,
     rotated by one within the batch (data.collate.collate_unpaired) -- whose policy and reference
     log-probs (no gradient) give the reference point z0 = max(0, mean(policy - ref)); the loss is
     fastalign.kto_loss_from_tokens, z0 included, in one fused op. loss_type "apo_zero_unpaired"
     (no KL batch) is TRL's unpaired APO-zero.
bco  Binary Classifier Optimisation (Jung et al. 2024) as TRL's BCOTrainer, without its UDM
     density-ratio weights: the reward shift delta is the running mean of every implicit reward
     seen in training (TRL's RunningMoments: count starts at 1e-24, each micro-batch's rewards
     are added before its loss is taken), kept in the algorithm's state (checkpointed); eval
     batches do not update it.

The reference is a frozen copy of the policy, or with model.peft the policy with its adapters
off (fastalign/trainer/run.py), as for DPO. Metrics: rewards/chosen and rewards/rejected (mean
implicit reward beta * (logp - ref) of the desirable / undesirable examples of the micro-batch;
left out of a micro-batch that has none), rewards/margins, logps/chosen, logps/rejected, and kl
(KTO's z0) or delta (BCO's shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.algorithms.base import Algorithm, AlgorithmConfig, token_logps
from fastalign.algorithms.registry import register_algorithm
from fastalign.data import collate as C
from fastalign.errors import ConfigError
from fastalign.ops import preference, unpaired
from fastalign.options import option


@dataclass
class KTOConfig(AlgorithmConfig):
    beta: float = option(0.1, "strength of the implicit KL to the reference", gt=0)
    loss_type: str = option("kto", "kto (KL reference point from mismatched pairs) | apo_zero_unpaired (none)",
                            choices=unpaired.KTO_LOSS_TYPES)
    desirable_weight: float = option(1.0, "weight of the desirable examples' losses (lambda_D)", ge=0)
    undesirable_weight: float = option(1.0, "weight of the undesirable examples' losses (lambda_U)", ge=0)


@dataclass
class BCOConfig(AlgorithmConfig):
    beta: float = option(0.1, "strength of the implicit KL to the reference", gt=0)
    desirable_weight: float = option(1.0, "weight of the desirable examples' losses (1: TRL's BCO)", ge=0)
    undesirable_weight: float = option(1.0, "weight of the undesirable examples' losses (1: TRL's BCO)", ge=0)


def _batch_view(batch: dict, prefix: str) -> dict:
    """The rows of `batch` named prefix + input_ids / attention_mask / labels, as token_logps takes them."""
    return {k: batch[prefix + k] for k in ("input_ids", "attention_mask", "labels")}


class _Unpaired(Algorithm):
    data_kind = "unpaired"
    models = ("policy", "reference")
    trainable = ("policy",)
    uses_kl = False

    def encode(self, records, tokenizer, max_length, stats) -> list:
        return C.encode_unpaired(records, tokenizer, max_length, stats)

    def collate(self, examples, tokenizer) -> dict:
        return C.collate_unpaired(examples, tokenizer.pad_token_id, kl=self.uses_kl)

    def loss_units(self, batch) -> int:
        return batch["input_ids"].shape[0]  # TRL: the mean over the examples

    def _logps(self, model, batch, prefix=""):
        return token_logps(model, _batch_view(batch, prefix), packed=self.packing, fused_head=self.fused_head)

    @staticmethod
    def _metrics(losses, rewards, pseq, labels) -> dict:
        out = {"loss": float(losses.detach().mean())}
        for name, rows in (("chosen", labels), ("rejected", ~labels)):
            if bool(rows.any()):
                out[f"rewards/{name}"] = float(rewards[rows].mean())
                out[f"logps/{name}"] = float(pseq.detach()[rows].mean())
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


@register_algorithm("kto")
class KTO(_Unpaired):
    """Kahneman-Tversky Optimisation on unpaired labelled completions (TRL's KTOTrainer)."""

    config_class = KTOConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.uses_kl = self.config.loss_type == "kto"

    def setup(self, context) -> None:
        if self.uses_kl and context.batch_size < 2:
            raise ConfigError("kto: the KL estimate pairs each completion with another example's prompt in the same "
                              f"micro-batch; trainer.batch_size must be >= 2, got {context.batch_size}")

    def loss(self, models, batch):
        c = self.config
        pol, mask = self._logps(models["policy"], batch)
        kl = {}
        with torch.no_grad():
            ref, _ = self._logps(models["reference"], batch)
            if self.uses_kl:
                # TRL: the KL log-probs of both models under no_grad (z0 is a constant)
                klp, klm = self._logps(models["policy"], batch, "kl_")
                klr, _ = self._logps(models["reference"], batch, "kl_")
                kl = dict(kl_policy_token_logps=klp, kl_ref_token_logps=klr, kl_mask=klm)
        labels = batch["label"]
        losses, rewards, z0, pseq, _ = unpaired.kto_loss_from_tokens(
            pol, ref, mask, labels, **kl, beta=c.beta, desirable_weight=c.desirable_weight,
            undesirable_weight=c.undesirable_weight, loss_type=c.loss_type, return_sequence_logps=True)
        metrics = self._metrics(losses, rewards, pseq, labels)
        metrics["kl"] = float(z0)
        return losses.sum(), metrics


@register_algorithm("bco")
class BCO(_Unpaired):
    """Binary Classifier Optimisation with a running reward shift (TRL's BCOTrainer, no UDM)."""

    config_class = BCOConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.delta_mean, self.delta_count = 0.0, 1e-24  # TRL's RunningMoments start
        self._training = True

    def state_dict(self) -> dict:
        return {"delta_mean": self.delta_mean, "delta_count": self.delta_count}

    def load_state_dict(self, state: dict) -> None:
        self.delta_mean, self.delta_count = float(state["delta_mean"]), float(state["delta_count"])

    def update_delta(self, rewards: torch.Tensor) -> None:
        """RunningMoments.update's mean: mean += (batch mean - mean) n / (count + n)."""
        n = rewards.numel()
        if n == 0:
            return
        total = self.delta_count + n
        self.delta_mean += (float(rewards.float().mean()) - self.delta_mean) * n / total
        self.delta_count = total

    def loss(self, models, batch):
        c = self.config
        pol, mask = self._logps(models["policy"], batch)
        with torch.no_grad():
            ref, _ = self._logps(models["reference"], batch)
            rseq = preference.sequence_logps(ref, mask)
        # delta needs this batch's rewards before the loss (TRL updates first): the per-sequence
        # path, sequence_logps then bco_loss (two fused ops, no token pass twice)
        pseq = preference.sequence_logps(pol, mask)
        if self._training:
            self.update_delta(c.beta * (pseq.detach() - rseq))
        labels = batch["label"]
        losses, rewards = unpaired.bco_loss(pseq, rseq, labels, self.delta_mean, beta=c.beta,
                                            desirable_weight=c.desirable_weight,
                                            undesirable_weight=c.undesirable_weight)
        metrics = self._metrics(losses, rewards, pseq, labels)
        metrics["delta"] = self.delta_mean
        return losses.sum(), metrics

    @torch.no_grad()
    def eval_step(self, context, batch: dict):
        self._training = False  # TRL's do_train=False: evaluation leaves delta alone
        try:
            return super().eval_step(context, batch)
        finally:
            self._training = True
