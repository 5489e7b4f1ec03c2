"""Optional peers (TRL, Liger-Kernel), imported lazily; every getter raises Skip with the reason
when the peer is missing. Peer code is only *called*, never copied: the reference loops that
TRL and verl write inline (GAE) are written out below from their formulas (tests/test_gae.py
checks fastalign.gae against them)."""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from fastalign.benchmarks._common import Skip


def trl_logprob_functions():
    """(selective_log_softmax(logits, index), selective_log_softmax_and_entropy(logits, index))
    as TRL's trainers call them. On CUDA TRL routes both to its fused Triton kernel
    (trl/kernels/logprob_entropy.py); on the CPU to its row-looped torch code.

    Where `trl.trainer.utils` cannot be imported (e.g. a GPU machine without transformers), the
    kernel module is loaded from the installed TRL by file path: it needs only torch and Triton."""
    try:
        from trl.trainer import utils

        return (utils.selective_log_softmax,
                lambda x, i: utils.selective_log_softmax_and_entropy(x, i))
    except Exception as exc:  # ImportError, or TRL's own dependency checks
        first_error = f"{type(exc).__name__}: {exc}"
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise Skip("TRL not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "kernels", "logprob_entropy.py")
    if not os.path.exists(path):
        raise Skip(f"trl.trainer.utils failed to import ({first_error[:120]}) and {path} is absent")
    kspec = importlib.util.spec_from_file_location("_trl_logprob_entropy", path)
    mod = importlib.util.module_from_spec(kspec)
    try:
        kspec.loader.exec_module(mod)
    except Exception as exc:
        raise Skip(f"TRL's logprob kernel failed to load: {type(exc).__name__}: {exc}") from None
    fused = mod.selective_log_softmax_and_entropy
    return (lambda x, i: fused(x, i)[0]), (lambda x, i: fused(x, i))


def trl_chunked_logprob():
    """TRL's chunked hidden -> logprob function (ChunkedLogProbFunction.apply(hidden, weight,
    bias, targets, temperature, chunk_size)), used by its trainers to avoid the full logits."""
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except Exception as exc:
        raise Skip(f"TRL's ChunkedLogProbFunction not importable ({type(exc).__name__})") from None
    # outputs=(): log-probabilities only (no entropy/statistics), as for a plain logprob pass
    return lambda h, w, t: ChunkedLogProbFunction.apply(h, w, None, t, 1.0, chunk, None, 1.0, ())[0]


def liger_function(name: str, device: str):
    """liger_kernel.transformers.functional.<name> (e.g. liger_cross_entropy,
    liger_fused_linear_cross_entropy); Skip off CUDA or where Liger-Kernel is missing."""
    if not device.startswith("cuda"):
        raise Skip("Liger-Kernel runs on CUDA only")
    try:
        return getattr(importlib.import_module("liger_kernel.transformers.functional"), name)
    except Exception as exc:
        raise Skip(f"Liger-Kernel not installed ({type(exc).__name__})") from None


# ---- the peers' GAE loops, written from their code (not imported) ---------------------------------


def trl_gae_loop(rewards, values, gamma, lam):
    """TRL PPOTrainer's GAE: the reverse loop without a mask (values zero-filled past the end by
    the caller)."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


def verl_gae_loop(rewards, values, response_mask, gamma, lam):
    """verl core_algos.compute_gae_advantage_return (multi-turn variant), before its whitening:
    value and advantage carried through masked steps by multiplying with the mask."""
    nextvalues = 0
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values
