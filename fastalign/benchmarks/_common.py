"""The benchmark harness shared by every suite: cases, contenders, timing, peak memory.

A *case* is one op in one mode (fwd / fwd+bwd) at one shape and dtype, with its inputs and a set
of *contenders* (fastalign backends, eager PyTorch, torch.compile of the eager code, peers such as
TRL, Liger, verl). Each contender is a builder `build(inputs) -> fn`, where `fn()` runs the case
once and returns its outputs; a builder raises `Skip(reason)` when it cannot run here (peer not
installed, no GPU, op not built...). The same case definitions drive the runner
(`python -m benchmarks`) and the pytest-benchmark suites (`pytest fastalign/benchmarks/bench_*.py`,
_pytest_suite.py).

Timing (CPU): the contenders of a case are *interleaved*: every round runs each contender once
(in a shuffled order), so a burst of load from other processes on a shared machine hits all of
them alike; the reported time is the median over rounds. Timing (CUDA): triton.testing.do_bench
medians (CUDA events), falling back to a CUDA-event loop without Triton.

Peak memory (CPU): torch has no max_memory_allocated for the CPU, and tracemalloc does not see
torch's allocations, so each family's cases are re-run in a fresh child process (`_memory.py`)
that (1) makes glibc return every freed block > 64 KiB to the OS at once
(MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), so the resident set size follows the
live tensors, (2) warms each contender up (first-call and compile costs), (3) resets the kernel's
peak-RSS counter (write 5 to /proc/self/clear_refs), reads VmRSS with the inputs allocated, runs
the contender once and reads VmHWM. Extra peak = VmHWM - VmRSS: everything the call allocates on
top of its inputs, outputs and gradients included, at page (4 KiB) resolution.
Peak memory (CUDA): torch.cuda.max_memory_allocated() minus memory_allocated() before the call.
"""

from __future__ import annotations

import gc
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import fastalign
from fastalign import _backends


class Skip(Exception):
    """A contender (or case) cannot run here; the message says why."""


@dataclass
class Case:
    family: str  # suite name: logprobs, rl, preference, linear_logprobs
    op: str  # e.g. gather_logprobs
    mode: str  # "fwd" or "fwd+bwd"
    params: dict  # shape / dtype / options, printed in tables
    size: float  # x axis of the plots (e.g. tokens * V)
    size_name: str  # its label
    make_inputs: Callable[[str], dict]  # device -> inputs
    contenders: dict  # name -> build(inputs) -> fn
    fastalign: tuple  # the contender names that are fastalign
    group: str = ""  # plot group (one line per contender over the sizes of a group)
    rounds: int | None = None  # timing rounds, if not the runner's default (slow cases: fewer)

    @property
    def id(self) -> str:
        return f"{self.op}/{self.mode}/" + ",".join(f"{k}={v}" for k, v in self.params.items())

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())


