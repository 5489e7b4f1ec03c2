"""Direct Preference Optimisation with every loss type of `fastalign.dpo_loss` (including types
registered with `fastalign.register_dpo_loss_type`): one type or a weighted list (`loss_type`,
`loss_weights`, as TRL's DPOConfig), the f-divergence (`f_divergence_type`,
`f_alpha_divergence_coef`), DiscoPOP's `discopop_tau` and LD-DPO's `ld_alpha` (the policy's and
the reference's token log-probs weighted alike, also when precomputed). TRL's `use_weighting`
(WPO) needs the LM head's per-token log sum of squared probabilities, which the trainer's fused
head does not return: refused here (fastalign.dpo_loss_from_tokens(use_weighting=True) has it).

The reference is a frozen model, or its log-probs are precomputed once before training
(`precompute_ref_logps`: the declared precomputation `precompute_roles` / `precompute`, which the
trainer runs and then frees the reference model), or they come with the data (records with
`ref_chosen_logps` / `ref_rejected_logps`: then no reference model is required). Metrics are the
implicit rewards beta * (logp - ref): rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins.

Variants override `pair_loss` (and `needs_reference` / `logp_reduce`); see the SimPO plugin in
tests/example_plugin for one in a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.algorithms.base import Algorithm, AlgorithmConfig, token_logps
from fastalign.algorithms.registry import register_algorithm
from fastalign.errors import ConfigError
from fastalign.kernels import reference_dpo_types as RT
from fastalign.ops import preference
from fastalign.options import option

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")  # an example's (or batch's) precomputed reference log-probs

LOSS_TYPES = RT.FUSED_TYPES + RT.BATCH_TYPES


@dataclass
class DPOConfig(AlgorithmConfig):
    beta: float = option(0.1, "strength of the implicit KL to the reference", gt=0)
    loss_type: str | tuple = option("sigmoid", "a loss type or a list of them: " + ", ".join(RT.FUSED_TYPES
                                    + RT.BATCH_TYPES) + ", or a type registered with fastalign.register_dpo_loss_type")
    loss_weights: tuple | None = option(None, "one weight per loss type (default 1 each)")
    label_smoothing: float = option(0.0, "assumed fraction of flipped labels (conservative DPO / robust)", ge=0, lt=0.5)
    f_divergence_type: str = option("reverse_kl", "f-divergence of f-DPO", choices=RT.F_DIVERGENCES)
    f_alpha_divergence_coef: float = option(0.5, "alpha of f_divergence_type=alpha_divergence")
    discopop_tau: float = option(0.05, "DiscoPOP's temperature", gt=0)
    ld_alpha: float | None = option(None, "LD-DPO: weight of the tokens beyond the pair's shared length", ge=0, le=1)
    use_weighting: bool = option(False, "WPO weighting (not available in the trainer: see fastalign.dpo_loss_from_tokens)")
    precompute_ref_logps: bool = option(False, "score the data with the reference once, then drop the reference")
    sft_weight: float = option(0.0, "weight of an NLL term on the chosen completions, per token (RPO)", ge=0)


@register_algorithm("dpo")
class DPO(Algorithm):
    """Direct Preference Optimisation (sigmoid, ipo, hinge, robust), implicit-reward metrics."""

    config_class = DPOConfig
    data_kind = "preferences"
    models = ("policy", "reference")
    trainable = ("policy",)
    needs_reference = True

    @property
    def logp_reduce(self) -> str:
        # IPO alone is defined on length-averaged log-probs (as in TRL); the others on sums
        # (in a list, TRL's length-averaged IPO is "ipo_norm")
        return "mean" if self._names() == ["ipo"] else "sum"

    def _names(self) -> list:
        lt = self.config.loss_type
        return [lt] if isinstance(lt, str) else list(lt)

    def _loss_kwargs(self) -> dict:
        c = self.config
        return dict(beta=c.beta, loss_type=c.loss_type if isinstance(c.loss_type, str) else list(c.loss_type),
                    loss_weights=None if c.loss_weights is None else list(c.loss_weights),
                    label_smoothing=c.label_smoothing, f_divergence_type=c.f_divergence_type,
                    f_alpha_divergence_coef=c.f_alpha_divergence_coef, discopop_tau=c.discopop_tau)

    @property
    def needs_lengths(self) -> bool:
        return any(n in RT.LENGTH_TYPES for n in self._names())

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.use_weighting:
            raise ConfigError("dpo: use_weighting (WPO) needs the LM head's per-token log sum of squared "
                              "probabilities, which the trainer does not compute; use "
                              "fastalign.dpo_loss_from_tokens(use_weighting=True, log_sum_sq_probs=...)")
        if self.config.ld_alpha is not None and "sft" in self._names():
            raise ConfigError("dpo: ld_alpha with loss type 'sft' is not supported by the trainer (TRL's sft reads the "
                              "unweighted log-probs; use sft_weight, or fastalign.dpo_loss_from_tokens)")
        if type(self).pair_loss is DPO.pair_loss:
            # validate every loss setting once, with the op's own checks (registered plugin types pass)
            z, n = torch.zeros(1), torch.ones(1)
            try:
                preference.dpo_loss(z, z, z, z, chosen_lengths=n, rejected_lengths=n, **self._loss_kwargs())
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"dpo: {e}; built-in loss types: {', '.join(LOSS_TYPES)}") from None

    def build_models(self, policy, tokenizer, *, reference=None, seed=0, tiny_kwargs=None):
        models = super().build_models(policy, tokenizer, reference=reference, seed=seed, tiny_kwargs=tiny_kwargs)
        if not self.needs_reference:
            models.pop("reference", None)
        return models

    def required_models(self, examples) -> tuple:
        if not self.needs_reference or all(REF_KEYS[0] in e for e in examples):
            return tuple(r for r in self.models if r != "reference")
        return self.models

    # ---- log-probs ----------------------------------------------------------------------------

    def sequence_logps(self, model, batch):
        logps, mask = token_logps(model, batch, packed=self.packing, fused_head=self.fused_head)
        weighted = logps
        if self.config.ld_alpha is not None:  # LD-DPO: the same token weights for policy and reference
            weighted = logps * RT.ld_token_weights(mask, self.config.ld_alpha).to(logps.dtype)
        seq = preference.sequence_logps(weighted, mask, reduce=self.logp_reduce)
        return seq, logps, mask

    @torch.no_grad()
    def reference_logps(self, models, batch):
        if REF_KEYS[0] in batch:
            return batch[REF_KEYS[0]], batch[REF_KEYS[1]]
        if not self.needs_reference:
            z = torch.zeros(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)
            return z, z
        if "reference" not in models:
            raise RuntimeError("dpo: no reference model and the batch carries no ref_chosen_logps/ref_rejected_logps")
        seq, _, _ = self.sequence_logps(models["reference"], batch)
        b = seq.shape[0] // 2
        return seq[:b], seq[b:]

    # ---- precomputed reference log-probs (precompute_ref_logps) ------------------------------

    def precompute_roles(self) -> tuple:
        return ("reference",) if self.needs_reference and self.config.precompute_ref_logps else ()

    def precompute(self, context, examples) -> None:
        """One pass of the frozen reference over the examples, in chunks of batch_size: each gets
        its ref_chosen_logps / ref_rejected_logps (the trainer then frees the reference)."""
        bs = context.batch_size
        for i in range(0, len(examples), bs):
            chunk = examples[i: i + bs]
            batch = context.to_device(self.collate(chunk, context.tokenizer))
            with context.autocast():
                rc, rr = self.reference_logps(context.models, batch)
            for ex, c, r in zip(chunk, rc.tolist(), rr.tolist()):
                ex[REF_KEYS[0]], ex[REF_KEYS[1]] = c, r

    # ---- loss ---------------------------------------------------------------------------------

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected, lengths=None):
        """Per-pair losses [B] and implicit rewards (chosen, rejected); override for variants.
        lengths: the token counts (chosen [B], rejected [B]), passed only where a loss type reads them."""
        kw = {} if lengths is None else dict(chosen_lengths=lengths[0], rejected_lengths=lengths[1])
        return preference.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, **self._loss_kwargs(), **kw)

    def loss_units(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, models, batch):
        seq, logps, mask = self.sequence_logps(models["policy"], batch)
        b = seq.shape[0] // 2
        ref_c, ref_r = self.reference_logps(models, batch)
        kw = {}
        if self.needs_lengths:
            n = (mask != 0).sum(-1)
            kw["lengths"] = (n[:b], n[b:])
        losses, rc, rr = self.pair_loss(seq[:b], seq[b:], ref_c.float(), ref_r.float(), **kw)
        loss_sum = losses.sum()
        if self.config.sft_weight > 0:
            # per-pair mean NLL of the chosen completion, so the units stay pairs
            nll = -preference.sequence_logps(logps[:b], mask[:b], reduce="mean")
            loss_sum = loss_sum + self.config.sft_weight * nll.sum()
        metrics = {
            "loss": float(losses.detach().mean()),
            "rewards/chosen": float(rc.mean()),
            "rewards/rejected": float(rr.mean()),
            "rewards/accuracies": float((rc > rr).float().mean()),
            "rewards/margins": float((rc - rr).mean()),
            "logps/chosen": float(seq[:b].detach().mean()),
            "logps/rejected": float(seq[b:].detach().mean()),
        }
        return loss_sum, metrics
