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

Log-probabilities and the entropy come from fastalign.gather_logprobs at the sampling
temperature (never a full log_softmax). Every step logs the RLHF monitors of
fastalign.trainer.monitors (reward, KL, entropy, distinct-n, reward-length correlation and, with
an `oracle_fn`, the true score and the over-optimisation flag).

Models (roles): policy and value are trained (one optimizer; vf_coef weighs the value loss),
reference (frozen, the KL anchor) and reward (frozen; not needed with a reward_fn).
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

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


@dataclass
class PPOConfig(AlgorithmConfig):
    temperature: float = option(1.0, "sampling temperature, also used for every log-prob", gt=0)
    max_new_tokens: int = option(32, "response length limit when sampling", ge=1)
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
    clip: float = option(0.2, "policy ratio clip", gt=0, lt=1)
    dual_clip: float | None = option(None, "dual-clip bound c > 1 on negative advantages (None: off)", gt=1)
    vf_clip: float | None = option(0.2, "value clip around the rollout's values (None: unclipped)", gt=0)
    vf_coef: float = option(0.1, "weight of the value loss", ge=0)
    ent_coef: float = option(0.0, "weight of the entropy bonus", ge=0)
    target_kl: float | None = option(None, "stop the epochs early when approx-KL > 1.5 * target_kl", gt=0)


