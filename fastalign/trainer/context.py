"""The trainer's TrainingContext (the interface: fastalign/algorithms/context.py): an algorithm's
view of one Trainer, reading its live state (step, models), so one context serves the whole run."""

from __future__ import annotations

from fastalign.algorithms.context import TrainingContext
from fastalign.trainer import distributed as D
from fastalign.trainer.generation import generate


class TrainerContext(TrainingContext):
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

    def autocast(self):
        return self._trainer.autocast()

    def to_device(self, batch: dict) -> dict:
        return self._trainer.to_device(batch)

    def optimize(self, micro_batches: list[dict], *, loss_fn=None, units_fn=None) -> dict:
        return self._trainer.optimize(micro_batches, loss_fn=loss_fn, units_fn=units_fn)

    def generate(self, prompts: list, *, temperature: float, max_new_tokens: int, seed: int,
                 return_logprobs: bool = False, do_sample: bool = True):
        return generate(self.models["policy"], self.tokenizer, prompts, temperature=temperature,
                        max_new_tokens=max_new_tokens, seed=seed, device=self.device, do_sample=do_sample,
                        sampler=self._trainer.config.sampler, return_logprobs=return_logprobs,
                        sampler_dtype=self._trainer.sampler_dtype)

    def next_micro_batches(self) -> list[dict]:
        return self._trainer.next_micro_batches()

    def any_rank(self, flag: bool) -> bool:
        return D.any_rank(flag)

    def all_reduce(self, values: list, op: str = "sum") -> list:
        return D.all_reduce(values, op)

    def reduce_weighted(self, sums: dict, weights: dict) -> dict:
        return D.reduce_weighted(sums, weights)
