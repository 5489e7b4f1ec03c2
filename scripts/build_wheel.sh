#!/usr/bin/env bash
# Builds a fastalign wheel (with its compiled extension fastalign/_C*.so and fastalign/_build_info.py,
# which records the torch / CUDA it was built for) into $OUT (default: dist/).
#
#   bash scripts/build_wheel.sh                      # CPU wheel against .venv's torch
#   PYTHON=/path/to/venv/bin/python OUT=/tmp/w \
#   FASTALIGN_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" bash scripts/build_wheel.sh   # CUDA wheel
#
# PYTHON: the interpreter whose torch the wheel is built against (default: .venv/bin/python,
# else python3); it needs setuptools, wheel and ninja. Extra environment (FASTALIGN_WITH_CUDA,
# TORCH_CUDA_ARCH_LIST, MAX_JOBS, FASTALIGN_NO_EXTENSION) goes to setup.py.
#
# Where it builds: in the checkout when PYTHON's torch is the one the checkout's extension was
# built for (fastalign/_build_info.py), so the objects of the in-place build in build/ are reused
# (seconds instead of minutes); otherwise in a temporary copy of the tracked sources, so that a
# build against another torch never rewrites the checkout's build/ or _build_info.py (which would
# make the checkout refuse its own _C). The temporary copy is deleted on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-$ROOT/dist}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MAX_JOBS=${MAX_JOBS:-2}

target=$("$PYTHON" -c 'import torch; print(torch.__version__)')
recorded=$(sed -n "s/^TORCH_VERSION = '\(.*\)'$/\1/p" fastalign/_build_info.py 2>/dev/null || true)
if [ -n "${FASTALIGN_WITH_CUDA:-}${TORCH_CUDA_ARCH_LIST:-}${FASTALIGN_NO_EXTENSION:-}" ] || [ "$target" != "$recorded" ]; then
  SRC=$(mktemp -d "${TMPDIR:-/tmp}/fastalign-src.XXXXXX")
  trap 'rm -rf "$SRC"' EXIT
  git ls-files -z | xargs -0 cp --parents -t "$SRC"   # tracked sources only: no build/, no _C
  echo "build_wheel: building against torch $target in a clean copy ($SRC)"
else
  SRC=$ROOT
  echo "build_wheel: building against torch $target in the checkout (reusing build/)"
fi

cd "$SRC"
# Others may be building the extension in this checkout: take the same lock as they do.
LOCK=(); if command -v flock >/dev/null && [ "$SRC" = "$ROOT" ]; then LOCK=(flock /tmp/fastalign_build.lock); fi
"${LOCK[@]}" "$PYTHON" -m pip wheel . --no-build-isolation --no-deps --disable-pip-version-check -q -w "$OUT" \
  2> >(grep -v -e "^WARNING: Location" -e "project.license" >&2)

# The wheel must carry the extension and the build record.
"$PYTHON" - "$OUT" <<'EOF'
import glob, os, sys, zipfile
wheels = sorted(glob.glob(os.path.join(sys.argv[1], "fastalign-*.whl")), key=os.path.getmtime)
if not wheels:
    sys.exit("build_wheel: no wheel was written")
names = zipfile.ZipFile(wheels[-1]).namelist()
so = [n for n in names if n.startswith("fastalign/_C") and n.endswith(".so")]
if "fastalign/_build_info.py" not in names:
    sys.exit(f"build_wheel: {wheels[-1]} lacks fastalign/_build_info.py")
if not so and os.environ.get("FASTALIGN_NO_EXTENSION") != "1":
    sys.exit(f"build_wheel: {wheels[-1]} lacks the compiled extension fastalign/_C*.so")
info = zipfile.ZipFile(wheels[-1]).read("fastalign/_build_info.py").decode()
print(f"build_wheel: {wheels[-1]}")
print("  " + "\n  ".join(l for l in info.splitlines() if not l.startswith("#")))
EOF