@register_algorithm("ppo")
class PPO(Algorithm):
    """PPO with GAE, a value model, KL-penalised rewards (fixed or adaptive), RLHF monitors."""

    config_class = PPOConfig
    data_kind = "prompts"
    models = ("policy", "reference", "value", "reward")
    trainable = ("policy", "value")

    def __init__(self, config=None, *, reward_fn=None, oracle_fn=None):
        super().__init__(config)
        cfg = self.config
        self.reward_fn, self.oracle_fn = reward_fn, oracle_fn
        if reward_fn is not None:  # a programmatic reward: no reward model
            self.models = tuple(r for r in type(self).models if r != "reward")
        self.kl_coef = float(cfg.kl_coef)
        from fastalign.trainer.monitors import OveroptimisationMonitor

        self.monitor = OveroptimisationMonitor()

    # ---- models -------------------------------------------------------------------------------

    def build_models(self, policy, tokenizer, *, reference=None, seed=0, tiny_kwargs=None, reward=None, value=None):
        """policy / reference from names or paths as usual; the value model is a scalar head on
        `value` (default: the reward model when given, else the policy); the reward model from
        `reward` (a reward-model checkpoint directory) unless a reward_fn is set."""
        from fastalign.models import ScalarHeadModel, load_model

        out = super().build_models(policy, tokenizer, reference=reference, seed=seed, tiny_kwargs=tiny_kwargs)
        if self.reward_fn is None:
            if reward is None:
                raise ConfigError("ppo: needs a reward model (model.reward: a reward-model directory) or a reward_fn")
            out["reward"] = load_model(reward, tokenizer=tokenizer, scalar_head=True, seed=seed, tiny_kwargs=tiny_kwargs)
        v = load_model(value or reward or policy, tokenizer=tokenizer, seed=seed, tiny_kwargs=tiny_kwargs)
        out["value"] = v if isinstance(v, ScalarHeadModel) else ScalarHeadModel(v)
        return out

    # ---- the step -----------------------------------------------------------------------------

    def loss_units(self, batch) -> int:
        return int((batch["labels"][:, 1:] != C.IGNORE).sum())

    def loss(self, models, batch):
        """Summed PPO loss of one rollout micro-batch (see the module docstring)."""
        cfg = self.config
        logps, entropy, mask = token_logps(models["policy"], batch, temperature=cfg.temperature, return_entropy=True)
        pl, ps = op("ppo_policy_loss")(logps, batch["old_logps"], batch["advantages"], mask, clip_low=cfg.clip,
                                       dual_clip=cfg.dual_clip, global_count=1.0)  # global_count 1: the sum
        values = models["value"](batch["input_ids"], batch["attention_mask"])[:, :-1]
        vl, vs = op("ppo_value_loss")(values, batch["old_values"], batch["returns"], mask, clip=cfg.vf_clip,
                                      global_count=1.0)
        ent = (entropy * mask).sum()
        loss = pl + cfg.vf_coef * vl - cfg.ent_coef * ent
        n = max(int(mask.sum()), 1)
        metrics = {"policy_loss": float(pl.detach()) / n, "value_loss": float(vl.detach()) / n,
                   "entropy": float(ent.detach()) / n, "clipfrac": float(ps["clipfrac"]),
                   "approx_kl": float(ps["approx_kl"]), "vf_clipfrac": float(vs["vf_clipfrac"])}
        return loss, metrics

    def train_step(self, trainer, micro_batches) -> dict:
        cfg = self.config
        prompts = [r["prompt"] for mb in micro_batches for r in mb["records"]]
        rollout = R.sample(trainer, prompts, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                           seed=R.step_seed(trainer))
        b, mask = rollout.batch, rollout.mask
        score = R.scores(trainer, rollout, self.reward_fn)
        old_logps, entropy = R.logps_of(trainer, trainer.models["policy"], b, cfg.temperature, entropy=True)
        ref_logps = R.logps_of(trainer, trainer.models["reference"], b, cfg.temperature)
        with torch.no_grad(), trainer.autocast():
            old_values = trainer.models["value"](b["input_ids"], b["attention_mask"])[:, :-1].float()
        old_values = old_values * mask
        kl = op("kl_penalty")(old_logps, ref_logps, kind=cfg.kl_estimator) * mask
        clipped = score.clamp(-cfg.score_clip, cfg.score_clip) if cfg.score_clip else score
        rewards = -self.kl_coef * kl
        rows = torch.arange(len(rollout), device=mask.device)
        rewards[rows, R.last_positions(mask)] += clipped
        adv, returns = op("gae")(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = op("masked_whiten")(adv, mask) * mask
        data = {**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}, "old_logps": old_logps,
                "old_values": old_values, "advantages": adv, "returns": returns}

        # ---- optimisation: epochs x mini-batches, one optimizer step each ----
        metrics, steps, stopped = R.optimize_epochs(trainer, self, data, len(rollout), seed=R.step_seed(trainer) + 1)
        seq_kl = (old_logps - ref_logps).mul(mask).sum(1)  # k1 per response: the KL the monitors report
        metrics.update(self._rollout_metrics(score, seq_kl, mask, adv, returns, old_values))
        metrics.update(R.rollout_monitors(trainer, rollout, score, kl=seq_kl,
                                          entropy=R.response_mean(entropy, mask),
                                          oracle_fn=self.oracle_fn, monitor=self.monitor))
        metrics.update(kl_coef=self.kl_coef, optimizer_steps=steps, early_stopped=float(stopped))
        self._update_kl_coef(float(seq_kl.mean()), len(rollout))
        return metrics

    @staticmethod
    def _rollout_metrics(score, seq_kl, mask, adv, returns, values) -> dict:
        m = mask.float()
        n = m.sum().clamp(min=1)
        var_r = ((returns - (returns * m).sum() / n) ** 2 * m).sum() / n
        var_e = ((returns - values) ** 2 * m).sum() / n
        return {"score": float(score.mean()), "score_std": float(score.std()) if score.numel() > 1 else 0.0,
                "seq_kl": float(seq_kl.mean()),
                "explained_variance": float(1 - var_e / var_r) if var_r > 0 else 0.0}

    def _update_kl_coef(self, kl: float, n: int) -> None:
        cfg = self.config
        if cfg.adaptive_kl:
            err = max(-0.2, min(0.2, kl / cfg.kl_target - 1.0))
            self.kl_coef *= 1.0 + err * n / cfg.kl_horizon

    # ---- evaluation and state -------------------------------------------------------------------

    def setup(self, trainer) -> None:
        self._trainer = trainer  # eval_step samples through it

    @torch.no_grad()
    def eval_step(self, models, batch):
        return R.eval_rollout(self, batch)

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef, "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "kl_coef" in state:
            self.kl_coef = float(state["kl_coef"])
        if "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])
