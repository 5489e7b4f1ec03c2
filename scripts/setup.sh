#!/usr/bin/env bash
# Sets up everything fastalign needs in ./.venv (idempotent; fast when already done):
# torch (CPU build by default), Triton, the training/test extras, and fastalign itself built
# from source with its C++ extension (plus CUDA kernels when torch is a CUDA build and nvcc
# is present).  FASTALIGN_TORCH overrides the torch requirement, e.g. FASTALIGN_TORCH=torch
# for the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# pip, quiet, minus this machine's harmless "Location ... is ignored" warnings; fails if pip fails
pip_q() {
  local out
  if ! out=$(pip install --disable-pip-version-check -q "$@" 2>&1); then echo "$out"; return 1; fi
  echo "$out" | grep -v "^WARNING: Location" || true
}
if ! python -c "import torch" 2>/dev/null; then
  pip_q "${FASTALIGN_TORCH:-torch==2.13.0}"
fi
pip_q setuptools wheel ninja numpy triton pytest pytest-benchmark pytest-timeout \
  "transformers>=4.45" safetensors pyyaml tqdm matplotlib "trl==1.16.0"
python -c "import torch, triton, transformers" # fail loudly if an install above did not take
MAX_JOBS=${MAX_JOBS:-2} pip_q --no-build-isolation -e .
python -c "import fastalign, sys; from fastalign import _backends; sys.exit(0 if _backends.extension() else 'fastalign._C did not load: ' + str(_backends._C_ERROR))"
echo "fastalign is set up in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
