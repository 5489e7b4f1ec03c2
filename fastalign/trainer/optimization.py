"""One optimizer step of the trainer: the optimizer and its schedule, gradient accumulation with
global loss normalisation, clipping, and the checks that stop a diverged step before it is applied.

`accumulate` divides every micro-batch's summed loss by the loss units of *all* the micro-batches
(counted before any forward), so accumulation gives exactly the gradient of the full batch's
mean, not a mean of micro-batch means. Under torchrun "all" is every rank's micro-batches: the unit
count is summed over ranks first and each backward is scaled by the world size, because DDP/FSDP2
average gradients over ranks; the result is the single-process gradient of the global batch.
"""

from __future__ import annotations

import contextlib
import math

import torch

from fastalign.algorithms.context import TrainingDivergedError
from fastalign.trainer import distributed as D
from fastalign.trainer.config import TrainerConfig


def build_optimizer(params: list, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
    )


def lr_lambda(cfg: TrainerConfig, total: int):
    """The learning-rate factor of each trainer step: linear warmup, then constant, linear or
    cosine decay to min_lr_ratio at step `total`."""
    if cfg.schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule must be constant, linear or cosine, got {cfg.schedule!r}")

    def f(step):
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        decay = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    return f


def _diverged(trainer, what: str) -> TrainingDivergedError:
    trainer.optimizer.zero_grad(set_to_none=True)  # nothing of this step is applied
    return TrainingDivergedError(f"step {trainer.step + 1}: {what}; the step was not applied "
                                 f"(last checkpoint: {trainer.last_checkpoint})")


def accumulate(trainer, micro_batches: list[dict], *, loss_fn=None, units_fn=None) -> dict:
    """Backward over micro_batches with global normalisation (see the module docstring).
    Gradients add to .grad; returns the metrics (unit-weighted means), `loss` = total loss /
    total units and `units`. Every rank must pass the same number of micro-batches."""
    loss_fn = loss_fn or trainer.algorithm.loss
    units_fn = units_fn or trainer.algorithm.loss_units
    units = [int(units_fn(mb)) for mb in micro_batches]
    multi = trainer.world > 1
    local = sum(units)
    total = local
    if multi:
        total = int(D.all_reduce([local])[0])
        hi, neg_lo = D.all_reduce([len(micro_batches), -len(micro_batches)], "max")
        if hi != -neg_lo:
            raise ValueError(f"step {trainer.step + 1}: ranks have {-neg_lo:.0f} to {hi:.0f} micro-batches; "
                             "every rank must run the same number (DDP/FSDP synchronise per backward)")
    if total == 0:
        raise ValueError("the batch has no loss units (every label masked?); check max_length and the data")
    models = trainer.train_models
    loss_total, sums, weights = 0.0, {}, {}
    last = len(micro_batches) - 1
    for i, (mb, u) in enumerate(zip(micro_batches, units)):
        # DDP: all-reduce the gradients once, with the last micro-batch's backward
        sync = contextlib.nullcontext() if i == last else D.no_sync(models.values())
        with sync:
            with trainer.autocast():
                loss_sum, metrics = loss_fn(models, mb)
            value = float(loss_sum.detach())
            if not math.isfinite(value) and not multi:  # (multi: decided on the reduced loss below)
                raise _diverged(trainer, f"loss is {value}")
            loss = loss_sum / total
            # x world: DDP/FSDP2 divide the summed gradients by the world size
            (loss * trainer.world if multi else loss).backward()
        loss_total += value
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * u
            weights[k] = weights.get(k, 0.0) + u
    if multi and trainer.master_weights is not None:
        trainer.master_weights.all_reduce_grads(trainer.world)  # bf16-weights under DDP (master_weights.py)
    if not multi:
        out = {k: v / total for k, v in sums.items()}
        out.update(loss=loss_total / total, units=total)
        return out
    sums["loss"], weights["loss"] = loss_total, local
    out = D.reduce_weighted(sums, weights)  # a NaN/inf loss on any rank makes the sum non-finite
    if not math.isfinite(out["loss"]):
        raise _diverged(trainer, f"loss is {out['loss']} (summed over ranks)")
    out["units"] = total
    return out


def optimize(trainer, micro_batches: list[dict], *, loss_fn=None, units_fn=None) -> dict:
    """`accumulate`, then clip and one optimizer step; returns the step's metrics (+ grad_norm,
    lr). The learning-rate schedule advances once per trainer step (in fit), however many
    optimizer steps a train_step takes."""
    out = accumulate(trainer, micro_batches, loss_fn=loss_fn, units_fn=units_fn)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.params, trainer.config.max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):
        trainer.optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(f"step {trainer.step + 1}: gradient norm is {float(grad_norm)}; the step was not applied")
    lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.optimizer.step()
    if trainer.master_weights is not None:  # bf16-weights: round the updated fp32 masters into the model
        trainer.master_weights.copy_to_model()
    trainer.optimizer.zero_grad(set_to_none=True)
    out.update(grad_norm=float(grad_norm), lr=lr)
    return out
