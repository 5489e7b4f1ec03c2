"""Online DPO with AI feedback (Guo et al. 2024, "Direct Language Model Alignment from Online AI
Feedback"; TRL's OnlineDPOTrainer): the preference pairs come from the policy being trained.

One trainer step:
  1. samples two responses to each prompt of the step from the current policy (the online
     algorithms' sampler, fastalign/algorithms/_rollout.py: seeded by the run's seed and step, so
     a resumed run samples the same);
  2. a judge (judges.py: the synthetic oracle with its biases, a reward model, a judge_fn, or an
     LLM judge) picks the better one of each pair. Pairs are dropped when
       * the two responses are the same text, or the judge has no preference (ties),
       * with algo.truncated = prefer_complete (the default), both were cut at max_new_tokens
         without EOS (both invalid); when only one was cut, the complete one is chosen without
         asking the judge (TRL's missing_eos_penalty, taken to its limit);
     the counts are logged (pairs/ties, pairs/both_invalid, pairs/one_invalid, pairs/kept);
  3. the kept (chosen, rejected) rows are scored once by the frozen reference (a reference model,
     or with model.peft the policy with its adapters disabled, as DPO);
  4. DPO on them: `epochs` passes of `mini_batches` seeded mini-batches of pairs, one
     context.optimize each; the loss is fastalign.dpo_loss_from_tokens (any DPO loss type of
     fastalign.dpo_loss, registered ones included; ipo on length-averaged log-probs, as TRL and
     the offline DPO algorithm). Log-probs are the policy's own (temperature 1, as TRL's online
     DPO and the offline DPO), whatever the sampling temperature.

Metrics: DPO's (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected), the pair counts, judge/oracle_agreement (the fraction of kept
pairs whose chosen response the unbiased oracle_fn also prefers, over the pairs it does not
tie; with an oracle_fn), judge/chose_longer (the fraction of kept pairs of unequal length whose
chosen response is the longer), judge/score (the judge's per-response score where it has one),
and the RLHF monitors of monitors.py on the sampled responses (rollout/length, distinct-n,
truncated; rollout/length_corr: the correlation of the judge's pick -- 1 chosen, 0 rejected,
1/2 dropped -- with response length; rollout/oracle with an oracle_fn), plus the length-drift
flag (`length_drift`, monitors.LengthDriftMonitor, checkpointed).

With the oracle judge and no oracle_fn given, the oracle_fn is the unbiased Oracle.score (the
oracle judge only applies to the synthetic task). Evaluation samples one response per eval
prompt with a fixed seed and reports its length, its oracle score (with an oracle_fn) and its
reward-model score (with the reward-model judge). Single process only for now: the pairs a
rank keeps differ, and the trainer's collectives need equal micro-batch counts on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign.algorithms import _rollout as R
from fastalign.algorithms import judges as J
from fastalign.algorithms.base import Algorithm, AlgorithmConfig, token_logps
from fastalign.algorithms.monitors import LengthDriftMonitor
from fastalign.algorithms.registry import register_algorithm
from fastalign.data.synthetic import Oracle
from fastalign.errors import ConfigError
from fastalign.models import load_model
from fastalign.ops import preference
from fastalign.options import option

# the offset of the judge's seed from the step's sampling seed (+1 seeds the mini-batch order)
JUDGE_SEED_OFFSET = 2


@dataclass
class OnlineDPOConfig(AlgorithmConfig):
    temperature: float = option(1.0, "sampling temperature of the two responses", gt=0)
    max_new_tokens: int = option(32, "response length limit when sampling", ge=1)
    epochs: int = option(1, "passes over each step's pairs", ge=1)
    mini_batches: int = option(1, "optimizer steps per epoch", ge=1)
    micro_batch_size: int | None = option(None, "pairs per forward/backward (gradients accumulate over a "
                                                "mini-batch); default: trainer.batch_size", ge=1)
    beta: float = option(0.1, "DPO's beta: strength of the implicit KL to the reference", gt=0)
    loss_type: str = option("sigmoid", "a fastalign.dpo_loss type (sigmoid, ipo, hinge, robust, ... or registered)")
    label_smoothing: float = option(0.0, "DPO label smoothing (conservative DPO / robust)", ge=0, lt=0.5)
    judge: str = option("oracle", "who picks the better response: oracle (the synthetic task's), reward_model "
                                  "(model.reward), fn (algo.judge_fn) or llm (a model prompted with "
                                  "algo.judge_template)", choices=J.JUDGES)
    judge_fn: str | None = option(None, "judge fn: a registered name (longer) or package.module:function, "
                                        "(prompt, a, b) -> 0 | 1 | None")
    judge_model: str = option("judge", "llm judge: the model that judges -- judge (model.judge, frozen), "
                                       "reference or policy (the model being trained: self-rewarding)",
                              choices=("judge", "reference", "policy"))
    judge_template: str = option(J.DEFAULT_TEMPLATE, "llm judge: the question, with {prompt}, {a} and {b}")
    judge_labels: list = option(default_factory=lambda: ["A", "B"], help="llm judge: the answers naming the "
                                                                          "first / second response")
    judge_min_margin: float = option(0.0, "llm judge: |margin| (log-prob units) at or below which a pair is a tie",
                                     ge=0)
    oracle_noise: float = option(0.0, "oracle judge: fraction of preferences flipped", ge=0, le=1)
    oracle_length_bias: float = option(0.0, "oracle judge: utility bonus per response item (verbosity bias)")
    oracle_style_bias: float = option(0.0, "oracle judge: utility bonus for a response ending in '!'")
    truncated: str = option("prefer_complete", "responses cut at max_new_tokens without EOS: prefer_complete "
                                               "(a complete response beats a cut one; two cut ones are dropped) "
                                               "or judge (the judge decides)", choices=("prefer_complete", "judge"))


@register_algorithm("online_dpo")
class OnlineDPO(Algorithm):
    """Online DPO: two samples per prompt, a judge (oracle, reward model, judge_fn, LLM) picks, DPO step."""

    config_class = OnlineDPOConfig
    data_kind = "prompts"
    models = ("policy", "reference", "reward", "judge")
    trainable = ("policy",)

    def __init__(self, config=None, *, judge_fn=None, oracle_fn=None):
        super().__init__(config)
        cfg = self.config
        try:  # the loss type and its options, checked by the op itself on a dummy pair
            z = torch.zeros(2, 1)
            preference.dpo_loss_from_tokens(z, z, torch.ones(2, 1, dtype=torch.bool), beta=cfg.beta,
                                            loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"algo.loss_type {cfg.loss_type!r}: {e}") from None
        if cfg.judge != "fn" and (judge_fn is not None or cfg.judge_fn):
            raise ConfigError(f"algo.judge_fn / judge_fn is for algo.judge: fn, but algo.judge is {cfg.judge!r}")
        self.judge = J.build_judge(cfg, judge_fn)
        self.oracle_fn = oracle_fn if oracle_fn is not None or cfg.judge != "oracle" else Oracle.score
        self.models = tuple(r for r in type(self).models if self.uses_model(r))
        self.length_monitor = LengthDriftMonitor()

    def uses_model(self, role: str) -> bool:
        """The reward model with the reward-model judge, model.judge with the llm judge reading it."""
        return role in ("policy", "reference") or role == self.judge.role

    @property
    def average_log_prob(self) -> bool:
        return self.config.loss_type == "ipo"  # IPO on length-averaged log-probs, as TRL and dpo.py

    def build_models(self, policy, tokenizer, *, reference=None, seed=0, tiny_kwargs=None, reward=None, judge=None):
        out = super().build_models(policy, tokenizer, reference=reference, seed=seed, tiny_kwargs=tiny_kwargs)
        if "reward" in self.models:
            if reward is None:
                raise ConfigError("online_dpo: algo.judge reward_model needs model.reward (a reward-model directory)")
            out["reward"] = load_model(reward, tokenizer=tokenizer, scalar_head=True, seed=seed,
                                       tiny_kwargs=tiny_kwargs)
        if "judge" in self.models:
            if judge is None:
                raise ConfigError("online_dpo: algo.judge llm with algo.judge_model judge needs model.judge (a "
                                  "causal LM), or algo.judge_model reference / policy")
            out["judge"] = load_model(judge, tokenizer=tokenizer, seed=seed, tiny_kwargs=tiny_kwargs)
        return out

    def setup(self, context) -> None:
        if context.world > 1:
            raise ConfigError("online_dpo runs in one process for now (each rank would keep a different number of "
                              "pairs); run it without torchrun")
        if isinstance(self.judge, J.RewardModelJudge):
            self.judge.packed = self.packing

    # ---- the step -------------------------------------------------------------------------------

    def judge_pairs(self, context, rollout: R.Rollout, seed: int) -> tuple[list, dict, torch.Tensor | None]:
        """(choice per pair: 0 | 1 | None, the pair counts, the judge's scores [pairs, 2] or None) of
        the rollout's pairs (rows 2i, 2i + 1)."""
        n = len(rollout) // 2
        prompts, a, b = rollout.prompts[0::2], rollout.texts[0::2], rollout.texts[1::2]
        cut = rollout.truncated_rows.view(n, 2).tolist()
        choices, ask = [None] * n, []
        counts = {"pairs/ties": 0, "pairs/both_invalid": 0, "pairs/one_invalid": 0}
        for i in range(n):
            if self.config.truncated == "prefer_complete" and any(cut[i]):
                if all(cut[i]):
                    counts["pairs/both_invalid"] += 1
                else:
                    counts["pairs/one_invalid"] += 1
                    choices[i] = 1 if cut[i][0] else 0
            elif a[i] == b[i]:
                counts["pairs/ties"] += 1
            else:
                ask.append(i)
        scores = None
        if ask:
            got, s = self.judge.judge(context, [prompts[i] for i in ask], [a[i] for i in ask], [b[i] for i in ask],
                                      seed=seed)
            if len(got) != len(ask):
                raise RuntimeError(f"online_dpo: the judge gave {len(got)} choices for {len(ask)} pairs")
            for i, c in zip(ask, got):
                choices[i] = c
            counts["pairs/ties"] += sum(c is None for c in got)
            scores = s
        counts["pairs/kept"] = sum(c is not None for c in choices)
        return choices, {k: float(v) for k, v in counts.items()}, scores

    def train_step(self, context, micro_batches) -> dict:
        cfg = self.config
        seed = R.step_seed(context)
        prompts = [r["prompt"] for mb in micro_batches for r in mb["records"] for _ in range(2)]
        rollout = R.sample(context, prompts, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seed)
        choices, metrics, scores = self.judge_pairs(context, rollout, seed + JUDGE_SEED_OFFSET)
        kept = [i for i, c in enumerate(choices) if c is not None]
        chosen = [2 * i + choices[i] for i in kept]
        rejected = [2 * i + 1 - choices[i] for i in kept]
        k = len(kept)
        if k:
            rows = torch.tensor(chosen + rejected, device=rollout.batch["input_ids"].device)
            data = {key: rollout.batch[key].index_select(0, rows) for key in ("input_ids", "attention_mask", "labels")}
            data["ref_logps"] = R.logps_of(context, context.models["reference"], data, 1.0, packed=self.packing,
                                           fused_head=self.fused_head)
            metrics.update(self._optimize(context, data, k, seed + 1))
        else:  # nothing to learn from: no update this step
            metrics.update(loss=float("nan"), optimizer_steps=0)
        metrics.update(self._judge_metrics(rollout, kept, chosen, rejected, scores))
        win = torch.full((len(rollout),), 0.5)
        win[chosen], win[rejected] = 1.0, 0.0
        mon = R.rollout_monitors(context, rollout, win, oracle_fn=self.oracle_fn)
        mon.pop("rollout/reward")  # the mean pick is 1/2 by construction
        metrics.update(mon)
        metrics["length_drift"] = float(self.length_monitor.update(context.step + 1, mon["rollout/length"],
                                                                   mon["rollout/length_corr"]))
        return metrics

    def _optimize(self, context, data: dict, k: int, seed: int) -> dict:
        """`epochs` x `mini_batches` optimizer steps over the k pairs of data (rows j and k + j:
        pair j's chosen and rejected); the metrics averaged over the steps."""
        cfg = self.config
        gen = torch.Generator().manual_seed(seed)
        micro = cfg.micro_batch_size or context.batch_size
        sums, steps = {}, 0
        for _epoch in range(cfg.epochs):
            for idx in R.minibatches(k, cfg.mini_batches, gen):
                mbs = []
                for j in range(0, len(idx), micro):
                    part = idx[j: j + micro]
                    mbs += R.select(data, part + [k + i for i in part], 2 * len(part))
                out = context.optimize(mbs, loss_fn=self.loss, units_fn=self.loss_units)
                steps += 1
                for key, v in out.items():
                    sums[key] = sums.get(key, 0.0) + v
        out = {key: v / steps for key, v in sums.items()}
        out["optimizer_steps"] = steps
        return out

    def _judge_metrics(self, rollout, kept, chosen, rejected, scores) -> dict:
        out = {}
        lengths = [len(r) for r in rollout.response_ids]
        unequal = [(c, r) for c, r in zip(chosen, rejected) if lengths[c] != lengths[r]]
        if unequal:
            out["judge/chose_longer"] = sum(lengths[c] > lengths[r] for c, r in unequal) / len(unequal)
        if scores is not None and scores.numel():
            out["judge/score"] = float(scores.float().mean())
        if self.oracle_fn is not None and kept:
            agree = total = 0
            for c, r in zip(chosen, rejected):
                sc = self.oracle_fn(rollout.prompts[c], rollout.texts[c])
                sr = self.oracle_fn(rollout.prompts[r], rollout.texts[r])
                if sc != sr:
                    total += 1
                    agree += sc > sr
            if total:
                out["judge/oracle_agreement"] = agree / total
        return out

    # ---- the loss ---------------------------------------------------------------------------------

    def loss_units(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, models, batch):
        cfg = self.config
        logps, mask = token_logps(models["policy"], batch, packed=self.packing, fused_head=self.fused_head)
        losses, rc, rr, seq, _ = preference.dpo_loss_from_tokens(
            logps, batch["ref_logps"], mask, beta=cfg.beta, loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing, average_log_prob=self.average_log_prob, return_sequence_logps=True)
        b = losses.shape[0]
        metrics = {
            "rewards/chosen": float(rc.mean()),
            "rewards/rejected": float(rr.mean()),
            "rewards/accuracies": float((rc > rr).float().mean()),
            "rewards/margins": float((rc - rr).mean()),
            "logps/chosen": float(seq[:b].detach().mean()),
            "logps/rejected": float(seq[b:].detach().mean()),
        }
        return losses.sum(), metrics

    # ---- evaluation and state ---------------------------------------------------------------------

    @torch.no_grad()
    def eval_step(self, context, batch):
        """One response per eval prompt (fixed seed): (-sum of oracle scores, or 0 without an
        oracle_fn; count; {length, oracle, score with a reward model})."""
        cfg = self.config
        prompts = [r["prompt"] for r in batch["records"]]
        rollout = R.sample(context, prompts, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                           seed=context.seed + R.EVAL_SEED_OFFSET)
        n = len(rollout)
        metrics = {"length": sum(map(len, rollout.response_ids)) / n}
        loss = 0.0
        if self.oracle_fn is not None:
            total = sum(float(self.oracle_fn(p, r)) for p, r in zip(prompts, rollout.texts))
            metrics["oracle"], loss = total / n, -total
        if "reward" in context.models:
            metrics["score"] = float(R.scores(context, rollout, packed=self.packing).mean())
        return loss, n, metrics

    def state_dict(self) -> dict:
        return {"length_monitor": self.length_monitor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "length_monitor" in state:
            self.length_monitor.load_state_dict(state["length_monitor"])
