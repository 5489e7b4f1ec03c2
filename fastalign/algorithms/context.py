"""What an algorithm sees of the run that trains it: the `TrainingContext` interface.

Every algorithm hook gets one (`setup`, `precompute`, `train_step`, `eval_step`; see base.py and
docs/algorithms.md), never the trainer: the context is the whole contract between the two, so a
trainer change that keeps it keeps every algorithm working, and algorithms import nothing of
fastalign.trainer (the trainer runs algorithms, not the other way round). The trainer's
implementation is fastalign/trainer/context.py; a test may write its own.

    models           {role: module}; frozen roles in eval mode; a role freed after precompute is
                     gone (sample and score with these; losses get theirs from `optimize`)
    tokenizer, device
    world            number of processes (1 without torchrun)
    batch_size       micro-batch rows (trainer.batch_size)
    seed             the run's seed;  derive_seed(offset): a seed of its own for one random stream
    step             trainer steps completed (0 during the first one)
    last_checkpoint  for error messages: where a user can resume from
    autocast()       the run's precision (a context manager)
    to_device(batch) tensors of a collated batch onto the device
    optimize(micro_batches, loss_fn=None, units_fn=None) -> metrics
                     one optimizer step, the summed loss divided by the loss units of all the
                     micro-batches (and of every rank); callable several times per train_step
    generate(prompts, temperature=, max_new_tokens=, seed=, return_logprobs=False)
                     -> (texts, ids, truncated) responses sampled from models["policy"] (the same
                     forward count on every rank when the model is sharded); with
                     return_logprobs=True also (logprobs, entropies): per response fp32 tensors of
                     log_softmax(logits / temperature)[token] and the entropy at each step, as
                     the sampler computed them, or (None, None) when its engine gives none;
                     do_sample=False: greedy decoding
    next_micro_batches()
                     the next step's worth of training examples (the data cursor moves on, as a
                     step's does): more prompts within one step (dynamic sampling)
    any_rank(flag), all_reduce(values, op), reduce_weighted(sums, weights)
                     collectives over the run's processes (plain values with one process)

An algorithm's own state (a KL coefficient, a monitor) is checkpointed through its
`state_dict` / `load_state_dict`, not through the context. A hook raises
`TrainingDivergedError` to stop the run before anything is updated.
"""

from __future__ import annotations

# Prime, so that (seed, offset) pairs of different random streams do not collide for offsets below it.
SEED_STRIDE = 1_000_003


def derive_seed(seed: int, offset: int) -> int:
    """The seed of one random stream of a run seeded with `seed` (the training-data order uses
    offset = epoch; the online algorithms' sampling, offset = 7919 * (step + 1))."""
    return seed * SEED_STRIDE + offset


class TrainingDivergedError(FloatingPointError):
    """A loss, gradient or reward became NaN/inf; the step was not applied."""


class TrainingContext:
    """The interface (see the module docstring); implementations define every member but
    derive_seed."""

    models: dict
    tokenizer: object
    device: object
    world: int
    batch_size: int
    seed: int
    step: int
    last_checkpoint: str | None

    def derive_seed(self, offset: int) -> int:
        return derive_seed(self.seed, offset)

    def autocast(self):
        raise NotImplementedError

    def to_device(self, batch: dict) -> dict:
        raise NotImplementedError

    def optimize(self, micro_batches: list[dict], *, loss_fn=None, units_fn=None) -> dict:
        """`loss_fn(models, batch) -> (summed loss, metrics)` and `units_fn(batch)` default to the
        algorithm's `loss` / `loss_units`; returns the step's metrics (loss, units, grad_norm, lr
        and the loss's own, unit-weighted)."""
        raise NotImplementedError

    def generate(self, prompts: list, *, temperature: float, max_new_tokens: int, seed: int,
                 return_logprobs: bool = False, do_sample: bool = True):
        """(texts, response token ids with EOS kept when emitted, count of responses cut at
        max_new_tokens) of one sampled response per prompt from models["policy"]; with
        return_logprobs, also (logprobs, entropies) of the sampler, or (None, None);
        do_sample=False: greedy decoding."""
        raise NotImplementedError

    def next_micro_batches(self) -> list[dict]:
        """The next trainer step's worth of training examples (this rank's share, as collated
        micro-batches), taken from the run's data order as a step takes them: the cursor moves
        on and is checkpointed. For an algorithm that needs more prompts within a step (dynamic
        sampling)."""
        raise NotImplementedError

    def any_rank(self, flag: bool) -> bool:
        raise NotImplementedError

    def all_reduce(self, values: list, op: str = "sum") -> list:
        raise NotImplementedError

    def reduce_weighted(self, sums: dict, weights: dict) -> dict:
        """{key: sum over ranks of sums[key] / sum over ranks of weights[key]}."""
        raise NotImplementedError
