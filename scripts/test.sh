#!/usr/bin/env bash
# Runs the test suite as CI does: set up (idempotent), check that every CUDA source compiles
# with nvcc (sm_80, sm_90; no GPU needed), run pytest without the slow tests, then the slow
# tests (the >2^31-offset kernel test, the compiled-wheel round trip, the whole demo pipeline
# judged by its oracle, PPO and GRPO raising the oracle score), then the benchmark smoke run.
# Extra args go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# compiler caches (Triton, Inductor) stay inside the checkout
export TRITON_CACHE_DIR="$PWD/.cache/triton" TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor"
if [ -f .ci/compile_cuda.sh ]; then
  bash .ci/compile_cuda.sh
fi
python -m pytest -q --timeout=900 -m "not slow" "$@"
python -m pytest -q --timeout=1200 -m slow tests/test_logprobs.py tests/test_wheel.py tests/test_trainer.py tests/test_rl_algorithms.py
# the benchmark suite's one-minute smoke run: every case's code path, every target printed
python -m benchmarks --quick --out bench_out/ci
