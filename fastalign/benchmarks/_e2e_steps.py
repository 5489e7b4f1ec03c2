"""What the end-to-end benchmark records per optimizer step, shared by the contenders: the wall
clock at the end of every step (step time = the interval between consecutive step ends, so it
includes everything the loop does between updates: data, sampling, scoring, logging), the loss,
and the tokens the policy generated (counted by wrapping its `generate`)."""

from __future__ import annotations

import functools
import time

import torch


class StepLog:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.generated_tokens = 0
        self.generate_calls = 0

    def step_end(self, loss=None) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if loss is not None:
            self.losses.append(float(loss))

    def step_seconds(self, warmup: int) -> list[float]:
        """Durations of the steps after the first `warmup` ones (warmup >= 1: the first interval
        starts at the end of the last warmup step)."""
        marks = self.ends[warmup - 1:]
        return [b - a for a, b in zip(marks, marks[1:])]

    def force_new_tokens(self, model, new_tokens: int) -> None:
        """Makes `model.generate` produce exactly `new_tokens` tokens per sequence (min_new_tokens:
        EOS masked until then; max_new_tokens: no more), so every contender samples the same count,
        and counts what it generated."""
        inner = model.generate

        @functools.wraps(inner)
        def generate(*args, **kwargs):
            kwargs["min_new_tokens"] = kwargs["max_new_tokens"] = new_tokens
            gc = kwargs.get("generation_config")
            if gc is not None:  # TRL passes its GenerationConfig: make it agree with the kwargs
                gc.min_new_tokens = gc.max_new_tokens = new_tokens
            out = inner(*args, **kwargs)
            seqs = out.sequences if hasattr(out, "sequences") else out
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and seqs.dim() == 2:
                self.generated_tokens += (seqs.shape[1] - ids.shape[1]) * seqs.shape[0]
            self.generate_calls += 1
            return out

        model.generate = generate


def peak_memory(device: str) -> dict:
    """Peak RSS of this process (CPU; ru_maxrss, the whole process: one contender per process) or
    torch.cuda.max_memory_allocated (CUDA)."""
    import resource

    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out
