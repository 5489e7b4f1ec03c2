"""Process reward model (`prm`): a per-token classification head on a causal LM, trained on
step-labelled responses (the `stepwise` format, fastalign/data/stepwise.py) to say, at the end
of each step, whether that step is correct (Uesato et al. 2022; Lightman et al. 2023).

Head: the ScalarHeadModel (fastalign/models/heads.py) gives one logit z per token; the step's
probability of being correct is p = sigmoid(z). That is the two-class token classifier of TRL's
PRMTrainer (AutoModelForTokenClassification, num_labels=2, logits (l0, l1)) with z = l1 - l0:
softmax((l0, l1))[1] = sigmoid(l1 - l0), so the classes' cross-entropy depends on z alone.

Loss: per labelled step (label y in {0, 1} at the step's last separator token, nowhere else),
    CE = -log softmax((0, z))[y] = softplus(-z) if y = 1 else softplus(z)
averaged over the labelled steps of the batch (the trainer divides the summed loss by the
step count of the whole accumulated batch), as TRL's token-classification loss with
ignore_index=-100 and OpenRLHF's PRMLoss (CE over the "+"/"-" reward tokens at its placeholder
token). algo.train_on_last_step_only: train on each response's last step only (TRL's option;
evaluation still scores every step, as in TRL).

Metrics: step_accuracy (sigmoid(z) > 0.5 agrees with the label, per step), first_error_accuracy
(per response: the first step predicted wrong -- or none -- is the first step labelled wrong --
or none), step_label_rate (the fraction of steps labelled correct: the majority-class baseline
is max(rate, 1 - rate)). In the trainer's evaluation every metric is weighted by the batch's
steps; `evaluate_steps` gives first_error_accuracy exactly per response.

Using a trained PRM: `score_steps(model, tokenizer, prompt, steps)` -> per-step probabilities;
`prm_reward_fn(model, tokenizer)` -> a reward_fn(prompt, response) for the online algorithms
(the response split at the separator, the step probabilities reduced by min, prod, mean or last).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastalign.algorithms.base import Algorithm, AlgorithmConfig
from fastalign.algorithms.registry import register_algorithm
from fastalign.data.collate import IGNORE
from fastalign.data.stepwise import collate_steps, encode_steps, separator_ids
from fastalign.errors import ConfigError
from fastalign.models import load_model
from fastalign.options import option

REDUCTIONS = ("min", "prod", "mean", "last")


@dataclass
class PRMConfig(AlgorithmConfig):
    step_separator: str = option("\n", "text appended after every step; each step's label sits on its last token "
                                       "(TRL's default: a newline)")
    train_on_last_step_only: bool = option(False, "train on each response's last step only (evaluation scores "
                                                  "every step)")


def last_step_mask(labels: torch.Tensor, n_steps: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: each row's last labelled position, where that is the response's last step
    (rows whose last step was cut at max_length have none)."""
    mask = labels != IGNORE
    count = mask.sum(1)
    pos = torch.arange(labels.shape[1], device=labels.device)
    last = torch.where(mask, pos, -1).amax(1)
    return (pos[None] == last[:, None]) & (count == n_steps.to(count.device))[:, None] & mask


def step_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed two-class cross-entropy of the per-token logits [B, T] at the positions of `mask`
    against labels in {0, 1} there (fp32)."""
    z, y = logits[mask].float(), labels[mask].float()
    return F.binary_cross_entropy_with_logits(z, y, reduction="sum")


def first_errors(pred_ok: torch.Tensor, label_ok: torch.Tensor, mask: torch.Tensor) -> tuple:
    """Per row: the index among its labelled steps of the first step predicted (labelled) wrong,
    or the row's step count when there is none: (predicted [B], true [B])."""
    step_index = mask.long().cumsum(1) - 1  # the step each labelled position belongs to
    big = mask.sum(1)

    def first(bad):
        return torch.where(bad & mask, step_index, big[:, None]).amin(1)

    return first(~pred_ok), first(~label_ok)


