#!/usr/bin/env bash
# Runs the whole test suite as CI does: set up (idempotent), check that every CUDA source
# compiles with nvcc (sm_80, sm_90; no GPU needed), then pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ -f .ci/compile_cuda.sh ]; then
  bash .ci/compile_cuda.sh
fi
python -m pytest -q --timeout=900 "$@"
