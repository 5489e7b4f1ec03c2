"""The compiled extension's version guard, and the wheel round trip (slow).

fastalign._C is only imported when fastalign/_build_info.py (written by setup.py) says it was
built for the running torch; otherwise it is refused with a message that names the versions and
the torch backend keeps working. Each case runs in a child interpreter with a fake
fastalign._build_info placed in sys.modules before `import fastalign` (no other torch needed).

Bounds: the one numerical comparison (the torch fallback's log-probs) is exact by design, the same
torch op on the same values.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import sys, types, torch
info = types.ModuleType("fastalign._build_info")
info.TORCH_VERSION, info.CUDA_VERSION, info.WITH_CUDA, info.CUDA_ARCH_LIST = {fields}
sys.modules["fastalign._build_info"] = info
import fastalign
from fastalign import _backends
# the mismatched extension must not even be imported (importing it is what crashes on an ABI change)
assert _backends.extension() is None, "a mismatched _C was loaded"
assert "fastalign._C" not in sys.modules, "a mismatched _C was imported"
report = fastalign.backends()
assert not report["cpp"]["usable"] and not report["cuda"]["usable"], report
assert report["torch"]["usable"], report
x = torch.randn(3, 11, requires_grad=True)
y = torch.tensor([0, 5, 10])
lp = fastalign.gather_logprobs(x, y)  # auto falls back to the torch backend
# the torch backend is log_softmax(x / 1.0) gathered: x / 1.0 is exact, so it is this very
# computation on the same values -- bit for bit
torch.testing.assert_close(lp, torch.log_softmax(x.detach(), -1)[torch.arange(3), y], rtol=0, atol=0)
lp.sum().backward()
try:
    fastalign.gather_logprobs(x, y, backend="cpp")
except RuntimeError as exc:
    print("ERROR:", exc)
else:
    raise AssertionError("backend='cpp' ran with a refused extension")
print("REASON:", report["cpp"]["reason"])
"""


def _run_child(fields: str) -> str:
    code = textwrap.dedent(_CHILD).replace("{fields}", fields)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTALIGN_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_mismatched_torch_version_is_refused_with_versions():
    out = _run_child('"1.0.0+cu118", "11.8", False, None')
    reason = out.split("REASON:", 1)[1].strip()
    assert "built for torch 1.0.0+cu118" in reason
    assert f"torch {torch.__version__} is running" in reason
    assert "install torch==1.0.0" in reason  # says which torch to use
    assert "backend 'cpp' cannot run cpu tensors here" in out and "1.0.0+cu118" in out.split("ERROR:", 1)[1]


def test_cuda_extension_on_cpu_torch_is_refused():
    if torch.version.cuda is not None:
        pytest.skip("needs a CPU build of torch")
    version = repr(torch.__version__)
    out = _run_child(f'{version}, "13.0", True, "8.0;9.0"')
    reason = out.split("REASON:", 1)[1].strip()
    assert "built with CUDA 13.0 kernels" in reason and "CPU build" in reason


def test_matching_build_info_loads_extension():
    from fastalign import _backends

    try:
        from fastalign import _build_info as info
    except ImportError:
        pytest.skip("fastalign._C is not built here")
    if _backends.extension() is None:
        pytest.skip(f"fastalign._C not loaded: {_backends._C_ERROR}")
    assert info.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.slow
def test_wheel_roundtrip_script():
    """Build the wheel, install it into a fresh venv with torch and the training extras, run the
    smoke checks and the command line from outside the clone (demo at a reduced size, train on a
    packaged config, bench --quick, a user error): ~4 min for build and install when build/ holds
    the in-place build's objects (a cold compile adds 1-2 min on 2 cores), plus ~4 min of CLI."""
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "wheel_roundtrip.sh")], cwd=ROOT,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "wheel round trip OK" in res.stdout