@register_algorithm("prm")
class ProcessRewardModel(Algorithm):
    """Process reward model: per-step correctness from a token-classification head, step accuracy."""

    config_class = PRMConfig
    data_kind = "steps"
    models = ("prm",)
    trainable = ("prm",)

    def __init__(self, config=None):
        super().__init__(config)
        if not self.config.step_separator:
            raise ConfigError("prm: algo.step_separator must be a non-empty string")

    def build_models(self, policy, tokenizer, *, reference=None, seed=0, tiny_kwargs=None):
        return {"prm": load_model(policy, tokenizer=tokenizer, scalar_head=True, seed=seed, tiny_kwargs=tiny_kwargs)}

    def encode(self, records, tokenizer, max_length, stats: Counter) -> list:
        return encode_steps(records, tokenizer, max_length, stats, separator=self.config.step_separator)

    def collate(self, examples, tokenizer) -> dict:
        return collate_steps(examples, tokenizer.pad_token_id)

    def _mask(self, batch, all_steps: bool) -> torch.Tensor:
        if self.config.train_on_last_step_only and not all_steps:
            return last_step_mask(batch["labels"], batch["n_steps"])
        return batch["labels"] != IGNORE

    def loss_units(self, batch) -> int:
        return int(self._mask(batch, all_steps=False).sum())  # trained steps

    def loss(self, models, batch, *, all_steps: bool = False):
        mask = self._mask(batch, all_steps)
        logits = models["prm"](batch["input_ids"], batch["attention_mask"], packed=self.packing)
        loss_sum = step_cross_entropy(logits, batch["labels"], mask)
        return loss_sum, self._metrics(logits.detach(), batch["labels"], mask, loss_sum)

    @staticmethod
    def _metrics(logits, labels, mask, loss_sum) -> dict:
        n = int(mask.sum())
        if n == 0:
            return {"loss": 0.0}
        pred_ok, label_ok = logits > 0, labels == 1
        rows = mask.any(1)
        first_pred, first_true = first_errors(pred_ok, label_ok, mask)
        return {
            "loss": float(loss_sum.detach()) / n,
            "step_accuracy": float((pred_ok == label_ok)[mask].float().mean()),
            "first_error_accuracy": float((first_pred == first_true)[rows].float().mean()),
            "step_label_rate": float(label_ok[mask].float().mean()),
        }

    @torch.no_grad()
    def eval_step(self, context, batch):
        loss_sum, metrics = self.loss(context.models, batch, all_steps=True)  # every step, as TRL evaluates
        return float(loss_sum), int((batch["labels"] != IGNORE).sum()), metrics


# ---- using a trained PRM ------------------------------------------------------------------------


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def _step_logits(model, tokenizer, records, step_separator, batch_size, max_length) -> list:
    """Per record, the fp32 logits [n_steps] at its steps' separator tokens."""
    separator_ids(tokenizer, step_separator)  # a clear error for a separator with no tokens
    stats = Counter()
    out = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(records), batch_size):
            chunk = records[i: i + batch_size]
            exs = encode_steps(chunk, tokenizer, max_length, stats, separator=step_separator)
            if len(exs) != len(chunk) or stats["truncated: steps cut at max_length"]:
                raise ValueError(f"score_steps: a prompt and its steps do not fit in max_length={max_length} tokens")
            batch = collate_steps(exs, tokenizer.pad_token_id)
            dev = _device(model)
            z = model(batch["input_ids"].to(dev), batch["attention_mask"].to(dev)).float().cpu()
            mask = batch["labels"] != IGNORE
            out += [z[j][mask[j]] for j in range(len(exs))]
    finally:
        model.train(was_training)
    return out


def score_steps(model, tokenizer, prompt, steps, *, step_separator: str = "\n", batch_size: int = 16,
                max_length: int | None = None):
    """The probability that each step is correct, from a trained PRM (a ScalarHeadModel).

    One response: `prompt` (a string or chat messages) and `steps` (a list of step strings) ->
    [p_1, ..., p_n]. Several: a list of prompts and a list of step lists -> one list per
    response. The text is built exactly as in training (prompt through the chat template, each
    step followed by `step_separator`, which must be the training run's algo.step_separator).
    max_length (default: the tokenizer's model_max_length): a response that does not fit is an
    error, not silently cut."""
    logits, single = _logits(model, tokenizer, prompt, steps, step_separator, batch_size, max_length)
    probs = [torch.sigmoid(z).tolist() for z in logits]
    return probs[0] if single else probs


