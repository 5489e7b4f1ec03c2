"""GRPO (Shao et al. 2024, DeepSeekMath): PPO without a value model. Each prompt is sampled
`group_size` times; a response's advantage is its score standardised within its group
(`fastalign.group_advantages`), the same for all its tokens. The loss is the clipped surrogate
(`ppo_policy_loss`) plus, with beta > 0, beta times the k3 estimate of KL(pi || ref) per token
(the DeepSeekMath form; gradients flow through it). `ppo_epochs` x `mini_batches` optimizer
steps per rollout, as in ppo (1 x 1: the on-policy case, where the ratio is 1 and the clip is
inactive). agg "token-mean" normalises by all response tokens of the batch (DAPO / Dr. GRPO);
"seq-mean-token-mean" averages per response first (the original GRPO).

Monitors as in ppo (fastalign.trainer.monitors). Models: policy (trained), reference (frozen;
only with beta > 0) and reward (frozen; not with a reward_fn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.algorithms import _rollout as R
from fastalign.algorithms._ops import op
from fastalign.algorithms.base import Algorithm, AlgorithmConfig, token_logps
from fastalign.algorithms.registry import register_algorithm
from fastalign.errors import ConfigError
from fastalign.options import option
from fastalign.data import collate as C

AGGS = ("token-mean", "seq-mean-token-mean")


@dataclass
class GRPOConfig(AlgorithmConfig):
    group_size: int = option(8, "samples per prompt (a group of one has no baseline)", ge=2)
    temperature: float = option(1.0, "sampling temperature, also used for every log-prob", gt=0)
    max_new_tokens: int = option(32, "response length limit when sampling", ge=1)
    beta: float = option(0.04, "weight of the k3 KL to the reference (0: no reference model)", ge=0)
    scale: str = option("group", "advantage scaling: group, batch or none (Dr. GRPO)", choices=("group", "batch", "none"))
    agg: str = option("token-mean", "loss aggregation", choices=AGGS)
    ppo_epochs: int = option(1, "passes over each rollout batch", ge=1)
    mini_batches: int = option(1, "optimizer steps per epoch", ge=1)
    clip: float = option(0.2, "policy ratio clip", gt=0, lt=1)
    target_kl: float | None = option(None, "stop the epochs early when approx-KL > 1.5 * target_kl", gt=0)


@register_algorithm("grpo")
class GRPO(Algorithm):
    """Group-relative policy optimisation: group-normalised advantages, clipped loss, optional k3 KL."""

    config_class = GRPOConfig
    data_kind = "prompts"
    models = ("policy", "reference", "reward")
    trainable = ("policy",)

    def __init__(self, config=None, *, reward_fn=None, oracle_fn=None):
        super().__init__(config)
        cfg = self.config
        self.reward_fn, self.oracle_fn = reward_fn, oracle_fn
        self.models = tuple(r for r in type(self).models
                            if not (r == "reward" and reward_fn is not None) and not (r == "reference" and cfg.beta == 0))
        from fastalign.trainer.monitors import OveroptimisationMonitor

        self.monitor = OveroptimisationMonitor()

    def build_models(self, policy, tokenizer, *, reference=None, seed=0, tiny_kwargs=None, reward=None):
        from fastalign.models import load_model

        out = super().build_models(policy, tokenizer, reference=reference, seed=seed, tiny_kwargs=tiny_kwargs)
        if "reference" not in self.models:
            out.pop("reference", None)
        if "reward" in self.models:
            if reward is None:
                raise ConfigError("grpo: needs a reward model (model.reward: a reward-model directory) or a reward_fn")
            out["reward"] = load_model(reward, tokenizer=tokenizer, scalar_head=True, seed=seed, tiny_kwargs=tiny_kwargs)
        return out

    def setup(self, trainer) -> None:
        self._trainer = trainer

    # ---- the step -------------------------------------------------------------------------------

    def loss_units(self, batch) -> int:
        mask = batch["labels"][:, 1:] != C.IGNORE
        return int(mask.sum()) if self.config.agg == "token-mean" else int(mask.any(1).sum())

    def loss(self, models, batch):
        cfg = self.config
        logps, entropy, mask = token_logps(models["policy"], batch, temperature=cfg.temperature, return_entropy=True)
        pl, ps = op("ppo_policy_loss")(logps, batch["old_logps"], batch["advantages"], mask, clip_low=cfg.clip,
                                       agg=cfg.agg, global_count=1.0)  # the sum over tokens / responses
        loss = pl
        metrics = {"policy_loss": float(pl.detach()) / max(self.loss_units(batch), 1),
                   "clipfrac": float(ps["clipfrac"]), "approx_kl": float(ps["approx_kl"]),
                   "entropy": float((entropy.detach() * mask).sum()) / max(int(mask.sum()), 1)}
        if cfg.beta > 0:
            k3 = op("kl_penalty")(logps, batch["ref_logps"], kind="k3") * mask
            per = k3.sum(1) if cfg.agg == "token-mean" else k3.sum(1) / mask.sum(1).clamp(min=1)
            loss = loss + cfg.beta * per.sum()
            metrics["kl_k3"] = float(k3.detach().sum()) / max(int(mask.sum()), 1)
        return loss, metrics

    def train_step(self, trainer, micro_batches) -> dict:
        cfg = self.config
        g = int(cfg.group_size)
        prompts = [r["prompt"] for mb in micro_batches for r in mb["records"] for _ in range(g)]
        seed = R.step_seed(trainer)
        rollout = R.sample(trainer, prompts, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seed)
        b, mask = rollout.batch, rollout.mask
        score = R.scores(trainer, rollout, self.reward_fn)
        adv = op("group_advantages")(score, g, scale=cfg.scale)[:, None] * mask
        old_logps, entropy = R.logps_of(trainer, trainer.models["policy"], b, cfg.temperature, entropy=True)
        data = {**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}, "old_logps": old_logps,
                "advantages": adv}
        seq_kl = None
        if "reference" in trainer.models:
            data["ref_logps"] = R.logps_of(trainer, trainer.models["reference"], b, cfg.temperature)
            seq_kl = (old_logps - data["ref_logps"]).mul(mask).sum(1)
        metrics, steps, stopped = R.optimize_epochs(trainer, self, data, len(rollout), seed=seed + 1)
        groups = score.view(-1, g)
        metrics.update(score=float(score.mean()), optimizer_steps=steps, early_stopped=float(stopped),
                       # groups whose samples all scored the same carry no learning signal
                       zero_std_groups=float((groups.std(1) == 0).float().mean()))
        metrics.update(R.rollout_monitors(trainer, rollout, score, kl=seq_kl,
                                          entropy=R.response_mean(entropy, mask),
                                          oracle_fn=self.oracle_fn, monitor=self.monitor))
        return metrics

    @torch.no_grad()
    def eval_step(self, models, batch):
        return R.eval_rollout(self, batch)

    def state_dict(self) -> dict:
        return {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])
