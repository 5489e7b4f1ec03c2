"""The critic-free online algorithms' shared loss: a policy loss of `loss_type` (default "ppo", the
clipped surrogate) plus, with beta > 0, beta times a KL estimate to the reference per token
(`kl_estimator`, default k3: the DeepSeekMath form; gradients flow through it), aggregated by
`agg`:

    token-mean               sum over all response tokens of the batch / their number (DAPO, Dr. GRPO)
    seq-mean-token-mean      each response's token mean, averaged over responses (the original GRPO)
    seq-mean-token-sum       each response's token sum, averaged over responses
    seq-mean-token-sum-norm  each response's token sum / max_new_tokens, averaged (Dr. GRPO's constant)

Exact over micro-batches: `loss` returns the *sum* over its micro-batch's units (tokens or
responses: the policy loss is called with global_count=1.0) and `loss_units` their number; the
trainer divides the summed micro-batch losses by the units of the whole mini-batch (and of every
rank), which is the full-batch mean. The KL term is aggregated the same way.

Per-response options, read from the rollout (CriticFreeConfig):
  * overlong_buffer / overlong_penalty: DAPO's soft overlong punishment added to the score of a
    response of |y| tokens (EOS included), L = max_new_tokens, B = overlong_buffer:
    min(0, -(|y| - (L - B)) / B * overlong_penalty) -- 0 up to L - B tokens, -overlong_penalty at L;
    as verl's DAPO reward manager (verl/workers/reward_manager/dapo.py, `overlong_buffer_cfg`);
  * mask_truncated: responses cut at max_new_tokens without an EOS are left out of the loss
    (their tokens count in no normaliser), DAPO's "overlong filtering";
  * rollout_correction: the sampler's per-token log-probs travel with the rollout as
    `rollout_logps` and go to the policy loss as rollout_logprobs, with the options of this dict
    (truncated / masked importance sampling against the engine mismatch: fastalign.policy_loss).
    MIS (rollout_rs*) is applied once per step, to the loss mask (`loss_data`), so that its
    rejected tokens leave the loss units as they leave the loss; TIS (rollout_is*) in the loss.
    The correction compares the trainer's recomputed old log-probs with the sampler's, so it
    needs algo.old_logps: recompute (with `sampler` the two are one tensor: every weight 1);
  * debug_rollout_logp_noise / debug_rollout_logp_bias: a simulated engine mismatch, for a
    sanity check of a run's correction settings without a second engine: the sampler's
    per-token log-probs become lp + bias + noise * N(0, 1), seeded by the sampling round's seed,
    before anything reads them (as old_logps with algo.old_logps: sampler, as the rollout
    log-probs of rollout_correction). The samples themselves are unchanged, so the perturbed
    values are wrong by exactly the added amount (they may exceed 0).

Metrics of the rollout (masked_truncated, rollout_rs_masked_frac; grpo.py's zero_std_groups
and dynamic-sampling counts) are over every rank's rows under torchrun, as a single process
of the same global batch would log them.

Every loss goes through one function, `policy_loss` below. With 1 epoch x 1 mini-batch (the
on-policy case) the ratio is 1 and the clip is inactive. A subclass chooses only its advantages
(and its config): GRPO and its family (grpo.py, presets.py). Models: policy (trained), reference
(frozen; only with beta > 0), reward (frozen; not with a reward_fn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.algorithms import _rollout as R
from fastalign.algorithms.base import token_logps
from fastalign.algorithms.online import OnlineAlgorithm, OnlineConfig
from fastalign.data import collate as C
from fastalign.errors import ConfigError
from fastalign.kernels import reference_policy_losses as RPL
from fastalign.ops.kl import kl_penalty
from fastalign.ops.policy_loss import policy_loss as _policy_loss
from fastalign.ops.policy_loss_types import POLICY_LOSS_TYPES
from fastalign.options import option

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_TOKEN_AGGS = ("token-mean",)  # normalised by tokens; the others by responses
_NOISE_SEED_OFFSET = 104_729  # prime; the debug noise's generator seed is the round's seed plus this



def loss_types() -> tuple:
    """The policy loss types `algo.loss_type` accepts (fastalign.policy_loss's registry, plugins
    registered with fastalign.register_policy_loss included)."""
    return tuple(sorted(POLICY_LOSS_TYPES))


def policy_loss(logprobs, old_logprobs, advantages, mask, *, loss_type="ppo", agg="token-mean", global_count=None,
                horizon=None, rollout_logprobs=None, rollout_correction=None, **loss_params):
    """The one call of the family's policy loss: fastalign.policy_loss(...) -> (loss, stats), the
    correction options given as one mapping."""
    return _policy_loss(logprobs, old_logprobs, advantages, mask, loss_type=loss_type, agg=agg,
                        global_count=global_count, horizon=horizon, rollout_logprobs=rollout_logprobs,
                        **(rollout_correction or {}), **loss_params)


@dataclass
class CriticFreeConfig(OnlineConfig):
    beta: float = option(0.04, "weight of the KL to the reference in the loss (0: no reference model)", ge=0)
    kl_estimator: str = option("k3", "the KL estimate of that term per token: k1, k2 or k3", choices=("k1", "k2", "k3"))
    agg: str = option("token-mean", "loss aggregation (seq-mean-token-sum-norm divides by max_new_tokens)",
                      choices=AGGS)
    loss_type: str = option("ppo", "policy loss (fastalign.policy_loss): ppo, gspo, gspo_token, cispo, sapo, "
                                          "geo_mean, gpg, reinforce, clip_cov, kl_cov or a registered one")
    clip_high: float | None = option(None, "upper ratio clip of the ppo loss, 1 + clip_high (DAPO's clip-higher: "
                                           "0.28); default: clip", gt=0)
    dual_clip: float | None = option(None, "dual-clip bound c > 1 of the ppo loss for negative advantages", gt=1)
    loss_params: dict = option(default_factory=dict, help="further keyword arguments of the policy loss type "
                                                          "(e.g. {tau_pos: 1.0} for sapo)")
    rollout_correction: dict = option(default_factory=dict, help="rollout-mismatch correction (TIS/MIS) options of "
                                                                 "fastalign.policy_loss; the sampler's log-probs are "
                                                                 "its rollout log-probs ({}: off)")
    overlong_buffer: int = option(0, "DAPO soft overlong punishment: the last N tokens before max_new_tokens "
                                     "(0: off)", ge=0)
    overlong_penalty: float = option(1.0, "score penalty at max_new_tokens (linear over overlong_buffer)", ge=0)
    mask_truncated: bool = option(False, "leave responses cut at max_new_tokens without EOS out of the loss")
    debug_rollout_logp_noise: float = option(0.0, "debugging: std of Gaussian noise added to each of the sampler's "
                                                  "per-token log-probs (a simulated engine mismatch)", ge=0)
    debug_rollout_logp_bias: float = option(0.0, "debugging: a constant added to each of the sampler's per-token "
                                                 "log-probs (a simulated engine mismatch)")


class CriticFreeAlgorithm(OnlineAlgorithm):
    """Base class of the critic-free online algorithms (not registered)."""

    config_class = CriticFreeConfig

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.check_config()
        self._context = None  # the run's, from make_rollout: the metrics' reductions over ranks

    def check_config(self) -> None:
        """Cross-option checks (ConfigError naming the option), beyond each option's own range."""
        cfg = self.config
        if cfg.loss_type not in loss_types():
            raise ConfigError(f"algo.loss_type must be one of {', '.join(loss_types())}; got {cfg.loss_type!r}")
        if cfg.overlong_buffer > cfg.max_new_tokens:
            raise ConfigError(f"algo.overlong_buffer must be <= algo.max_new_tokens ({cfg.max_new_tokens}), "
                              f"got {cfg.overlong_buffer}")
        for name in ("loss_params", "rollout_correction"):
            if not isinstance(getattr(cfg, name), dict):
                raise ConfigError(f"algo.{name} must be a mapping of options, got {getattr(cfg, name)!r}")
        if cfg.loss_type != "ppo" and (cfg.clip_high is not None or cfg.dual_clip is not None):
            raise ConfigError(f"algo.clip_high / algo.dual_clip belong to the ppo loss; loss_type {cfg.loss_type!r} "
                              "takes its parameters from algo.loss_params")
        taken = {"agg", "global_count", "horizon", "loss_type", "rollout_logprobs", "backend"}
        if cfg.loss_type == "ppo":
            taken |= {"clip_low", "clip_high", "dual_clip"}
        clash = sorted(taken & set(cfg.loss_params))
        if clash:
            raise ConfigError(f"algo.loss_params: {clash} are set by the trainer (algo.clip / clip_high / dual_clip / "
                              "agg for ppo)")
        if cfg.rollout_correction and cfg.old_logps == "sampler":
            raise ConfigError("algo.rollout_correction weighs the trainer's recomputed old log-probs against the "
                              "sampler's; with algo.old_logps: sampler they are the same tensor (every weight 1): "
                              "set algo.old_logps: recompute")
        if (cfg.debug_rollout_logp_noise or cfg.debug_rollout_logp_bias) and not self.sampler_logps_needed():
            raise ConfigError("algo.debug_rollout_logp_noise / _bias perturb the sampler's log-probs, which this "
                              "config does not read: set algo.old_logps: sampler or algo.rollout_correction")
        try:  # the loss parameters and correction options checked by the loss itself, on a dummy batch
            x = torch.zeros(1, 2)
            policy_loss(x, x, x, torch.ones(1, 2, dtype=torch.bool), loss_type=cfg.loss_type,
                        rollout_logprobs=x if cfg.rollout_correction else None,
                        rollout_correction=cfg.rollout_correction or None, **self.loss_kwargs())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"algo.loss_params / algo.rollout_correction for loss_type {cfg.loss_type!r}: {e}") \
                from None

    def uses_model(self, role: str) -> bool:
        return super().uses_model(role) and not (role == "reference" and self.config.beta == 0)

    def sampler_logps_needed(self) -> bool:
        return super().sampler_logps_needed() or bool(self.config.rollout_correction)

    # ---- per-response shaping of the rollout -------------------------------------------------

    def overlong_penalty(self, rollout) -> torch.Tensor:
        """[N] DAPO's soft overlong punishment of each response (0 with overlong_buffer 0)."""
        cfg = self.config
        lengths = torch.tensor([len(r) for r in rollout.response_ids], dtype=torch.float32, device=rollout.mask.device)
        if cfg.overlong_buffer == 0:
            return torch.zeros_like(lengths)
        over = lengths - (cfg.max_new_tokens - cfg.overlong_buffer)
        return (-over / cfg.overlong_buffer * cfg.overlong_penalty).clamp(max=0.0)

    def make_rollout(self, context, micro_batches, seed):
        self._context = context
        rollout = super().make_rollout(context, micro_batches, seed)
        if self.config.overlong_buffer:
            rollout.scores = rollout.scores + self.overlong_penalty(rollout)
        if self.config.debug_rollout_logp_noise or self.config.debug_rollout_logp_bias:
            self.perturb_sampler_logps(rollout, seed)
        return rollout

    def perturb_sampler_logps(self, rollout, seed: int) -> None:
        """The simulated engine mismatch (debug_rollout_logp_noise / _bias): each response's
        sampler log-probs lp_t -> lp_t + bias + noise * z_t, z ~ N(0, 1) drawn in row-major order
        of the response tokens from a generator seeded with the round's seed + _NOISE_SEED_OFFSET
        (deterministic, and not the sampler's own random stream)."""
        cfg = self.config
        if rollout._lps is None:
            raise ConfigError("algo.debug_rollout_logp_noise / _bias need the sampler's log-probs, and this run's "
                              "sampler gave none: set trainer.sampler: fastalign (a model FastSampler supports)")
        # its own stream: the sampler's generator starts from `seed` itself
        g = torch.Generator().manual_seed(seed + _NOISE_SEED_OFFSET)
        rollout._lps = [lp.float().cpu() + cfg.debug_rollout_logp_bias
                        + cfg.debug_rollout_logp_noise * torch.randn(lp.shape, generator=g) for lp in rollout._lps]
        rollout.sampler_logps = R._on_response(rollout.mask, rollout._lps)  # what R.subset rebuilds from, too

    def loss_data(self, rollout) -> dict:
        """The per-token tensors of the rollout the loss reads besides the advantages: loss_mask
        (mask_truncated; MIS) and rollout_logps (rollout_correction)."""
        cfg = self.config
        keep = rollout.mask
        if cfg.mask_truncated:
            keep = keep & ~rollout.truncated_rows[:, None]
        out = {}
        if cfg.rollout_correction:
            if rollout.sampler_logps is None:
                raise ConfigError("algo.rollout_correction needs the sampler's log-probs, and this run's sampler gave "
                                  "none: set trainer.sampler: fastalign (a model FastSampler supports)")
            out["rollout_logps"] = rollout.sampler_logps
            rs = {k: v for k, v in cfg.rollout_correction.items() if k.startswith("rollout_rs")}
            if rs.get("rollout_rs") is not None:
                # MIS here, once per step, not in the loss: its rejected tokens must leave the
                # loss units (counted before any forward) as they leave the loss
                self._mis_base = int(keep.sum())
                keep = RPL.rollout_correction(rollout.old_logps, rollout.sampler_logps, keep, **rs)[1]
        if keep is not rollout.mask:
            out["loss_mask"] = keep
        return out

    def global_mean(self, parts: dict) -> dict:
        """{name: (sum, count)} of this rank -> {name: sum over ranks / count over ranks} (0 for no
        count): a metric of the whole global batch, as one process would compute it."""
        names = sorted(parts)
        if not names:  # the same on every rank (the metrics follow the config): no collective
            return {}
        vals = [float(parts[k][0]) for k in names] + [float(parts[k][1]) for k in names]
        ctx = self._context
        if ctx is not None and ctx.world > 1:
            vals = ctx.all_reduce(vals)
        n = len(names)
        return {k: vals[i] / vals[n + i] if vals[n + i] else 0.0 for i, k in enumerate(names)}

    def rollout_metric_parts(self, rollout, data) -> dict:
        """{metric: (sum, count)} of this rank's rollout, reduced over ranks by step_metrics."""
        out = {}
        if self.config.mask_truncated:
            out["masked_truncated"] = (int(rollout.truncated_rows.sum()), len(rollout))
        if self.config.rollout_correction.get("rollout_rs") is not None:  # the loss's own stat, moved here
            out["rollout_rs_masked_frac"] = (self._mis_base - int(data["loss_mask"].sum()), self._mis_base)
        return out

    def step_metrics(self, rollout, data) -> dict:
        out = super().step_metrics(rollout, data)
        out.update(self.global_mean(self.rollout_metric_parts(rollout, data)))
        return out

    # ---- the loss ------------------------------------------------------------------------------

    @staticmethod
    def _mask(batch) -> torch.Tensor:
        mask = batch["labels"][:, 1:] != C.IGNORE
        return mask & batch["loss_mask"] if "loss_mask" in batch else mask

    def loss_units(self, batch) -> int:
        mask = self._mask(batch)
        return int(mask.sum()) if self.config.agg in _TOKEN_AGGS else int(mask.any(1).sum())

    def _loss_correction(self) -> dict | None:
        """The correction options the loss applies: TIS (MIS is in loss_mask already: loss_data)."""
        c = {k: v for k, v in self.config.rollout_correction.items() if not k.startswith("rollout_rs")}
        return c or None

    def loss_kwargs(self) -> dict:
        """The loss-type parameters: algo.clip / clip_high / dual_clip for ppo, plus loss_params."""
        cfg = self.config
        out = dict(cfg.loss_params)
        if cfg.loss_type == "ppo":
            out.update(clip_low=cfg.clip, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip)
        return out

    def loss(self, models, batch):
        cfg = self.config
        logps, entropy, tokens = token_logps(models["policy"], batch, temperature=cfg.temperature, return_entropy=True,
                                             packed=self.packing, fused_head=self.fused_head)
        mask = tokens & batch["loss_mask"] if "loss_mask" in batch else tokens
        horizon = float(cfg.max_new_tokens) if cfg.agg == "seq-mean-token-sum-norm" else None
        pl, ps = policy_loss(logps, batch["old_logps"], batch["advantages"], mask, loss_type=cfg.loss_type,
                             agg=cfg.agg, global_count=1.0, horizon=horizon,  # the sum over tokens / responses
                             rollout_logprobs=batch.get("rollout_logps"),
                             rollout_correction=self._loss_correction(), **self.loss_kwargs())
        loss = pl
        n_tok = max(int(mask.sum()), 1)
        metrics = {"policy_loss": float(pl.detach()) / max(self.loss_units(batch), 1),
                   "entropy": float((entropy.detach() * tokens).sum()) / max(int(tokens.sum()), 1)}
        metrics.update({k: float(v) for k, v in ps.items()})
        if cfg.beta > 0:
            kl = kl_penalty(logps, batch["ref_logps"], kind=cfg.kl_estimator) * mask
            loss = loss + cfg.beta * self._aggregate_sum(kl, mask, horizon)
            metrics[f"kl_{cfg.kl_estimator}"] = float(kl.detach().sum()) / n_tok
        return loss, metrics

    def _aggregate_sum(self, per_token, mask, horizon):
        """sum over the loss units of per_token [B, T] (0 off mask) aggregated as `agg` does."""
        per = per_token.sum(1)
        if self.config.agg == "seq-mean-token-mean":
            per = per / mask.sum(1).clamp(min=1)
        elif self.config.agg == "seq-mean-token-sum-norm":
            per = per / horizon
        return per.sum()
