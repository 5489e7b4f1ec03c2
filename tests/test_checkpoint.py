"""Checkpoints hold data, not code, and a damaged one is caught.

* a pickle crafted to run a command, put in place of each checkpoint file (with the manifest
  rewritten to match it, so the loader itself must refuse it), runs nothing: the marker file it
  would create never appears, and the files a resume reads give an error naming the file;
* the same for each .pt file of a checkpoint written before manifests (torch.load with
  weights_only=True), which otherwise still resumes exactly;
* truncating any file or flipping one bit in it is an error naming that file, and
  resume_from=latest then falls back to the previous checkpoint with a warning;
* a run killed with SIGKILL at three points of a checkpoint write (inside a state file, after the
  manifest before the rename, after the rename before `latest` moves) and resumed with
  resume_from=latest ends bit-identical to the uninterrupted run: losses and final weights.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch

from fastalign.algorithms import get_algorithm
from fastalign.data.synthetic import SyntheticTask
from fastalign.trainer import Trainer
from fastalign.trainer import checkpoint as ckpt
from fastalign.trainer.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
# the files a resume reads (the model config and tokenizer files are read by the next stage's
# from_pretrained, which parses them as JSON / tokenizer files, never as pickles)
READ_ON_RESUME = ("optimizer.json", "optimizer.safetensors", "scheduler.json", "rng.json", "rng.safetensors",
                  "trainer_state.json", "policy/model.safetensors")


def make_trainer(out, **kw):
    """The tiny SFT run of these tests (also imported by the child processes below)."""
    from fastalign.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    data = get_algorithm("sft")().encode(SyntheticTask().demonstrations(32, 0), tok, 64, Counter())
    cfg = dict(output_dir=str(out), max_steps=6, batch_size=4, grad_accum=1, lr=3e-3, progress=False, plot=False,
               warmup_steps=1, save_every=2, save_total_limit=5)
    cfg.update(kw)
    return Trainer(get_algorithm("sft")(), {"policy": tiny_model(tok, seed=0, **TINY)}, tok, data, None, cfg)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def _weights(ckpt_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt_dir, "policy", "model.safetensors"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("full")
    make_trainer(out).fit()
    return out


def _copy_ckpt(run, tmp_path, step=4):
    out = tmp_path / "out"
    src = os.path.join(run, "checkpoints", f"step-{step:06d}")
    dst = out / "checkpoints" / f"step-{step:06d}"
    shutil.copytree(src, dst)
    return out, str(dst)


def _resume(out, spec):
    return make_trainer(out, resume_from=spec, max_steps=6).fit()


def _evil_pickle(marker, protocol=2):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"state": Evil()}, protocol=protocol)


def _rewrite_manifest(ckpt_dir):
    from fastalign.trainer import manifest

    os.remove(os.path.join(ckpt_dir, "manifest.json"))
    manifest.write(ckpt_dir)


def _all_files(ckpt_dir):
    return sorted(os.path.relpath(os.path.join(d, n), ckpt_dir) for d, _, ns in os.walk(ckpt_dir) for n in ns
                  if n != "manifest.json")


def test_resumed_run_matches_and_files_are_data(run, tmp_path):
    out, c = _copy_ckpt(run, tmp_path)
    assert set(READ_ON_RESUME) <= set(_all_files(c))
    assert not [f for f in _all_files(c) if f.endswith((".pt", ".pkl", ".bin", ".pickle"))]
    _resume(out, "latest")
    assert _losses(out) == _losses(run)[4:]
    final = ckpt.list_checkpoints(str(out / "checkpoints"))[-1]
    full = _weights(os.path.join(run, "checkpoints", "step-000006"))
    assert all(torch.equal(v, full[k]) for k, v in _weights(final).items())


def test_malicious_pickle_in_any_file_runs_no_code(run, tmp_path):
    marker = tmp_path / "PWNED"
    base, c0 = _copy_ckpt(run, tmp_path)
    files = _all_files(c0)
    for rel in files:
        out = tmp_path / rel.replace("/", "_")
        shutil.copytree(base, out)
        c = str(out / "checkpoints" / "step-000004")
        with open(os.path.join(c, rel), "wb") as f:
            f.write(_evil_pickle(marker))
        _rewrite_manifest(c)  # the manifest vouches for it: the loader itself must refuse it
        if rel in READ_ON_RESUME:
            with pytest.raises(CheckpointError, match=rel.split("/")[-1].replace(".", r"\.")):
                _resume(out, c)
        else:
            _resume(out, c)  # a file the resume never reads
        assert not marker.exists(), f"a pickle in {rel} ran code"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the crafted newer-protocol pickles
def test_legacy_pt_checkpoint_resumes_and_refuses_code(run, tmp_path):
    """A checkpoint in the layout written before manifests: optimizer.pt, scheduler.pt, rng.pt."""
    out, c = _copy_ckpt(run, tmp_path)
    for name in ("optimizer", "scheduler", "rng"):
        torch.save(ckpt._read_state(c, name), os.path.join(c, name + ".pt"))  # what torch.save wrote before
        for ext in (".json", ".safetensors"):
            if os.path.exists(os.path.join(c, name + ext)):
                os.remove(os.path.join(c, name + ext))
    os.remove(os.path.join(c, "manifest.json"))
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    with pytest.warns(UserWarning, match="no manifest.json"):
        _resume(out, "latest")
    assert _losses(out) == _losses(run)[4:]
    marker = tmp_path / "PWNED"
    for name, protocol in [(n, p) for n in ("optimizer", "scheduler", "rng") for p in (2, 5)]:
        o = tmp_path / f"evil-{name}-{protocol}"
        shutil.copytree(legacy, o)
        with open(o / "checkpoints" / "step-000004" / f"{name}.pt", "wb") as f:
            f.write(_evil_pickle(marker, protocol))
        # protocol 2 (torch.save's) names the refused callable; newer ones fail on an opcode first
        why = "system" if protocol == 2 else "Unsupported operand"
        with pytest.raises(CheckpointError, match=rf"{name}\.pt is not plain data.*{why}"):
            with pytest.warns(UserWarning, match="no manifest.json"):
                _resume(o, "latest")
        assert not marker.exists(), f"a pickle in {name}.pt ran code"


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_file_is_named_and_latest_falls_back(run, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(run, out)
    root = out / "checkpoints"
    newest = str(root / "step-000006")
    for rel in _all_files(newest):
        c = tmp_path / "one" / rel.replace("/", "_")
        shutil.copytree(newest, c)
        p = c / rel
        data = bytearray(p.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 3] ^= 0x10
        p.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=os.path.basename(rel).replace(".", r"\.")):
            ckpt.verify_checkpoint(str(c))
    # latest names a damaged checkpoint: skipped with a warning, the one before it is used
    p = os.path.join(newest, "optimizer.safetensors")
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) // 2)
        f.write(b"\x00\x01")
    with pytest.warns(UserWarning, match="skipping .*step-000006.*optimizer.safetensors"):
        assert ckpt.resolve_checkpoint("latest", str(out)) == str(root / "step-000004")
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        ckpt.resolve_checkpoint(newest, str(out))


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from fastalign.trainer import checkpoint as ckpt, manifest, state_files
    from tests.test_checkpoint import make_trainer

    point = {point!r}
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def arm(module, name, before):  # SIGKILL inside the step-4 checkpoint write
        real = getattr(module, name)
        def wrapped(*a, **k):
            hit = os.path.exists(os.path.join({out!r}, "checkpoints", "step-000002")) and (
                name != "_write_atomic" or "step-000004" in a[1])
            if hit and before:
                die()
            r = real(*a, **k)
            if hit and not before:
                die()
            return r
        setattr(module, name, wrapped)

    if point == "in-state-file":      # optimizer written, scheduler not yet
        real_save = state_files.save
        def save(obj, stem):
            if stem.endswith("scheduler") and os.path.exists(os.path.join({out!r}, "checkpoints", "step-000002")):
                open(stem + ".json", "w").write('{{"format": "fastalign-state-1", "da')  # half written
                die()
            return real_save(obj, stem)
        state_files.save = save
    elif point == "after-manifest":   # manifest written, directory not yet renamed
        arm(manifest, "write", before=False)
    else:                             # renamed into place, `latest` still names step 2
        arm(ckpt, "_write_atomic", before=True)
    make_trainer({out!r}).fit()
""")


