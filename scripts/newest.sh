#!/usr/bin/env bash
# Tests fastalign against the newest versions of its dependencies instead of constraints.txt:
# sets up .venv-newest without constraints, reports every package whose version moved from
# constraints.txt, then runs the suite (minus the slow tests) there. With --write, and only if
# the suite passed, the new versions replace constraints.txt. Extra args go to pytest.
#   bash scripts/newest.sh                     # report + test
#   FASTALIGN_TORCH=torch==2.13.0 bash scripts/newest.sh   # newest of everything but torch
set -euo pipefail
cd "$(dirname "$0")/.."
WRITE=0
if [ "${1:-}" = --write ]; then WRITE=1; shift; fi
FASTALIGN_VENV=.venv-newest FASTALIGN_UNLOCKED=1 bash scripts/setup.sh
. .venv-newest/bin/activate
pip freeze --all --exclude-editable 2>/dev/null | grep -v "^pip==" | sed -E 's/^(torch==[^+]+)\+cpu$/\1/' \
  > .venv-newest/freeze.txt
echo "== what moved from constraints.txt (locked -> newest) =="
python - <<'PY'
import re
def pins(path):
    out = {}
    for line in open(path):
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out
old, new = pins("constraints.txt"), pins(".venv-newest/freeze.txt")
moved = [(k, old.get(k, "-"), new.get(k, "-")) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
for k, a, b in moved:
    print(f"  {k:28s} {a:>14s} -> {b}")
print(f"  ({len(moved)} moved)" if moved else "  nothing moved")
PY
export TRITON_CACHE_DIR="$PWD/.cache/triton-newest" TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor-newest"
python -m pytest -q --timeout=900 -m "not slow" "$@"
if [ "$WRITE" = 1 ]; then
  { sed -n '/^#/p' constraints.txt; cat .venv-newest/freeze.txt; } > constraints.txt.new
  mv constraints.txt.new constraints.txt
  echo "constraints.txt now holds the versions above"
fi