# ---- small helpers the suites share -------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peer(module: str, attr: str | None = None):
    """Import an optional peer (TRL, Liger, ...) or raise Skip saying it is not installed."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a peer that breaks on import here
        raise Skip(f"{module.split('.')[0]} not installed ({type(exc).__name__})") from None
    if attr is None:
        return mod
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise Skip(f"{module}.{attr} not found in this version") from None


def fastalign_backend(backend: str, device: str):
    """Raise Skip unless the fastalign backend can serve `device` here."""
    reason = _backends.unavailable_reason(backend, torch.device(device).type)
    if reason is not None:
        raise Skip(reason)


def fastalign_op(name: str):
    """fastalign.<name>, or Skip if that op has not landed yet."""
    fn = getattr(fastalign, name, None)
    if fn is None:
        raise Skip(f"fastalign.{name} does not exist yet")
    return fn


def compiled(fn):
    """torch.compile(fn), or Skip where torch.compile cannot work (no C++ compiler, no Triton on
    CUDA, an unsupported Python). The first call (compilation) happens in the warm-up."""
    if not hasattr(torch, "compile"):
        raise Skip("torch.compile is not available")
    try:
        import torch._dynamo as dynamo  # (a plain `import torch._dynamo` would make torch local here)

        # one eager function is compiled for every shape/dtype/grad mode of a sweep; past the
        # default limit (8) Dynamo silently falls back to eager, which would be measured as "compile"
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))
        return torch.compile(fn)
    except Exception as exc:  # e.g. RuntimeError on an unsupported Python version
        raise Skip(f"torch.compile unavailable: {exc}") from None


def fastalign_backends(device: str) -> tuple:
    """The fastalign backends a suite measures on `device`."""
    return ("cuda", "triton") if device.startswith("cuda") else ("cpp",)


def no_grad(f, *args):
    """fn() for a forward-only call f(*args), without autograd."""
    def fwd():
        with torch.no_grad():
            return f(*args)

    return fwd


def grad_of(outputs, wrt, grad_outputs):
    """Backward via autograd.grad (fresh gradients, no accumulation into .grad)."""
    return torch.autograd.grad(outputs, wrt, grad_outputs)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- timing ---------------------------------------------------------------------------------------


@dataclass
class Timed:
    times: list = field(default_factory=list)  # seconds per call, one per round
    error: str | None = None


def _call_time(fn, device: str, inner: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        out = fn()
    sync(device)
    dt = (time.perf_counter() - t0) / inner
    del out
    return dt


def build_contenders(case: Case, inputs: dict, only=None):
    """name -> fn for the runnable contenders, and name -> note for the rest."""
    fns, notes = {}, {}
    for name, build in case.contenders.items():
        if only is not None and name not in only:
            continue
        try:
            fns[name] = build(inputs)
        except Skip as exc:
            notes[name] = f"skipped: {exc}"
        except Exception as exc:  # a broken contender must not stop the suite; recorded as failed
            notes[name] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    return fns, notes


def warm_up(fns: dict, notes: dict, device: str, calls: int = 2) -> dict:
    """Calls each contender `calls` times (compilation, first-touch, lazy init). A contender that
    raises is dropped with the error as its note. Returns name -> seconds of the last call."""
    last = {}
    for name in list(fns):
        try:
            for _ in range(calls):
                last[name] = _call_time(fns[name], device, 1)
        except Exception as exc:  # a peer or torch.compile failing here must not stop the suite
            notes[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            del fns[name]
        gc.collect()
    return last


def time_interleaved(fns: dict, device: str, rounds: int, min_time: float, first: dict, rewarm: bool = True) -> dict:
    """Seconds per call of each contender, one entry per round, measured in interleaved rounds.

    rewarm: each timed call is preceded by one untimed call of the same contender. On a VM with a
    memory balloon (the dev box: virtio_balloon + DAMON) memory freed for a moment goes back to the
    host and is slow to touch again (the figures: benchmarks/RESULTS.md, "Machine and method"), so
    without it every contender would pay for re-faulting its memory after the others ran ("cold");
    with it, each timed call sees its own steady state, as in a loop ("warm").
    `python -m benchmarks --cold` measures the cold way."""
    inner = {n: max(1, math.ceil(min_time / max(first[n], 1e-7))) for n in fns}
    times = {n: [] for n in fns}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for n in order:
            if rewarm:
                _call_time(fns[n], device, 1)
            times[n].append(_call_time(fns[n], device, inner[n]))
    return times


def time_cuda(fns: dict, rep_ms: int = 100) -> dict:
    """do_bench medians (seconds) on CUDA; a CUDA-event loop if Triton is missing."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    out = {}
    for n, fn in fns.items():
        if do_bench is not None:
            ms = do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
            out[n] = [ms / 1e3]
        else:
            ts = []
            for _ in range(20):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e) / 1e3)
            out[n] = ts
    return out


def summarize(times: list) -> dict:
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [med, med, med]
    return {"median_s": med, "min_s": min(times), "q1_s": q[0], "q3_s": q[2], "rounds": len(times)}


# ---- peak memory ----------------------------------------------------------------------------------


def _proc_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def cpu_rss_tracking_ok() -> str | None:
    """None if the peak-RSS method works in this process, else why not."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        return "the process was not started with MALLOC_MMAP_THRESHOLD_ (freed memory would stay resident)"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_kb("VmHWM")
    except OSError as exc:
        return f"cannot reset the peak RSS (/proc/self/clear_refs): {exc}"
    return None


def cpu_extra_peak(fn) -> int:
    """Bytes of peak RSS above the RSS before the call (see the module docstring)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _proc_kb("VmRSS")
    out = fn()
    peak = _proc_kb("VmHWM")
    del out
    gc.collect()
    return max(0, peak - before) * 1024


def cuda_extra_peak(fn) -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - before)


# ---- results of one case --------------------------------------------------------------------------


def case_record(case: Case) -> dict:
    return {
        "family": case.family, "op": case.op, "mode": case.mode, "params": case.params, "id": case.id,
        "size": case.size, "size_name": case.size_name, "group": case.group or case.op,
        "fastalign": list(case.fastalign), "contenders": {},
    }


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:.1f}"


def fmt_time(s) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"
