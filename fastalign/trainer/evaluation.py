"""The trainer's evaluation pass: the algorithm's eval_step over the eval data in batches of
batch_size, summed by loss units (distributed: batches round-robin over ranks, then reduced)."""

from __future__ import annotations

import math

import torch

from fastalign.trainer import distributed as D


@torch.no_grad()
def evaluate(trainer, data: list) -> dict:
    """{"loss": total loss / total units, metric: unit-weighted mean} of `data` (trainable
    models in eval mode meanwhile)."""
    if not data:
        return {}
    for m in trainer.trainable.values():
        m.eval()
    loss_total, units_total, sums, weights = 0.0, 0, {}, {}
    bs = trainer.config.batch_size
    starts = list(range(0, len(data), bs))
    mine = starts[trainer.rank::trainer.world]
    # FSDP2 all-gathers in every forward: every rank must run as many forwards as the others
    rounds = math.ceil(len(starts) / trainer.world) if trainer.dist_mode == "fsdp" else len(mine)
    for j in range(rounds):
        i = mine[j] if j < len(mine) else starts[0]
        batch = trainer.to_device(trainer.algorithm.collate(data[i: i + bs], trainer.tokenizer))
        with trainer.autocast():
            loss_sum, units, metrics = trainer.algorithm.eval_step(trainer.context, batch)
        if j >= len(mine):
            continue  # a padding forward: its result is not counted
        loss_total += loss_sum
        units_total += units
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * units
            weights[k] = weights.get(k, 0.0) + units
    for m in trainer.trainable.values():
        m.train()
    if trainer.world > 1:
        sums["loss"], weights["loss"] = loss_total, units_total
        return D.reduce_weighted(sums, weights)
    out = {k: v / max(units_total, 1) for k, v in sums.items()}
    out["loss"] = loss_total / max(units_total, 1)
    return out
