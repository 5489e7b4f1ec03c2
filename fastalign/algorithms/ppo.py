"""PPO for RLHF (the InstructGPT recipe: Ziegler et al. 2019, Ouyang et al. 2022), from the
fastalign kernels.

One trainer step:
  1. rollout: sample a response to each prompt of the batch at `temperature` (seeded by the
     step, so a resumed run samples the same);
  2. score it: the reward model's score of prompt + response, or `reward_fn(prompt, response)`;
  3. per-token rewards r_t = -kl_coef * KL_t on the response tokens (KL_t = kl_penalty(k1|k3|...)
     of the old policy against the frozen reference), plus the score at the last response token
     (clipped to +-score_clip when set);
  4. advantages and returns by `gae` over the response tokens (old values from the value model),
     advantages whitened over the batch (`masked_whiten`);
  5. `ppo_epochs` passes over `mini_batches` shuffled mini-batches, one optimizer step each
     (trainer.optimize, micro-batches of trainer batch_size rows with global token
     normalisation): ppo_policy_loss + vf_coef * ppo_value_loss - ent_coef * entropy, all summed
     over the mini-batch's response tokens and divided by their count; stops early when the
     approximate KL to the rollout policy exceeds 1.5 * target_kl (measured by a mini-batch's own
     loss, before its optimizer step, which is still applied: the remaining ones are skipped);
  6. the KL coefficient adapts (`adaptive_kl`, Ziegler et al.'s proportional controller:
     coef *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * N / kl_horizon).

Steps 1, 2 and 5 and the monitors are OnlineAlgorithm's (online.py); this file is the value
model, the KL-penalised rewards and GAE (`advantages`), the loss and the KL controller.
Log-probabilities and the entropy come from fastalign.gather_logprobs at the sampling
temperature (never a full log_softmax). Every step logs the RLHF monitors of
fastalign.algorithms.monitors (reward, KL, entropy, distinct-n, reward-length correlation and, with
an `oracle_fn`, the true score and the over-optimisation flag).

Models (roles): policy and value are trained (one optimizer; vf_coef weighs the value loss),
reference (frozen, the KL anchor) and reward (frozen; not needed with a reward_fn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.algorithms import _rollout as R
from fastalign.algorithms.base import token_logps
from fastalign.algorithms.online import OnlineAlgorithm, OnlineConfig
from fastalign.algorithms.registry import register_algorithm
from fastalign.data import collate as C
from fastalign.models import ScalarHeadModel, load_model
from fastalign.ops.gae import gae
from fastalign.ops.kl import kl_penalty, masked_whiten
from fastalign.ops.ppo import ppo_policy_loss, ppo_value_loss
from fastalign.options import option

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


@dataclass
class PPOConfig(OnlineConfig):
    kl_coef: float = option(0.05, "beta of r_t = -beta * KL_t (the initial value when adaptive)", ge=0)
    kl_estimator: str = option("k1", "k1 (unbiased), k3 (low variance), k2, abs: see fastalign.kl_penalty",
                               choices=KL_ESTIMATORS)
    adaptive_kl: bool = option(False, "Ziegler et al.'s proportional controller of kl_coef towards kl_target")
    kl_target: float = option(6.0, "nats per response, for the adaptive controller", gt=0)
    kl_horizon: int = option(10000, "samples, for the adaptive controller", gt=0)
    score_clip: float | None = option(None, "clip reward-model scores to [-score_clip, score_clip]", gt=0)
    gamma: float = option(1.0, "discount of GAE", ge=0, le=1)
    lam: float = option(0.95, "lambda of GAE", ge=0, le=1)
    whiten_advantages: bool = option(True, "whiten advantages over the batch's valid tokens")
    ppo_epochs: int = option(4, "passes over each rollout batch", ge=1)
    mini_batches: int = option(4, "optimizer steps per epoch", ge=1)
    dual_clip: float | None = option(None, "dual-clip bound c > 1 on negative advantages (None: off)", gt=1)
    vf_clip: float | None = option(0.2, "value clip around the rollout's values (None: unclipped)", gt=0)
    vf_coef: float = option(0.1, "weight of the value loss", ge=0)
    ent_coef: float = option(0.0, "weight of the entropy bonus", ge=0)


@register_algorithm("ppo")
class PPO(OnlineAlgorithm):
    """PPO with GAE, a value model, KL-penalised rewards (fixed or adaptive), RLHF monitors."""

    config_class = PPOConfig
    models = ("policy", "reference", "value", "reward")
    trainable = ("policy", "value")

    def __init__(self, config=None, *, reward_fn=None, oracle_fn=None):
        super().__init__(config, reward_fn=reward_fn, oracle_fn=oracle_fn)
        self.kl_coef = float(self.config.kl_coef)

    def build_models(self, policy, tokenizer, *, reference=None, seed=0, tiny_kwargs=None, reward=None, value=None):
        """policy / reference / reward as OnlineAlgorithm's; the value model is a scalar head on
        `value` (default: the reward model when given, else the policy)."""
        out = super().build_models(policy, tokenizer, reference=reference, seed=seed, tiny_kwargs=tiny_kwargs,
                                   reward=reward)
        v = load_model(value or reward or policy, tokenizer=tokenizer, seed=seed, tiny_kwargs=tiny_kwargs)
        out["value"] = v if isinstance(v, ScalarHeadModel) else ScalarHeadModel(v)
        return out

    # ---- advantages: KL-penalised rewards, GAE on the value model's estimates ---------------------

    def advantages(self, context, rollout):
        cfg = self.config
        b, mask = rollout.batch, rollout.mask
        with torch.no_grad(), context.autocast():
            old_values = context.models["value"](b["input_ids"], b["attention_mask"], packed=self.packing)[:, :-1].float()
        old_values = old_values * mask
        kl = kl_penalty(rollout.old_logps, rollout.ref_logps, kind=cfg.kl_estimator) * mask
        score = rollout.scores
        clipped = score.clamp(-cfg.score_clip, cfg.score_clip) if cfg.score_clip else score
        rewards = -self.kl_coef * kl
        rows = torch.arange(len(rollout), device=mask.device)
        rewards[rows, R.last_positions(mask)] += clipped
        adv, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, mask) * mask
        return {"old_values": old_values, "advantages": adv, "returns": returns}

    # ---- the loss -------------------------------------------------------------------------------

    def loss_units(self, batch) -> int:
        return int((batch["labels"][:, 1:] != C.IGNORE).sum())

    def loss(self, models, batch):
        """Summed PPO loss of one rollout micro-batch (see the module docstring)."""
        cfg = self.config
        logps, entropy, mask = token_logps(models["policy"], batch, temperature=cfg.temperature, return_entropy=True,
                                           packed=self.packing, fused_head=self.fused_head)
        pl, ps = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip_low=cfg.clip,
                                 dual_clip=cfg.dual_clip, global_count=1.0)  # global_count 1: the sum
        values = models["value"](batch["input_ids"], batch["attention_mask"], packed=self.packing)[:, :-1]
        vl, vs = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, clip=cfg.vf_clip,
                                global_count=1.0)
        ent = (entropy * mask).sum()
        loss = pl + cfg.vf_coef * vl - cfg.ent_coef * ent
        n = max(int(mask.sum()), 1)
        metrics = {"policy_loss": float(pl.detach()) / n, "value_loss": float(vl.detach()) / n,
                   "entropy": float(ent.detach()) / n, "clipfrac": float(ps["clipfrac"]),
                   "approx_kl": float(ps["approx_kl"]), "vf_clipfrac": float(vs["vf_clipfrac"])}
        return loss, metrics

    # ---- metrics, the KL controller, state ------------------------------------------------------

    def step_metrics(self, rollout, data) -> dict:
        m = rollout.mask.float()
        score, returns, values = rollout.scores, data["returns"], data["old_values"]
        n = m.sum().clamp(min=1)
        var_r = ((returns - (returns * m).sum() / n) ** 2 * m).sum() / n
        var_e = ((returns - values) ** 2 * m).sum() / n
        return {"score": float(score.mean()), "score_std": float(score.std()) if score.numel() > 1 else 0.0,
                "seq_kl": float(rollout.seq_kl.mean()),
                "explained_variance": float(1 - var_e / var_r) if var_r > 0 else 0.0, "kl_coef": self.kl_coef}

    def end_step(self, rollout) -> None:
        self._update_kl_coef(float(rollout.seq_kl.mean()), len(rollout))

    def _update_kl_coef(self, kl: float, n: int) -> None:
        cfg = self.config
        if cfg.adaptive_kl:
            err = max(-0.2, min(0.2, kl / cfg.kl_target - 1.0))
            self.kl_coef *= 1.0 + err * n / cfg.kl_horizon

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef, **super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "kl_coef" in state:
            self.kl_coef = float(state["kl_coef"])
