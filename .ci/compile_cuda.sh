#!/usr/bin/env bash
# Compile-only check of the CUDA sources: every csrc/cuda/*.cu to an object file with nvcc, for
# sm_80 and sm_90, against the headers of the installed torch and with the flags torch's
# CUDAExtension would use. Needs no GPU and no CUDA build of torch (the CPU wheel ships the
# ATen/cuda and c10/cuda headers), so CUDA code cannot rot unseen on CPU-only machines.
#
# Usage: bash .ci/compile_cuda.sh        (python from $PYTHON, else `python`; nvcc from $CUDA_HOME,
#                                          else /usr/local/cuda, else PATH; MAX_JOBS parallel jobs)
# Exit status: 0 when every file compiles; non-zero (and the failing files named) otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
CUDA_HOME="${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}}"
if [[ -x "$CUDA_HOME/bin/nvcc" ]]; then
  NVCC="$CUDA_HOME/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
else
  echo "compile_cuda: nvcc not found (looked in $CUDA_HOME/bin and PATH)" >&2
  exit 2
fi

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "compile_cuda: no csrc/cuda/*.cu files, nothing to compile"
  exit 0
fi

# Include paths, C++ standard and ABI of the installed torch, one per line.
mapfile -t TORCH_FACTS < <("$PYTHON" - <<'EOF'
import sysconfig
import torch
from torch.utils import cpp_extension

for p in cpp_extension.include_paths():
    print("-I" + p)
print("-I" + sysconfig.get_paths()["include"])
print("-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
# torch >= 2.10 headers need C++20 (cpp_extension passes -std=c++20), older ones C++17.
major, minor = (int(v) for v in torch.__version__.split(".")[:2])
print("-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17")
EOF
)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastalign_cu.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# A CPU wheel of torch lacks the one generated c10/cuda header; supply what a CUDA build
# generates (it only defines the shared-library export switch).
SHIM=()
TORCH_INC="${TORCH_FACTS[0]#-I}"
if [[ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  mkdir -p "$WORK/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$WORK/shim/c10/cuda/impl/cuda_cmake_macros.h"
  SHIM=(-I"$WORK/shim")
fi

# As torch.utils.cpp_extension.CUDAExtension + setup.py would compile them.
FLAGS=(
  -c -O3 -lineinfo
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  "${TORCH_FACTS[@]}" "${SHIM[@]}"
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -DFASTALIGN_WITH_CUDA
  --compiler-options -fPIC -Werror=all-warnings
)

echo "compile_cuda: $("$NVCC" --version | tail -1), ${#SOURCES[@]} file(s), torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
JOBS="${MAX_JOBS:-2}"
i=0
for src in "${SOURCES[@]}"; do
  # A bounded pool of background jobs; each leaves its log and, on failure, a marker file.
  while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || true; done
  name="$(basename "$src" .cu)"
  (
    if "$NVCC" "${FLAGS[@]}" -o "$WORK/$name.o" "$src" >"$WORK/$name.log" 2>&1; then
      echo "  ok      $src"
    else
      echo "  FAILED  $src"
      touch "$WORK/$name.failed"
    fi
  ) &
  i=$((i + 1))
done
wait

failed=0
for src in "${SOURCES[@]}"; do
  name="$(basename "$src" .cu)"
  if [[ -f "$WORK/$name.failed" ]]; then
    echo "---- nvcc errors in $src ----" >&2
    cat "$WORK/$name.log" >&2
    failed=$((failed + 1))
  fi
done
if [[ $failed -ne 0 ]]; then
  echo "compile_cuda: $failed of ${#SOURCES[@]} CUDA file(s) failed to compile" >&2
  exit 1
fi
echo "compile_cuda: all ${#SOURCES[@]} CUDA file(s) compile for sm_80 and sm_90"
