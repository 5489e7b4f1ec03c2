"""Reference-free preference optimisation: `orpo`, `cpo` and `simpo`.

Each trains the policy alone on preference pairs (no reference model, nothing precomputed) with
one fused op from the policy's token log-probs of the [chosen; rejected] batch
(fastalign/ops/ref_free.py): the pair's preference term and the NLL term on the chosen completion
in one pass forward and one backward. They derive from Algorithm, not from DPO: DPO's
`pair_loss` hook receives per-sequence log-probs, and these ops need the token log-probs (for
the NLL term and the fused backward); DPO's reference and precompute machinery has nothing to do.

    orpo   Hong et al. 2024: NLL(chosen) - beta logsig(log odds(c) - log odds(r)), c and r the
           length-averaged log-probs. Needs no SFT stage: the NLL term is the SFT.
    cpo    Xu et al. 2024, with TRL's CPOTrainer loss types (sigmoid, hinge, ipo, simpo) and
           its cpo_alpha (nll_weight here).
    simpo  Meng et al. 2024: -logsig(beta (c - r) - gamma) on length-averaged log-probs; usually
           after SFT.

Loss units are pairs (each pair's loss is one term of the mean), as DPO's. Metrics: loss,
rewards/chosen, rewards/rejected (beta times the log-probs the loss uses), rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected, nll (the chosen completions' mean NLL per token),
log_odds (mean log odds ratio of chosen over rejected, from their mean log-probs) and, for ORPO,
log_odds_ratio (TRL's: mean logsig of the log odds ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.algorithms.base import Algorithm, AlgorithmConfig, token_logps
from fastalign.algorithms.registry import register_algorithm
from fastalign.kernels.reference_ref_free import log_odds
from fastalign.ops import ref_free
from fastalign.options import option


class _RefFreePairs(Algorithm):
    """Shared by orpo, cpo and simpo: the data, the units, the step and its metrics."""

    data_kind = "preferences"
    models = ("policy",)
    trainable = ("policy",)

    def pair_losses(self, logps: torch.Tensor, mask: torch.Tensor) -> ref_free.PairLosses:
        raise NotImplementedError

    def loss_units(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, models, batch):
        logps, mask = token_logps(models["policy"], batch, packed=self.packing, fused_head=self.fused_head)
        out = self.pair_losses(logps, mask)
        b = out.losses.shape[0]
        # the log odds ratio of the length-averaged log-probs (ORPO's logits; for the others a
        # diagnostic on the same scale), from the rows' means: -nll for chosen
        valid = mask != 0
        means = torch.where(valid, logps.detach().float(), 0.0).sum(-1) / valid.sum(-1).clamp(min=1)
        odds = log_odds(means[:b]) - log_odds(means[b:])
        cw, rw = out.chosen_rewards, out.rejected_rewards
        metrics = {
            "loss": float(out.losses.detach().mean()),
            "rewards/chosen": float(cw.mean()),
            "rewards/rejected": float(rw.mean()),
            "rewards/accuracies": float((cw > rw).float().mean()),
            "rewards/margins": float((cw - rw).mean()),
            "logps/chosen": float(out.chosen_logps.mean()),
            "logps/rejected": float(out.rejected_logps.mean()),
            "nll": float(out.nll.mean()),
            "log_odds": float(odds.mean()),
        }
        metrics.update(self.extra_metrics(out))
        return out.losses.sum(), metrics

    def extra_metrics(self, out: ref_free.PairLosses) -> dict:
        return {}


@dataclass
class ORPOConfig(AlgorithmConfig):
    beta: float = option(0.1, "lambda, the weight of the odds-ratio term (TRL's ORPOConfig.beta)", gt=0)
    nll_weight: float = option(1.0, "weight of the NLL term on the chosen completions", ge=0)


@register_algorithm("orpo")
class ORPO(_RefFreePairs):
    """ORPO: NLL on chosen + odds-ratio preference term; no reference model, no SFT stage."""

    config_class = ORPOConfig

    def pair_losses(self, logps, mask):
        c = self.config
        return ref_free.orpo_loss_from_tokens(logps, mask, beta=c.beta, nll_weight=c.nll_weight)

    def extra_metrics(self, out):
        return {"log_odds_ratio": float(torch.nn.functional.logsigmoid(out.logits).mean())}


@dataclass
class CPOConfig(AlgorithmConfig):
    beta: float = option(0.1, "temperature of the preference term", gt=0)
    loss_type: str = option("sigmoid", "sigmoid | hinge | ipo | simpo (TRL's CPOTrainer loss types)",
                            choices=ref_free.CPO_LOSS_TYPES)
    nll_weight: float = option(1.0, "weight of the NLL term on the chosen completions (TRL's cpo_alpha)", ge=0)
    label_smoothing: float = option(0.0, "assumed fraction of flipped labels (sigmoid, simpo)", ge=0, lt=0.5)
    simpo_gamma: float = option(0.5, "target reward margin of loss_type simpo")
    average_log_prob: bool | None = option(None, "length-average the log-probs (None: TRL's choice, only for "
                                                 "ipo and simpo)")


@register_algorithm("cpo")
class CPO(_RefFreePairs):
    """CPO: contrastive preference term + NLL on chosen; TRL's loss types; no reference model."""

    config_class = CPOConfig

    def pair_losses(self, logps, mask):
        c = self.config
        return ref_free.cpo_loss_from_tokens(logps, mask, beta=c.beta, loss_type=c.loss_type,
                                             nll_weight=c.nll_weight, label_smoothing=c.label_smoothing,
                                             simpo_gamma=c.simpo_gamma, average_log_prob=c.average_log_prob)


@dataclass
class SimPOConfig(AlgorithmConfig):
    beta: float = option(2.0, "scale of the length-normalised reward", gt=0)
    gamma: float = option(0.5, "target reward margin")
    label_smoothing: float = option(0.0, "assumed fraction of flipped labels", ge=0, lt=0.5)
    nll_weight: float = option(0.0, "weight of an NLL term on the chosen completions", ge=0)


@register_algorithm("simpo")
class SimPO(_RefFreePairs):
    """SimPO: length-normalised implicit reward with a target margin; no reference model."""

    config_class = SimPOConfig

    def pair_losses(self, logps, mask):
        c = self.config
        return ref_free.simpo_loss_from_tokens(logps, mask, beta=c.beta, gamma=c.gamma,
                                               label_smoothing=c.label_smoothing, nll_weight=c.nll_weight)
