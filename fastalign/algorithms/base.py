"""The Algorithm interface every built-in and plugin implements (docs/algorithms.md walks through
it with examples).

An algorithm declares
  * `config_class`: a dataclass of its hyperparameters (loadable from YAML/JSON),
  * `data_kind`: "demonstrations", "preferences" or "prompts" (see fastalign.data.formats),
  * `models`: the roles it needs ("policy", "reference", "reward", "value"), `trainable`: those
    the optimizer updates (and checkpoints save); `required_models(examples)` narrows `models`
    for given data (DPO: no reference when the examples carry its log-probs),
  * `precompute_roles()` / `precompute(context, examples)`: frozen models whose outputs are
    computed once before training and written into the examples, after which the trainer frees
    those models (DPO's precompute_ref_logps),
  * `packing`: whether its forwards run padding-free (data.packing; token_logps(packed=...)),
  * `loss(models, batch)`: the summed loss of a micro-batch and its metrics, built from the
    fastalign ops, plus `loss_units(batch)`: how many units (tokens, pairs) that sum is over.

The trainer divides every micro-batch's summed loss by the units of the whole accumulated batch
(counted before any forward), so gradient accumulation gives exactly the gradient of the
full-batch mean -- not a mean of micro-batch means.

Every hook that runs inside a training run gets the run's `TrainingContext`
(context.py: models, tokenizer, device, autocast, step, seed, `optimize`, `generate`, collectives),
never the Trainer: `setup(context)` once before training, `precompute(context, examples)`,
`train_step(context, micro_batches)` per trainer step (by default one `context.optimize`), and
`eval_step(context, batch)`. Offline algorithms implement only the declarations and the loss;
online ones derive from `OnlineAlgorithm` (fastalign/algorithms/online.py), which owns the
rollout step. Per-run state that must survive a resume (a KL coefficient, a monitor) goes through
`state_dict` / `load_state_dict`, saved in every checkpoint.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from fastalign.data import collate as C
from fastalign.data import packing as P
from fastalign.models import load_model
from fastalign.models.fused_head import fused_head_refusal, head_logps
from fastalign.ops.logprobs import gather_logprobs
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
    # data.packing (set by the run from its config): every model forward of the step runs
    # padding-free -- token_logps(..., packed=True), the scalar heads' packed=True
    packing: bool = False
    # model.fused_head (set by the run): token_logps(..., fused_head=) -- log-probs straight from
    # the hidden states where the model allows it (False: always the full logits)
    fused_head: bool = True

    def __init__(self, config=None):
        self.config = build_config(self.config_class, config)

    # ---- models -----------------------------------------------------------------------------

    def build_models(self, policy: str, tokenizer, *, reference: str | None = None, seed: int = 0,
                     tiny_kwargs=None) -> dict:
        """The models this algorithm needs, by role, from names/paths (see models.load_model)."""
        out = {"policy": load_model(policy, tokenizer=tokenizer, seed=seed, tiny_kwargs=tiny_kwargs)}
        if "reference" in self.models:
            out["reference"] = load_model(reference or policy, tokenizer=tokenizer, seed=seed, tiny_kwargs=tiny_kwargs)
        return out

    def required_models(self, examples: list) -> tuple:
        """The roles the trainer must be given to train on `examples` (default: all of `models`)."""
        return self.models

    def setup(self, context) -> None:
        """Called once by the trainer after the models are on the device, before training."""

    def precompute_roles(self) -> tuple:
        """Frozen roles that `precompute` runs once before training; the trainer then frees them.
        () (the default): nothing to precompute."""
        return ()

    def precompute(self, context, examples: list) -> None:
        """Writes what the `precompute_roles` models compute into `examples` (encoded, in place);
        called by the trainer for the training and the eval examples, when those models are given."""

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

    def train_step(self, context, micro_batches) -> dict:
        """One trainer step over this rank's micro-batches; returns its metrics."""
        return context.optimize(micro_batches)

    # ---- state and evaluation -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serialisable per-run state saved in checkpoints (e.g. an adaptive KL coefficient)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @torch.no_grad()
    def eval_step(self, context, batch: dict):
        """(summed loss, loss units, {metric: mean}) of one eval batch (under the run's autocast)."""
        loss_sum, metrics = self.loss(context.models, batch)
        return float(loss_sum), self.loss_units(batch), metrics


def token_logps(model, batch, *, temperature: float = 1.0, return_entropy: bool = False, packed: bool = False,
                fused_head: bool = True):
    """Per-token log-probs of batch["labels"] under `model`: returns (logps [B, T-1], mask
    [B, T-1]) where position t scores labels[t+1] from the hidden state / logits at t; masked
    positions are 0. With return_entropy, (logps, entropy, mask).
    fused_head (model.fused_head, default on): straight from the last hidden states with
    linear_gather_logprobs, the [tokens, V] logits never built (fastalign/models/fused_head.py),
    for every model fused_head_refusal accepts; otherwise the full logits then gather_logprobs
    (no full log_softmax either way).
    packed=True (data.packing): one padding-free forward of the batch's real tokens
    (fastalign.data.packing), results scattered back to this layout, 0 at the padding."""
    labels = batch["labels"][:, 1:]
    mask = labels != C.IGNORE
    fused = fused_head and fused_head_refusal(model) is None
    if packed:
        out = _packed_token_logps(model, batch, temperature, return_entropy, fused)
        return (*out, mask) if return_entropy else (out[0], mask)
    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}  # SFT's packed rows
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **extra}
    if fused:
        out = head_logps(model, inputs, P.next_token_targets(batch["labels"]), temperature=temperature,
                         ignore_index=C.IGNORE, return_entropy=return_entropy)
        out = tuple(o[:, :-1] for o in out)  # the last position predicts nothing
        return (*out, mask) if return_entropy else (out[0], mask)
    logits = model(**inputs).logits
    out = gather_logprobs(logits[:, :-1], labels, temperature=temperature, return_entropy=return_entropy)
    return (*out, mask) if return_entropy else (out, mask)


def _packed_token_logps(model, batch, temperature, return_entropy, fused) -> tuple:
    rows = P.pack_rows(batch["input_ids"], batch["attention_mask"])

    def forward(input_ids, position_ids, targets=None, entropy=True):
        # no attention mask: the positions delimit the sequences; use_cache=False because
        # transformers looks for packed sequences only when no KV cache is passed or created
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        if not fused:
            return model(**inputs).logits
        # fused: the log-probs of `targets` (the leak probe: of the input ids), stacked with the
        # entropies [1, T, 2] when asked; no logits
        got = head_logps(model, inputs, input_ids if targets is None else targets, temperature=temperature,
                         ignore_index=C.IGNORE, return_entropy=entropy)
        return torch.stack(got, -1) if entropy else got[0]

    P.check_no_leak(model, forward, vocab_size=model.config.vocab_size, device=rows.input_ids.device)
    targets = rows.gather(P.next_token_targets(batch["labels"]))
    if fused:
        got = forward(rows.input_ids, rows.position_ids, targets[None], return_entropy)[0]
        out = got.unbind(-1) if return_entropy else (got,)
    else:
        logits = forward(rows.input_ids, rows.position_ids)[0]
        out = gather_logprobs(logits, targets, temperature=temperature, return_entropy=return_entropy)
        out = out if return_entropy else (out,)
    return tuple(rows.scatter(o)[:, :-1] for o in out)
