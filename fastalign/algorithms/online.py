"""The base class of the online RL algorithms: one trainer step is

    sample -> score -> log-probs -> advantages -> optimise (epochs x mini-batches) -> monitors

of which this class owns everything but the two choices that make an algorithm:
`advantages(context, rollout)` (the per-token tensors the loss reads) and `loss(models, batch)`
(+ `loss_units`), plus its config. PPO (ppo.py) adds a value model and GAE; the critic-free
family (critic_free.py: GRPO, and a new algorithm in ~30 lines, see docs/algorithms.md) shares
one clipped policy loss and differs only in its advantages.

In detail, `train_step(context, micro_batches)`:
  1. samples `samples_per_prompt` responses to each prompt of the step at `temperature` from
     the policy (seeded by the run's seed and step: a resumed run samples the same);
  2. scores them: `reward_fn(prompt, response)`, or the reward model's score of prompt + response;
     non-finite scores stop the run before any update (TrainingDivergedError);
  3. fills the Rollout (fastalign/algorithms/_rollout.py) with the scores, the sampling policy's
     per-token log-probs and entropy (a no-grad forward, or with `old_logps: sampler` the ones
     the sampler computed while sampling, from the same weights) and, when a reference model is given, its log-probs and the
     per-response KL estimate sum(logp - ref);
  4. calls `advantages`, and optimises `loss` over input_ids / attention_mask / labels /
     old_logps (/ ref_logps) + what advantages returned: `ppo_epochs` passes of `mini_batches`
     seeded mini-batches, one context.optimize each, stopping early past 1.5 * target_kl;
  5. returns the optimiser's metrics (averaged over its steps), `step_metrics(rollout, data)`,
     optimizer_steps, early_stopped and the RLHF monitors (monitors.py; with an
     `oracle_fn`, the true score and the over-optimisation flag), then calls `end_step(rollout)`.

Evaluation samples one response per eval prompt with a fixed seed and reports its score (and
the oracle's). The over-optimisation monitor's state is checkpointed.

Models (roles): policy (trained), reference (frozen) and reward (frozen; not with a reward_fn);
subclasses add theirs (PPO's value model) or drop one (`uses_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.algorithms import _rollout as R
from fastalign.algorithms.base import Algorithm, AlgorithmConfig
from fastalign.algorithms.monitors import OveroptimisationMonitor
from fastalign.errors import ConfigError
from fastalign.models import load_model
from fastalign.options import option


@dataclass
class OnlineConfig(AlgorithmConfig):
    temperature: float = option(1.0, "sampling temperature, also used for every log-prob", gt=0)
    max_new_tokens: int = option(32, "response length limit when sampling", ge=1)
    ppo_epochs: int = option(1, "passes over each rollout batch", ge=1)
    mini_batches: int = option(1, "optimizer steps per epoch", ge=1)
    micro_batch_size: int | None = option(None, "rollout rows per forward/backward in the update (gradients "
                                                "accumulate over a mini-batch's micro-batches); default: "
                                                "trainer.batch_size", ge=1)
    clip: float = option(0.2, "policy ratio clip", gt=0, lt=1)
    target_kl: float | None = option(None, "stop the epochs early when approx-KL > 1.5 * target_kl", gt=0)
    old_logps: str = option("recompute", "the sampling policy's log-probs: recompute (a no-grad forward of the "
                                         "policy in the run's precision) or sampler (the ones the sampler "
                                         "computed while sampling; needs trainer.sampler fastalign/auto on a "
                                         "supported model, else recomputed)", choices=("recompute", "sampler"))


class OnlineAlgorithm(Algorithm):
    """Base class of the online algorithms (not registered)."""

    config_class = OnlineConfig
    data_kind = "prompts"
    models = ("policy", "reference", "reward")
    trainable = ("policy",)

    def __init__(self, config=None, *, reward_fn=None, oracle_fn=None):
        super().__init__(config)
        self.reward_fn, self.oracle_fn = reward_fn, oracle_fn
        self.models = tuple(r for r in type(self).models if self.uses_model(r))
        self.monitor = OveroptimisationMonitor()

    def uses_model(self, role: str) -> bool:
        """Whether this configuration needs `role` (no reward model with a reward_fn)."""
        return not (role == "reward" and self.reward_fn is not None)

    @property
    def samples_per_prompt(self) -> int:
        return 1

    def build_models(self, policy, tokenizer, *, reference=None, seed=0, tiny_kwargs=None, reward=None):
        """policy / reference as usual; the reward model from `reward` (a reward-model checkpoint
        directory) unless a reward_fn is set."""
        out = super().build_models(policy, tokenizer, reference=reference, seed=seed, tiny_kwargs=tiny_kwargs)
        if "reward" in self.models:
            if reward is None:
                raise ConfigError(f"{self.name}: needs a reward model (model.reward: a reward-model directory) "
                                  "or a reward_fn")
            out["reward"] = load_model(reward, tokenizer=tokenizer, scalar_head=True, seed=seed, tiny_kwargs=tiny_kwargs)
        return out

    # ---- what a subclass chooses ----------------------------------------------------------------

    def advantages(self, context, rollout: R.Rollout) -> dict:
        """{name: [N, L-1] tensor} the loss reads besides old_logps / ref_logps: at least
        "advantages" (0 off the response)."""
        raise NotImplementedError

    def loss_data(self, rollout: R.Rollout) -> dict:
        """{name: [N, L-1] tensor} more per-token tensors for the loss, besides the advantages
        (the critic-free family: loss_mask, rollout_logps)."""
        return {}

    def step_metrics(self, rollout: R.Rollout, data: dict) -> dict:
        """Metrics of this step's rollout, logged beside the optimiser's."""
        return {"score": float(rollout.scores.mean())}

    def end_step(self, rollout: R.Rollout) -> None:
        """After the step (e.g. PPO's adaptive KL coefficient)."""

    # ---- the step -------------------------------------------------------------------------------

    def sampler_logps_needed(self) -> bool:
        """Whether the step keeps the sampler's own log-probs (algo.old_logps: sampler; the
        critic-free family's rollout correction also needs them)."""
        return self.config.old_logps == "sampler"

    def make_rollout(self, context, micro_batches, seed: int) -> R.Rollout:
        """The step's scored rollout: `samples_per_prompt` responses to each prompt of the
        micro-batches, sampled and scored (a subclass may sample more: dynamic sampling)."""
        cfg = self.config
        k = self.samples_per_prompt
        prompts = [r["prompt"] for mb in micro_batches for r in mb["records"] for _ in range(k)]
        rollout = R.sample(context, prompts, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seed,
                           with_logprobs=self.sampler_logps_needed())
        rollout.scores = R.scores(context, rollout, self.reward_fn, packed=self.packing)
        return rollout

    def train_step(self, context, micro_batches) -> dict:
        cfg = self.config
        seed = R.step_seed(context)
        rollout = self.make_rollout(context, micro_batches, seed)
        b, mask = rollout.batch, rollout.mask
        if cfg.old_logps == "sampler" and rollout.sampler_logps is not None:  # the same weights sampled: no second forward
            rollout.old_logps, rollout.entropy = rollout.sampler_logps, rollout.sampler_entropy
        else:
            rollout.old_logps, rollout.entropy = R.logps_of(context, context.models["policy"], b, cfg.temperature,
                                                            entropy=True, packed=self.packing, fused_head=self.fused_head)
        data = {**{key: b[key] for key in ("input_ids", "attention_mask", "labels")}, "old_logps": rollout.old_logps}
        if "reference" in context.models:
            rollout.ref_logps = data["ref_logps"] = R.logps_of(context, context.models["reference"], b, cfg.temperature,
                                                                    packed=self.packing, fused_head=self.fused_head)
            rollout.seq_kl = (rollout.old_logps - rollout.ref_logps).mul(mask).sum(1)  # k1 per response
        data.update(self.advantages(context, rollout))
        data.update(self.loss_data(rollout))

        metrics, steps, stopped = R.optimize_epochs(context, self, data, len(rollout), seed=seed + 1)
        metrics.update(self.step_metrics(rollout, data))
        metrics.update(optimizer_steps=steps, early_stopped=float(stopped))
        metrics.update(R.rollout_monitors(context, rollout, rollout.scores, kl=rollout.seq_kl,
                                          entropy=R.response_mean(rollout.entropy, mask),
                                          oracle_fn=self.oracle_fn, monitor=self.monitor))
        self.end_step(rollout)
        return metrics

    # ---- evaluation and state -------------------------------------------------------------------

    @torch.no_grad()
    def eval_step(self, context, batch):
        return R.eval_rollout(self, context, batch)

    def state_dict(self) -> dict:
        return {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])
