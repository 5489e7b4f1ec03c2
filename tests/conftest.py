"""Test configuration: which backends run here. (Error bounds: tests/numerics.py.)

Triton kernels run on the CPU under TRITON_INTERPRET=1 (set here before anything imports
Triton) when no GPU is visible; CUDA tests skip cleanly without a GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastalign  # noqa: E402
from fastalign import _backends  # noqa: E402


def backend_params(supported=("torch", "cpp", "triton", "cuda")):
    """pytest params (backend, device) for every backend that can run here; the others are
    reported as skipped with the reason."""
    params = []
    for name in supported:
        device = "cuda" if name == "cuda" else ("cuda" if torch.cuda.is_available() and name == "triton" else "cpu")
        reason = _backends.unavailable_reason(name, device)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def nvidia_compiler_available() -> bool:
    """Whether Triton has its NVIDIA backend here (it compiles PTX/cubin without a GPU)."""
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:  # no Triton, or an unusual build: nothing to compile with
        return False


requires_nvidia_compiler = pytest.mark.skipif(
    not nvidia_compiler_available(), reason="Triton has no NVIDIA compiler backend here"
)


def run_triton_compile_script(script: str, *, expect: str = "compiled", timeout: int = 300) -> None:
    """Runs `script` in a fresh Python without TRITON_INTERPRET, so @triton.jit compiles for real
    (the interpreter never exercises Triton's compiler: loop-carried types, constexpr rules, scan
    lowering), and asserts it printed `expect`."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0 and expect in out.stdout, out.stderr[-3000:]
