#!/usr/bin/env bash
# The numerics matrix: the kernel and trainer comparison tests under every summation order this
# CPU can produce -- fastalign's C++ kernels and torch's own at each ISA width
# (FASTALIGN_CPU_CAPABILITY / ATEN_CPU_CAPABILITY = default, avx2, avx512 where the CPU has it;
# `default` also switches MKL to its conditional-numerical-reproducibility code path) and with 1
# and 2 threads. The bounds the tests use are derived from the computation (tests/numerics.py),
# so every cell must pass on every x86-64 CPU. scripts/test.sh runs the cheapest cell (kernels,
# default ISA, 1 thread); this runs them all (about 11 minutes on 2 cores).
#   bash scripts/numerics_matrix.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export TRITON_CACHE_DIR="$PWD/.cache/triton" TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor"
FILES=(tests/test_logprobs.py tests/test_linear_logprobs.py tests/test_ppo.py tests/test_gae.py tests/test_kl_whiten.py
       tests/test_preference.py tests/test_peer_numerics.py tests/test_algorithms.py tests/test_trainer.py
       tests/test_distributed.py tests/test_trl_integration.py tests/test_integrations_transformers.py)
CAPS=(default avx2)
if grep -qw avx512f /proc/cpuinfo; then CAPS+=(avx512); fi
failed=()
for cap in "${CAPS[@]}"; do
  for threads in 1 2; do
    echo "== FASTALIGN_CPU_CAPABILITY=$cap ATEN_CPU_CAPABILITY=$cap threads=$threads =="
    cbwr=()
    if [ "$cap" = default ]; then cbwr=(MKL_CBWR=COMPATIBLE); fi
    if ! env "${cbwr[@]}" FASTALIGN_CPU_CAPABILITY=$cap ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$threads \
        python -m pytest -q --timeout=900 -m "not slow" -p no:cacheprovider -k "not triton and not cuda" \
        "${FILES[@]}" "$@"; then
      failed+=("$cap/$threads")
    fi
  done
done
if [ ${#failed[@]} -gt 0 ]; then echo "numerics matrix: FAILED in ${failed[*]}"; exit 1; fi
echo "numerics matrix: every cell passed (${CAPS[*]} x 1, 2 threads)"
