"""What an algorithm sees of the trainer that runs it: a `TrainingContext`.

Every algorithm hook gets one (`setup`, `precompute`, `train_step`, `eval_step`; see
fastalign/algorithms/base.py and docs/algorithms.md), never the Trainer: the context is the whole
contract between the two, so a trainer change that keeps it keeps every algorithm working.

    context.models           {role: module}; frozen roles in eval mode; a role freed after
                             precompute is gone (sample and score with these, not the DDP views)
    context.tokenizer, context.device
    context.world            number of processes (1 without torchrun)
    context.batch_size       micro-batch rows (trainer.batch_size)
    context.seed             the run's seed;  context.derive_seed(offset): a seed of its own
                             for one random stream (seed * SEED_STRIDE + offset)
    context.step             trainer steps completed (0 during the first one)
    context.last_checkpoint  for error messages: where a user can resume from
    context.autocast()       the run's precision (a context manager)
    context.to_device(batch) tensors of a collated batch onto the device
    context.optimize(micro_batches, loss_fn=None, units_fn=None) -> metrics
                             one optimizer step, globally normalised over the micro-batches
                             (and over every rank); callable several times per train_step

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
    """An algorithm's view of one training run (see the module docstring). Built by the trainer;
    reads its live state (step, models), so one context serves the whole run."""

    def __init__(self, trainer):
        self._trainer = trainer

    @property
    def models(self) -> dict:
        return self._trainer.models

    @property
    def tokenizer(self):
        return self._trainer.tokenizer

    @property
    def device(self):
        return self._trainer.device

    @property
    def world(self) -> int:
        return self._trainer.world

    @property
    def batch_size(self) -> int:
        return self._trainer.config.batch_size

    @property
    def seed(self) -> int:
        return self._trainer.config.seed

    @property
    def step(self) -> int:
        return self._trainer.step

    @property
    def last_checkpoint(self) -> str | None:
        return self._trainer.last_checkpoint

    def derive_seed(self, offset: int) -> int:
        return derive_seed(self.seed, offset)

    def autocast(self):
        return self._trainer.autocast()

    def to_device(self, batch: dict) -> dict:
        return self._trainer.to_device(batch)

    def optimize(self, micro_batches: list[dict], *, loss_fn=None, units_fn=None) -> dict:
        """`loss_fn(models, batch) -> (summed loss, metrics)` and `units_fn(batch)` default to the
        algorithm's `loss` / `loss_units`; returns the step's metrics (loss, units, grad_norm, lr
        and the loss's own, unit-weighted)."""
        return self._trainer.optimize(micro_batches, loss_fn=loss_fn, units_fn=units_fn)
