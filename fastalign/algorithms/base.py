"""The Algorithm interface every built-in and plugin implements.

An algorithm declares
  * `config_class`: a dataclass of its hyperparameters (loadable from YAML/JSON),
  * `data_kind`: "demonstrations", "preferences" or "prompts" (see fastalign.data.formats),
  * `models`: the roles it needs ("policy", "reference", "reward", "value"), `trainable`: those
    the optimizer updates (and checkpoints save),
  * `loss(models, batch)`: the summed loss of a micro-batch and its metrics, built from the
    fastalign ops, plus `loss_units(batch)`: how many units (tokens, pairs) that sum is over.

The trainer divides every micro-batch's summed loss by the units of the whole accumulated batch
(counted before any forward), so gradient accumulation gives exactly the gradient of the
full-batch mean -- not a mean of micro-batch means.

Offline algorithms only implement the methods above. Online ones (PPO, GRPO) override
`train_step(trainer, micro_batches)` to generate rollouts and then call `trainer.optimize(...)`
as often as they like; `setup(trainer)` is the hook for per-run state (reference log-probs,
KL controllers).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from fastalign.data import collate as C
from fastalign.options import build_config


@dataclass
class AlgorithmConfig:
    pass


class Algorithm:
    """Base class (not registered)."""

    name: str | None = None
    config_class = AlgorithmConfig
    data_kind = "demonstrations"
    models: tuple = ("policy",)
    trainable: tuple = ("policy",)

    def __init__(self, config=None):
        self.config = build_config(self.config_class, config)

    # ---- models -----------------------------------------------------------------------------

    def build_models(self, policy: str, tokenizer, *, reference: str | None = None, seed: int = 0,
                     tiny_kwargs=None) -> dict:
        """The models this algorithm needs, by role, from names/paths (see models.load_model)."""
        from fastalign.models import load_model

        out = {"policy": load_model(policy, tokenizer=tokenizer, seed=seed, tiny_kwargs=tiny_kwargs)}
        if "reference" in self.models:
            out["reference"] = load_model(reference or policy, tokenizer=tokenizer, seed=seed, tiny_kwargs=tiny_kwargs)
        return out

    def setup(self, trainer) -> None:
        """Called once by the trainer after the models are on the device, before training."""

    # ---- data -------------------------------------------------------------------------------

    def encode(self, records, tokenizer, max_length, stats: Counter) -> list:
        if self.data_kind == "demonstrations":
            return C.encode_demonstrations(records, tokenizer, max_length, stats)
        if self.data_kind == "preferences":
            return C.encode_preferences(records, tokenizer, max_length, stats)
        return C.encode_prompts(records, tokenizer, max_length, stats)

    def collate(self, examples, tokenizer) -> dict:
        if self.data_kind == "demonstrations":
            return C.collate_lm(examples, tokenizer.pad_token_id)
        if self.data_kind == "preferences":
            return C.collate_pairs(examples, tokenizer.pad_token_id)
        return C.collate_prompts(examples, tokenizer.pad_token_id)

    # ---- the step -----------------------------------------------------------------------------

    def loss_units(self, batch) -> int:
        raise NotImplementedError

    def loss(self, models: dict, batch: dict):
        """(summed loss tensor, {metric: micro-batch mean}) for one micro-batch."""
        raise NotImplementedError

    def train_step(self, trainer, micro_batches) -> dict:
        return trainer.optimize(micro_batches)

    def state_dict(self) -> dict:
        """JSON-serialisable per-run state saved in checkpoints (e.g. an adaptive KL coefficient)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @torch.no_grad()
    def eval_step(self, models: dict, batch: dict):
        loss_sum, metrics = self.loss(models, batch)
        return float(loss_sum), self.loss_units(batch), metrics


def token_logps(model, batch, *, temperature: float = 1.0, return_entropy: bool = False):
    """Per-token log-probs of batch["labels"] under `model`, via gather_logprobs (no full
    log_softmax): returns (logps [B, T-1], mask [B, T-1]) where position t scores labels[t+1]
    from logits[t]; masked positions are 0. With return_entropy, (logps, entropy, mask)."""
    import fastalign

    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}  # packed rows
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
    labels = batch["labels"][:, 1:]
    out = fastalign.gather_logprobs(logits[:, :-1], labels, temperature=temperature, return_entropy=return_entropy)
    mask = labels != C.IGNORE
    return (*out, mask) if return_entropy else (out, mask)
