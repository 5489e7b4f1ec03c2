#!/usr/bin/env bash
# CI check of the compiled wheel: build it (scripts/build_wheel.sh), install it into a fresh
# virtual environment with only torch (the exact version the wheel records) and its
# dependencies, then, from outside the checkout, check that
#   - `fastalign info` runs and the cpp backend is usable (fastalign._C loaded from the wheel),
#   - gather_logprobs (forward + backward), gae and ppo_policy_loss on the cpp backend match
#     the torch reference,
#   - a _C built for another torch is refused with a message naming the versions, and the
#     torch backend still works,
#   - the command line works as a wheel user meets it: `fastalign demo` at a reduced size,
#     `fastalign train` on a packaged config by name, `fastalign bench --quick` (the suite ships
#     in the wheel; peers not installed are skipped), and a user error that exits with status 2,
#     one line on stderr and no traceback.
# Everything it writes lives in one mktemp directory, deleted on exit (build/ objects of the
# in-place build are reused, not removed). PYTHON / MAX_JOBS as for build_wheel.sh;
# FASTALIGN_TORCH overrides the torch requirement installed into the fresh venv.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastalign-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS

OUT=$WORK/dist bash "$ROOT/scripts/build_wheel.sh"
WHEEL=$(ls "$WORK"/dist/fastalign-*.whl)
t1=$SECONDS

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
TORCH_REQ=${FASTALIGN_TORCH:-torch==$("$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
ns = {}
exec(zipfile.ZipFile(sys.argv[1]).read("fastalign/_build_info.py").decode(), ns)
print(ns["TORCH_VERSION"])
EOF
)}
# --without-pip + ensurepip is what venv does anyway; keep it plain.
"$PYTHON" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
pip_q() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip_q "$TORCH_REQ"
# the training extras for demo/train, at the versions the suite passed with (torch is already
# the one the wheel records, or FASTALIGN_TORCH's: its pins are left out)
grep -vE '^(torch|triton|nvidia-)' "$ROOT/constraints.txt" > "$WORK/constraints.txt"
pip_q "$WHEEL[train]" -c "$WORK/constraints.txt"
t2=$SECONDS

cd "$WORK"   # not the checkout: `import fastalign` must find the installed wheel
"$WORK/venv/bin/fastalign" info
"$VPY" - <<'EOF'
import os, subprocess, sys, textwrap

import torch

import fastalign
from fastalign import _backends

here = os.path.dirname(fastalign.__file__)
assert here.startswith(sys.prefix), f"fastalign imported from {here}, not from the fresh venv {sys.prefix}"
assert _backends.extension() is not None, f"fastalign._C did not load: {_backends._C_ERROR}"
assert fastalign.backends()["cpp"]["usable"], fastalign.backends()["cpp"]

torch.manual_seed(0)
logits = torch.randn(3, 5, 1000, requires_grad=True)
labels = torch.randint(0, 1000, (3, 5))
labels[0, 0] = -100
out, grads = {}, {}
for backend in ("cpp", "torch"):
    lp, ent = fastalign.gather_logprobs(logits, labels, temperature=0.7, return_entropy=True, backend=backend)
    (g,) = torch.autograd.grad((lp * 1.3 + ent).sum(), logits)
    out[backend], grads[backend] = (lp, ent), g
torch.testing.assert_close(out["cpp"], out["torch"], rtol=1e-5, atol=1e-5)
torch.testing.assert_close(grads["cpp"], grads["torch"], rtol=1e-5, atol=1e-6)

r, v = torch.randn(4, 33), torch.randn(4, 33)
m = torch.rand(4, 33) > 0.2
torch.testing.assert_close(
    fastalign.gae(r, v, m, gamma=0.99, lam=0.95, backend="cpp"),
    fastalign.gae(r, v, m, gamma=0.99, lam=0.95, backend="torch"), rtol=1e-5, atol=1e-5)
lp, old, adv = torch.randn(4, 33, requires_grad=True), torch.randn(4, 33), torch.randn(4, 33)
a = fastalign.ppo_policy_loss(lp, old, adv, m, dual_clip=3.0, backend="cpp")[0]
b = fastalign.ppo_policy_loss(lp, old, adv, m, dual_clip=3.0, backend="torch")[0]
torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(torch.autograd.grad(a, lp)[0], torch.autograd.grad(b, lp)[0], rtol=1e-5, atol=1e-6)

# Refusal path, in a child: pretend the wheel was built for another torch.
child = textwrap.dedent("""
    import sys, types, torch
    info = types.ModuleType("fastalign._build_info")
    info.TORCH_VERSION, info.CUDA_VERSION, info.WITH_CUDA, info.CUDA_ARCH_LIST = "1.0.0+cpu", None, False, None
    sys.modules["fastalign._build_info"] = info
    import fastalign
    from fastalign import _backends
    assert _backends.extension() is None and "fastalign._C" not in sys.modules, "mismatched _C was imported"
    reason = fastalign.backends()["cpp"]["reason"]
    assert "1.0.0+cpu" in reason and torch.__version__ in reason and "torch==1.0.0" in reason, reason
    x = torch.randn(2, 7)
    y = torch.tensor([1, 6])
    torch.testing.assert_close(fastalign.gather_logprobs(x, y), torch.log_softmax(x, -1)[[0, 1], [1, 6]])
    print("refused as expected:", reason)
""")
subprocess.run([sys.executable, "-c", child], check=True)
print(f"wheel smoke check passed: fastalign {fastalign.__version__} from {here}, torch {torch.__version__}")
EOF
t3=$SECONDS

FA=$WORK/venv/bin/fastalign
"$FA" demo --output-dir "$WORK/demo" --set progress=false \
  --set "tiny={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}" --set max_new_tokens=8 \
  --set sft_examples=64 --set sft_steps=3 --set sft_batch_size=8 --set pref_prompts=32 --set oracle_length_bias=0.05 \
  --set rm_steps=3 --set dpo_steps=3 --set dpo_batch_size=8 --set ppo_steps=2 --set ppo_prompts_per_step=8 \
  --set eval_prompts=16 > "$WORK/demo.log"
tail -n 3 "$WORK/demo.log"
# grep without -q reads the whole listing: -q exits at the first match, and under pipefail the CLI
# then dies of a broken pipe when its output is longer than the pipe buffer holds at that moment
"$FA" configs | grep "^dpo_bundled " > /dev/null
"$FA" train dpo --config dpo_bundled trainer.max_steps=2 trainer.output_dir="$WORK/dpo" trainer.progress=false \
  | tee "$WORK/train.log"
grep -q "dpo: done at step 2" "$WORK/train.log"
"$FA" bench --quick --out "$WORK/bench" > "$WORK/bench.log"
tail -n 1 "$WORK/bench.log"
set +e
"$FA" train dpo --config dpo_bundled trainer.lr=-1 > "$WORK/err.out" 2> "$WORK/err.log"
status=$?
set -e
if [ "$status" != 2 ] || grep -q Traceback "$WORK/err.log" || [ "$(cat "$WORK/err.log")" != "fastalign: error: trainer.lr must be > 0, got -1" ]; then
  echo "user error: expected status 2 and one line, got $status:"; cat "$WORK/err.log"; exit 1
fi
echo "user error: status 2, $(cat "$WORK/err.log")"
t4=$SECONDS
echo "wheel round trip OK: build $((t1 - t0))s, venv+install $((t2 - t1))s, checks $((t3 - t2))s, CLI $((t4 - t3))s, total $((t4 - t0))s"
