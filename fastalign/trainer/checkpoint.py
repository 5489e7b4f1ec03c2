"""Checkpoints: written atomically, complete enough for an exact resume.

Layout of `<output_dir>/checkpoints/step-000123/`:
    <role>/            every trainable model via save_pretrained (safetensors weights + config,
                       and the tokenizer), so a stage's output loads directly into the next one
    optimizer.pt       optimizer state_dict (torch.save)
    scheduler.pt       LR scheduler state_dict
    rng.pt             torch CPU/CUDA, Python and NumPy RNG states
    trainer_state.json step, data cursor (epoch, position), algorithm, config
Everything is written into a temporary sibling directory which is then renamed into place with
os.replace, so a crash leaves either the previous checkpoint or the new one, never half of one;
`checkpoints/latest` (a one-line file, itself replaced atomically) names the newest.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil

import numpy as np
import torch

STATE_FILE = "trainer_state.json"


def _weights_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"no model.safetensors in {path}")
    return [single]


def load_weights(model, path: str) -> None:
    """Loads weights saved by save_pretrained into an existing model, in place (exact)."""
    from safetensors.torch import load_file

    from fastalign.models.heads import HEAD_FILE, ScalarHeadModel

    if isinstance(model, ScalarHeadModel):
        load_weights(model.lm, path)
        model.head.load_state_dict(load_file(os.path.join(path, HEAD_FILE)))
        return
    state = {}
    for f in _weights_files(path):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained leaves out tied copies (e.g. lm_head tied to the embedding)
    tied = {k for k in missing if _is_tied(model, k, state)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")


def _is_tied(model, key, state):
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(key)
    if p is None:
        return False
    return any(q is p and k in state for k, q in params.items() if k != key)


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


def save_checkpoint(root: str, step: int, *, models: dict, optimizer, scheduler, state: dict, tokenizer=None,
                    keep: int | None = None) -> str:
    """Writes checkpoint `root/step-{step:06d}` atomically and returns its path."""
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _quiet_hf()
    try:
        for role, model in models.items():
            d = os.path.join(tmp, role)
            model.save_pretrained(d)
            if tokenizer is not None:
                tokenizer.save_pretrained(d)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({**state, "step": step}, f, indent=1, default=str)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the latest
        raise
    if os.path.exists(final):  # same step saved again (e.g. Ctrl-C right after a save)
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _write_atomic(os.path.join(root, "latest"), name + "\n")
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _quiet_hf():
    # transformers draws a "Writing model shards" bar per save; the trainer has its own bar
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _write_atomic(path, text):
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under root, oldest first (temporary directories are ignored)."""
    return sorted(p for p in glob.glob(os.path.join(root, "step-*")) if os.path.exists(os.path.join(p, STATE_FILE)))


def resolve_checkpoint(spec: str, output_dir: str) -> str:
    """`latest` -> the newest complete checkpoint of output_dir; else the path itself."""
    if spec == "latest":
        root = os.path.join(output_dir, "checkpoints")
        pointer = os.path.join(root, "latest")
        if os.path.exists(pointer):
            with open(pointer) as f:
                p = os.path.join(root, f.read().strip())
            if os.path.exists(os.path.join(p, STATE_FILE)):
                return p
        found = list_checkpoints(root)
        if not found:
            raise FileNotFoundError(f"resume_from='latest' but there is no checkpoint under {root}")
        return found[-1]
    if not os.path.exists(os.path.join(spec, STATE_FILE)):
        raise FileNotFoundError(f"{spec} is not a fastalign checkpoint (no {STATE_FILE})")
    return spec


def load_checkpoint(path: str, *, models: dict, optimizer, scheduler) -> dict:
    """Restores models, optimizer, scheduler and RNG in place; returns the trainer state."""
    for role, model in models.items():
        load_weights(model, os.path.join(path, role))
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=False, map_location="cpu"))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False, map_location="cpu"))
    set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=False, map_location="cpu"))
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)
