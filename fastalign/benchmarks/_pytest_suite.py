"""pytest-benchmark glue: `pytest fastalign/benchmarks/bench_<family>.py --benchmark-enable [-k ...]`.

Each bench file ends with `test_<name> = pytest_suite(cases)`: one test parametrized over
(case, contender). FASTALIGN_BENCH_QUICK=1 selects the tiny --quick shapes. pytest-benchmark does
not interleave contenders; for ratios on a noisy machine use the runner, `python -m benchmarks`.
pytest is imported only here, inside pytest_suite: the runner does not need it.
"""

from __future__ import annotations

import os

import torch

from fastalign.benchmarks._common import Skip, cuda_extra_peak

QUICK = os.environ.get("FASTALIGN_BENCH_QUICK") == "1"
DEVICE = os.environ.get("FASTALIGN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_suite(cases_fn):
    """The pytest test of a suite whose cases are `cases_fn(quick, device)`; None without pytest."""
    try:
        import pytest
    except ImportError:
        return None

    try:
        cases = cases_fn(QUICK, DEVICE)
        params = [pytest.param(c, n, id=f"{c.id}|{n}") for c in cases for n in c.contenders]
    except Skip as exc:
        params = [pytest.param(None, None, marks=pytest.mark.skip(reason=str(exc)), id="skipped")]

    @pytest.mark.parametrize("case,name", params)
    def test(benchmark, case, name):
        inputs = case.make_inputs(DEVICE)
        try:
            fn = case.contenders[name](inputs)
        except Skip as exc:
            pytest.skip(str(exc))
        benchmark.group = case.id
        if DEVICE.startswith("cuda"):
            def timed():
                out = fn()
                torch.cuda.synchronize()
                return out
        else:
            timed = fn
        benchmark.pedantic(timed, rounds=3 if QUICK else 7, warmup_rounds=1, iterations=1)
        if DEVICE.startswith("cuda"):
            benchmark.extra_info["extra_peak_bytes"] = cuda_extra_peak(fn)

    return test
