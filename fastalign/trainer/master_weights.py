"""trainer.precision=bf16-weights: the models' weights are bf16 (forward and backward run in bf16,
half the memory of fp32 weights), and each trainable parameter has an fp32 master copy, which is
what the optimizer holds and updates.

    micro-batch backward -> bf16 gradient of p -> added into master.grad (fp32), p.grad freed
    optimizer step (AdamW on the fp32 masters) -> p = round_to_bf16(master)

So the gradients of the micro-batches of a step are summed in fp32, not rounded to bf16 after
each addition, and small updates are not lost to bf16 rounding of the weights: they accumulate
in the master until they move the bf16 value. Under DDP (torchrun, trainer.distributed=ddp) the
models are not wrapped in DistributedDataParallel (its reducer would read the p.grad this moves
away); instead every rank's fp32 master gradients are summed over the ranks once per step
(`all_reduce_grads`, one flat buffer) and divided by the world size, as DDP does -- so two ranks
give the bits of one process with two micro-batches (g0 + g1 in fp32 either way). Checkpoints hold the fp32 masters in the model
directories (`masters_in_models` swaps them into the parameters while a checkpoint is written
or read), so a resume continues bit for bit and a checkpoint loads as an ordinary fp32 model.
"""

from __future__ import annotations

import contextlib

import torch


class MasterWeights:
    def __init__(self, params: list):
        """`params`: the trainable bf16 parameters (each once)."""
        bad = [tuple(p.shape) for p in params if p.dtype != torch.bfloat16]
        if bad:
            raise ValueError(f"MasterWeights: trainable parameters must be bf16, got other dtypes for shapes {bad}")
        self.params = list(params)
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate(m)) for p, m in
                       zip(self.params, self.masters)]

    @staticmethod
    def _accumulate(master):
        def hook(p):  # runs once p.grad holds this backward's bf16 gradient
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)  # in fp32 (the bf16 operand converts exactly)
            p.grad = None

        return hook

    @torch.no_grad()
    def all_reduce_grads(self, world: int) -> None:
        """The masters' gradients := their mean over the ranks (sum, then / world: the losses were
        scaled by world for DDP's mean, as for every distributed mode). A master with no gradient on
        this rank (a parameter no micro-batch reached) contributes zeros."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [m.grad if m.grad is not None else torch.zeros_like(m) for m in self.masters]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for m, g in zip(self.masters, _unflatten_dense_tensors(flat, grads)):
            m.grad = g

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Each bf16 weight := its master rounded to bf16 (round to nearest even)."""
        for p, m in zip(self.params, self.masters):
            p.copy_(m)

    @contextlib.contextmanager
    def masters_in_models(self):
        """Within: every trainable parameter's data is its fp32 master (same storage), so saving
        a model saves the masters and loading one loads into them; after: the bf16 weights,
        re-rounded from the masters."""
        kept = [p.data for p in self.params]
        for p, m in zip(self.params, self.masters):
            p.data = m.data
        try:
            yield
        finally:
            for p, d in zip(self.params, kept):
                p.data = d
            self.copy_to_model()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