def _logits(model, tokenizer, prompt, steps, step_separator, batch_size, max_length):
    single = isinstance(steps, list) and all(isinstance(s, str) for s in steps)
    prompts, step_lists = ([prompt], [steps]) if single else (prompt, steps)
    if not isinstance(prompts, list) or not isinstance(step_lists, list) or len(prompts) != len(step_lists):
        raise ValueError("score_steps: give a prompt and a list of steps, or a list of prompts and a list of "
                         "step lists of the same length")
    for i, s in enumerate(step_lists):
        if not isinstance(s, list) or not s or not all(isinstance(t, str) for t in s):
            raise ValueError(f"score_steps: steps[{i}] must be a non-empty list of strings, got {s!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"score_steps: batch_size must be an integer >= 1, got {batch_size!r}")
    max_length = max_length or getattr(tokenizer, "model_max_length", None) or 2048
    records = [{"prompt": p, "completions": s, "labels": [True] * len(s)} for p, s in zip(prompts, step_lists)]
    return _step_logits(model, tokenizer, records, step_separator, batch_size, int(max_length)), single


def reduce_steps(probs: list, reduce: str = "min") -> float:
    """One process reward from per-step probabilities: min (the weakest step, Lightman et al.
    2023), prod (every step correct, if independent), mean, or last."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if not probs:
        raise ValueError("reduce_steps: no steps to reduce")
    if reduce == "min":
        return float(min(probs))
    if reduce == "prod":
        return float(math.prod(probs))
    if reduce == "mean":
        return float(sum(probs) / len(probs))
    return float(probs[-1])


def prm_reward_fn(model, tokenizer, *, step_separator: str = "\n", reduce: str = "min"):
    """A reward_fn(prompt, response) -> float for the online algorithms (grpo, ppo, ...): the
    response split at `step_separator` into its non-empty steps, scored by `score_steps`, reduced
    by `reduce`. A response with no step scores 0."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"prm_reward_fn: reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    separator_ids(tokenizer, step_separator)

    def reward_fn(prompt, response: str) -> float:
        steps = [s for s in response.split(step_separator) if s.strip()]
        if not steps:
            return 0.0
        return reduce_steps(score_steps(model, tokenizer, prompt, steps, step_separator=step_separator), reduce)

    return reward_fn


def _first_wrong(ok: list) -> int:
    return next((i for i, v in enumerate(ok) if not v), len(ok))


def evaluate_steps(model, tokenizer, records, *, step_separator: str = "\n", batch_size: int = 16,
                   max_length: int | None = None) -> dict:
    """Exact metrics of a PRM on stepwise records: step_accuracy (over all steps),
    first_error_accuracy (over responses), step_label_rate and majority_baseline (the step
    accuracy of always answering the more common label), steps, responses."""
    if not records:
        raise ValueError("evaluate_steps: no records")
    logits, _ = _logits(model, tokenizer, [r["prompt"] for r in records], [r["completions"] for r in records],
                        step_separator, batch_size, max_length)
    hits = steps = first_hits = positives = 0
    for z, r in zip(logits, records):
        pred = (z > 0).tolist()  # p > 1/2, decided on the logit as in training's metrics
        labels = list(r["labels"])
        hits += sum(a == b for a, b in zip(pred, labels))
        steps += len(labels)
        positives += sum(labels)
        first_hits += _first_wrong(pred) == _first_wrong(labels)
    rate = positives / steps
    return {"step_accuracy": hits / steps, "first_error_accuracy": first_hits / len(records),
            "step_label_rate": rate, "majority_baseline": max(rate, 1 - rate), "steps": steps,
            "responses": len(records)}
