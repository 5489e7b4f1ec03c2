#!/usr/bin/env bash
# Runs the test suite as CI does: set up (idempotent), check that every CUDA source compiles
# with nvcc (sm_80, sm_90; no GPU needed), run pytest without the slow tests, the kernel
# comparisons once more at the narrowest ISA on one thread, then the slow
# tests (the >2^31-offset kernel test, the compiled-wheel round trip, the whole demo pipeline
# judged by its oracle, PPO, GRPO and the critic-free family -- rloo, dapo, GRPO with the gspo and
# cispo losses, a simulated engine mismatch with and without TIS -- raising the oracle score
# (tests/test_rl_family.py's slow tests: every one in that file runs), online DPO beating SFT and
# drifting longer under a length-biased judge, the general DPO Triton kernels compiled for sm_90,
# SmolLM2 and its shortened demo recipe), then the benchmark smoke run.
# Extra args go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# compiler caches (Triton, Inductor) stay inside the checkout
export TRITON_CACHE_DIR="$PWD/.cache/triton" TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor"
# converted pretrained models (fastalign/models/converted.py) too
export FASTALIGN_CACHE_DIR="$PWD/.cache/fastalign"
if [ -f .ci/compile_cuda.sh ]; then
  bash .ci/compile_cuda.sh
fi
python -m pytest -q --timeout=900 -m "not slow" "$@"
# the numerics matrix's cheapest cell (scripts/numerics_matrix.sh runs them all): the kernel
# comparisons again at the narrowest ISA (torch's and fastalign's) on one thread, with MKL on
# its reproducible path -- another summation order than the run above, same derived bounds
MKL_CBWR=COMPATIBLE FASTALIGN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 \
  python -m pytest -q --timeout=900 -m "not slow" -p no:cacheprovider -k "not triton and not cuda" \
  tests/test_logprobs.py tests/test_linear_logprobs.py tests/test_ppo.py tests/test_gae.py tests/test_kl_whiten.py \
  tests/test_preference.py tests/test_peer_numerics.py
python -m pytest -q --timeout=1200 -m slow tests/test_logprobs.py tests/test_wheel.py tests/test_trainer.py tests/test_rl_algorithms.py tests/test_rl_family.py tests/test_sampling.py \
  tests/test_pretrained.py tests/test_demo_pretrained.py tests/test_dpo_loss_types.py tests/test_online_dpo.py
# the benchmark suite's one-minute smoke run: every case's code path, every target printed
python -m benchmarks --quick --out bench_out/ci
