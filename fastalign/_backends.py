"""Which backends can run here, and choosing one for a call.

Backends: "torch" (eager reference, always), "cpp" (fastalign._C on CPU tensors), "cuda"
(fastalign._C built with CUDA, on CUDA tensors), "triton" (Triton kernels: CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1). Nothing here initialises CUDA at import time.
"""

from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("torch", "cpp", "cuda", "triton")

_C = None
_C_ERROR: str | None = None


def _load_extension() -> None:
    """Import fastalign._C unless it was built for another torch (then say which)."""
    global _C, _C_ERROR
    try:
        from fastalign import _build_info as info
    except ImportError:
        _C_ERROR = "fastalign._C is not built (install from source with `pip install --no-build-isolation .`)"
        return
    if info.TORCH_VERSION is None:
        _C_ERROR = "fastalign was installed without its extension (FASTALIGN_NO_EXTENSION=1)"
        return
    built, running = info.TORCH_VERSION.split("+")[0], torch.__version__.split("+")[0]
    if built != running:
        _C_ERROR = (
            f"fastalign._C was built for torch {info.TORCH_VERSION} but torch {torch.__version__} is "
            f"running; install torch=={built} or rebuild fastalign against this torch"
        )
        return
    if info.WITH_CUDA and torch.version.cuda is None:
        _C_ERROR = (
            f"fastalign._C was built with CUDA {info.CUDA_VERSION} kernels but this torch is a CPU build; "
            "install a CUDA build of torch or rebuild with FASTALIGN_WITH_CUDA=0"
        )
        return
    try:
        _C = importlib.import_module("fastalign._C")
    except (ImportError, OSError) as exc:  # e.g. missing symbol: a torch ABI mismatch
        _C_ERROR = f"fastalign._C failed to load: {exc}"


_load_extension()


def extension():
    """The loaded fastalign._C module, or None."""
    return _C


def _triton_reason(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if device_type not in ("cpu", "cuda"):
        return f"Triton does not serve {device_type} tensors"
    return None


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if `backend` can run tensors on `device_type`, else why not."""
    if backend == "torch":
        return None
    if backend == "cpp":
        if _C is None:
            return _C_ERROR
        return None if device_type == "cpu" else f"the cpp backend serves CPU tensors, not {device_type}"
    if backend == "cuda":
        if _C is None:
            return _C_ERROR
        from fastalign import _build_info as info

        if not info.WITH_CUDA:
            return "fastalign._C was built without CUDA kernels (CPU-only torch or no CUDA toolkit at build time)"
        if device_type != "cuda":
            return f"the cuda backend serves CUDA tensors, not {device_type}"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        return None
    if backend == "triton":
        return _triton_reason(device_type)
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


# Preference order of "auto", per device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


def resolve(backend: str, device: torch.device, supported=BACKENDS, op: str = "op") -> str:
    """The backend to run `op` with: `backend` itself if it can serve `device` (else a clear
    error), or for "auto" the fastest usable one. FASTALIGN_BACKEND replaces "auto"."""
    source = "backend"
    if backend == "auto":
        backend = os.environ.get("FASTALIGN_BACKEND", "auto") or "auto"
        source = "the environment variable FASTALIGN_BACKEND"
    if backend == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if candidate in supported and unavailable_reason(candidate, device.type) is None:
                return candidate
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: {source} must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend not in supported:
        raise ValueError(f"{op}: backend {backend!r} is not implemented for this op (it has {supported})")
    reason = unavailable_reason(backend, device.type)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} cannot run {device.type} tensors here: {reason}")
    return backend


def backends() -> dict:
    """For each backend: {"usable": bool, "reason": str | None, "devices": [...]} -- usable if it
    can serve at least one device type here; reason says why not (or what it lacks)."""
    report = {}
    cuda_type = ["cuda"] if torch.version.cuda is not None or torch.cuda.is_available() else []
    for name in BACKENDS:
        devices, reasons = [], []
        for dev in ["cpu"] + cuda_type if name != "cuda" else ["cuda"]:
            r = unavailable_reason(name, dev)
            (devices.append(dev) if r is None else reasons.append(r))
        report[name] = {"usable": bool(devices), "devices": devices, "reason": "; ".join(dict.fromkeys(reasons)) or None}
    return report
