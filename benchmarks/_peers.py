"""Optional peers (TRL, Liger-Kernel), imported lazily; every getter raises Skip with the reason
when the peer is missing. Peer code is only *called*, never copied: the reference loops that
TRL and verl write inline (GAE) are written out locally in bench_rl.py from their formulas."""

from __future__ import annotations

import importlib.util

from benchmarks._common import Skip


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
    import os

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


def liger_cross_entropy(device: str):
    if not device.startswith("cuda"):
        raise Skip("Liger-Kernel runs on CUDA only")
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy as ce
    except Exception as exc:
        raise Skip(f"Liger-Kernel not installed ({type(exc).__name__})") from None
    return ce


def liger_fused_linear_cross_entropy(device: str):
    if not device.startswith("cuda"):
        raise Skip("Liger-Kernel runs on CUDA only")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as flce
    except Exception as exc:
        raise Skip(f"Liger-Kernel not installed ({type(exc).__name__})") from None
    return flce
