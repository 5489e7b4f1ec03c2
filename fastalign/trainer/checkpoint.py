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


def _read_weights(path):
    from safetensors.torch import load_file

    state = {}
    for f in _weights_files(path):
        state.update(load_file(f))
    return state


def load_weights(model, path: str, *, sharded: bool = False) -> None:
    """Loads weights saved by save_pretrained into an existing model, in place (exact). With
    sharded=True the model is FSDP2-sharded: every rank reads the full weights and keeps its shard."""
    from safetensors.torch import load_file

    from fastalign.models.heads import HEAD_FILE, ScalarHeadModel

    if isinstance(model, ScalarHeadModel) and not sharded:
        load_weights(model.lm, path)
        model.head.load_state_dict(load_file(os.path.join(path, HEAD_FILE)))
        return
    state = _read_weights(path)
    if sharded:
        from fastalign.trainer import distributed as D

        if isinstance(model, ScalarHeadModel):
            state = {**{f"lm.{k}": v for k, v in state.items()},
                     **{f"head.{k}": v for k, v in load_file(os.path.join(path, HEAD_FILE)).items()}}
        missing, unexpected = D.load_full_model_state(model, state)
    else:
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
                    keep: int | None = None, model_states: dict | None = None, optimizer_state: dict | None = None,
                    distributed: bool = False) -> str:
    """Writes checkpoint `root/step-{step:06d}` atomically and returns its path.

    distributed=True (every rank calls it): rank 0 writes the models, optimizer, scheduler and
    state, every other rank only its RNG state (rng-rank<r>.pt); all return once the checkpoint
    is in place, and a failure on any rank raises on all of them. `model_states` (role -> full
    state dict) and `optimizer_state` replace the modules' and optimizer's own state dicts when
    they are sharded (FSDP2: gathered on rank 0 by the caller)."""
    from fastalign.trainer import distributed as D

    multi = distributed and D.is_initialized()
    main = not multi or D.is_main()
    name = f"step-{step:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-" + ("dist" if multi else str(os.getpid())))

    def agree(err):  # raise on every rank if any rank failed
        ok = D.all_agree(err is None) if multi else err is None
        if not ok:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the latest
            if err is not None:
                raise err
            raise RuntimeError(f"writing checkpoint {final} failed on another rank")

    err = None
    if main:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except BaseException as e:
            err = e
    agree(err)
    try:
        if main:
            _quiet_hf()
            for role, model in models.items():
                d = os.path.join(tmp, role)
                _save_model(model, d, None if model_states is None else model_states[role])
                if tokenizer is not None:
                    tokenizer.save_pretrained(d)
            torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state,
                       os.path.join(tmp, "optimizer.pt"))
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump({**state, "step": step}, f, indent=1, default=str)
        else:
            torch.save(rng_state(), os.path.join(tmp, f"rng-rank{D.rank()}.pt"))
    except BaseException as e:
        err = e
    agree(err)
    if main:
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
    if multi:
        D.barrier()  # nobody reads the checkpoint before it is in place
    return final


def _save_model(model, path, state_dict=None):
    """save_pretrained, from the module itself or from a given full state dict (FSDP2)."""
    if state_dict is None:
        model.save_pretrained(path)
        return
    from safetensors.torch import save_file

    from fastalign.models.heads import HEAD_FILE, HEAD_META, ScalarHeadModel

    if isinstance(model, ScalarHeadModel):
        model.lm.save_pretrained(path, state_dict={k[3:]: v for k, v in state_dict.items() if k.startswith("lm.")})
        save_file({k[5:]: v.contiguous() for k, v in state_dict.items() if k.startswith("head.")},
                  os.path.join(path, HEAD_FILE))
        with open(os.path.join(path, HEAD_META), "w") as f:
            json.dump({"class": "ScalarHeadModel"}, f)
    else:
        model.save_pretrained(path, state_dict=state_dict)


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


def load_checkpoint(path: str, *, models: dict, optimizer, scheduler, sharded: bool = False) -> dict:
    """Restores models, optimizer, scheduler and RNG in place; returns the trainer state. Under
    distribution every rank calls it (and reads the files); sharded=True for FSDP2 models. Each
    rank restores its own RNG state where the checkpoint has one (rng-rank<r>.pt), else rank 0's."""
    from fastalign.trainer import distributed as D

    for role, model in models.items():
        load_weights(model, os.path.join(path, role), sharded=sharded)
    opt_state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=False, map_location="cpu")
    if sharded:
        D.load_full_optimizer_state(models, optimizer, opt_state)
    else:
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False, map_location="cpu"))
    rng = os.path.join(path, f"rng-rank{D.rank()}.pt") if D.is_initialized() and D.rank() > 0 else ""
    if not os.path.exists(rng):
        rng = os.path.join(path, "rng.pt")
    set_rng_state(torch.load(rng, weights_only=False, map_location="cpu"))
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)