@pytest.mark.parametrize("point", ["in-state-file", "after-manifest", "before-latest"])
def test_kill_during_checkpoint_write_then_resume_is_exact(run, tmp_path, point):
    out = str(tmp_path / "out")
    child = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, point=point, out=out)],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr[-2000:]  # it died by SIGKILL, where intended
    names = os.listdir(os.path.join(out, "checkpoints"))
    assert ("step-000004" in names) == (point == "before-latest"), names
    _resume(out, "latest")
    assert _losses(out) == _losses(run)
    final = ckpt.list_checkpoints(os.path.join(out, "checkpoints"))[-1]
    assert os.path.basename(final) == "step-000006"
    full = _weights(os.path.join(run, "checkpoints", "step-000006"))
    assert all(torch.equal(v, full[k]) for k, v in _weights(final).items())


def test_cli_refuses_a_crafted_checkpoint(tmp_path):
    """The issue's repro: `fastalign train sft ... trainer.resume_from=<a checkpoint whose
    scheduler file is a crafted pickle>` runs nothing and exits with the file named."""
    common = ["data.format=synthetic", "data.train_size=16", "data.eval_size=0", "data.max_length=48",
              "model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}",
              "trainer.device=cpu", "trainer.progress=false", "trainer.plot=false", "trainer.batch_size=2"]
    env = dict(os.environ, PYTHONPATH=ROOT)

    def train(out, *more):
        return subprocess.run([sys.executable, "-m", "fastalign", "train", "sft", *common, f"trainer.output_dir={out}",
                               *more], capture_output=True, text=True, timeout=300, env=env)

    assert train(tmp_path / "a", "trainer.max_steps=1").returncode == 0
    c = tmp_path / "a" / "checkpoints" / "step-000001"
    marker = tmp_path / "PWNED"
    (c / "scheduler.json").write_bytes(_evil_pickle(marker))
    _rewrite_manifest(str(c))
    p = train(tmp_path / "b", "trainer.max_steps=2", f"trainer.resume_from={c}")
    assert p.returncode != 0 and "scheduler.json is not a fastalign state file" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not marker.exists()
