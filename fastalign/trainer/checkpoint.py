"""Checkpoints: written atomically, verified on load, data only, complete enough for an exact resume.

Layout of `<output_dir>/checkpoints/step-000123/`:
    <role>/                    every trainable model via save_pretrained (safetensors weights +
                               config, and the tokenizer), so a stage's output loads directly
                               into the next one; with LoRA adapters (model.peft) the adapters
                               only, in peft's format (adapter_config.json, adapter_model.safetensors)
    merged/<role>/             with adapters and merge_adapters: the model with its adapters
                               merged, a plain model directory (not read on resume)
    optimizer.json/.safetensors  optimizer state_dict: structure and scalars as JSON, tensors
    scheduler.json             LR scheduler state_dict
    rng.json/.safetensors      torch CPU/CUDA, Python and NumPy RNG states (rng-rank<r>.* per rank)
    trainer_state.json         step, data cursor (epoch, position), algorithm, config
    manifest.json              every other file's size and SHA-256, written last
No file is a pickle, so loading a checkpoint someone shared cannot run code (state_files.py).
Everything is written into a temporary sibling directory which is then renamed into place with
os.replace, so a crash leaves either the previous checkpoint or the new one, never half of one;
`checkpoints/latest` (a one-line file, itself replaced atomically) names the newest. Loading
verifies the manifest first: a truncated or altered file is an error naming it, and
resume_from=latest skips (with a warning) to the newest checkpoint that verifies.

Checkpoints written before the manifest (optimizer.pt, scheduler.pt, rng.pt) still load, read
with torch.load(weights_only=True): plain data only, anything else is refused.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

from fastalign.errors import UserError
from fastalign.models import adapters
from fastalign.models.heads import HEAD_FILE, HEAD_META, ScalarHeadModel
from fastalign.trainer import distributed as D
from fastalign.trainer import manifest, state_files

STATE_FILE = "trainer_state.json"
MERGED_DIR = "merged"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is incomplete, altered, or holds something other than plain data (the
    command line reports it as a user error: the message names the file)."""


def _weights_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                names = {str(v) for v in json.load(f)["weight_map"].values()}
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is malformed ({type(e).__name__}: {e})") from None
        if any(os.path.basename(n) != n for n in names):
            raise CheckpointError(f"{index} names a weights file outside {path}")
        return sorted(os.path.join(path, n) for n in names)
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"no model.safetensors in {path}")
    return [single]


def _read_weights(path):
    state = {}
    for f in _weights_files(path):
        state.update(_tensors(f))
    return state


def _tensors(f):
    try:
        return state_files.read_tensors(f)
    except state_files.StateFileError as e:
        raise CheckpointError(str(e)) from None


def load_weights(model, path: str, *, sharded: bool = False) -> None:
    """Loads weights saved by save_pretrained into an existing model, in place (exact). With
    sharded=True the model is FSDP2-sharded: every rank reads the full weights and keeps its shard.
    A peft model reads its adapters (adapter_model.safetensors) and keeps its base weights."""
    if adapters.is_peft_model(model) and not sharded:
        if not os.path.exists(os.path.join(path, adapters.ADAPTER_WEIGHTS)):
            raise CheckpointError(f"{path} holds no LoRA adapters ({adapters.ADAPTER_WEIGHTS}), but the model has "
                                  "them: was this checkpoint trained with the same model.peft?")
        adapters.load_adapter_weights(model, path, _tensors)
        return
    if isinstance(model, ScalarHeadModel) and not sharded:
        load_weights(model.lm, path)
        model.head.load_state_dict(_tensors(os.path.join(path, HEAD_FILE)))
        return
    state = _read_weights(path)
    if sharded:
        if isinstance(model, ScalarHeadModel):
            state = {**{f"lm.{k}": v for k, v in state.items()},
                     **{f"head.{k}": v for k, v in _tensors(os.path.join(path, HEAD_FILE)).items()}}
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
                    distributed: bool = False, merged: bool = False) -> str:
    """Writes checkpoint `root/step-{step:06d}` atomically and returns its path.

    distributed=True (every rank calls it): rank 0 writes the models, optimizer, scheduler and
    state, every other rank only its RNG state (rng-rank<r>.pt); all return once the checkpoint
    is in place, and a failure on any rank raises on all of them. `model_states` (role -> full
    state dict) and `optimizer_state` replace the modules' and optimizer's own state dicts when
    they are sharded (FSDP2: gathered on rank 0 by the caller). merged=True: every model with LoRA
    adapters is also written merged, as a plain model directory under merged/<role>."""
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
                if merged and adapters.has_adapters(model):
                    d = os.path.join(tmp, MERGED_DIR, role)
                    adapters.save_merged(model, d)
                    if tokenizer is not None:
                        tokenizer.save_pretrained(d)
            state_files.save(optimizer.state_dict() if optimizer_state is None else optimizer_state,
                             os.path.join(tmp, "optimizer"))
            state_files.save(scheduler.state_dict(), os.path.join(tmp, "scheduler"))
            state_files.save(rng_state(), os.path.join(tmp, "rng"))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump({**state, "step": step}, f, indent=1, default=str)
        else:
            state_files.save(rng_state(), os.path.join(tmp, f"rng-rank{D.rank()}"))
    except BaseException as e:
        err = e
    agree(err)  # every rank's files are written
    if main:
        try:
            manifest.write(tmp)
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


def verify_checkpoint(path: str) -> None:
    """Checks every file against the manifest (manifest.py) and that the files a resume reads
    are listed; raises CheckpointError naming the first that does not match. A checkpoint from
    before manifests (it has optimizer.pt) passes with a warning."""
    if _is_legacy(path):
        warnings.warn(f"{path} has no {manifest.NAME} (written by an older fastalign): its files cannot be "
                      "verified; it is read as plain data only", stacklevel=2)
        return
    try:
        manifest.verify(path, required=(STATE_FILE, "optimizer.json", "scheduler.json", "rng.json"))
    except manifest.ManifestError as e:
        raise CheckpointError(str(e)) from None


def _is_legacy(path):
    """Written before manifests: no manifest, optimizer.pt beside trainer_state.json."""
    return (not os.path.exists(os.path.join(path, manifest.NAME)) and os.path.exists(os.path.join(path, "optimizer.pt"))
            and os.path.exists(os.path.join(path, STATE_FILE)))


def list_checkpoints(root: str) -> list[str]:
    """Checkpoints under root that were written to the end (they have a manifest, or are from
    before manifests), oldest first; temporary directories are ignored. Not verified."""
    return sorted(p for p in glob.glob(os.path.join(root, "step-*"))
                  if os.path.exists(os.path.join(p, manifest.NAME)) or _is_legacy(p))


def resolve_checkpoint(spec: str, output_dir: str) -> str:
    """`latest` -> the newest checkpoint of output_dir that verifies (the one `latest` names first,
    then the others newest first; each one skipped is a warning); else the path itself, verified."""
    if spec != "latest":
        if not os.path.isdir(spec) or not (os.path.exists(os.path.join(spec, manifest.NAME)) or
                                           os.path.exists(os.path.join(spec, STATE_FILE))):
            raise FileNotFoundError(f"{spec} is not a fastalign checkpoint (no {manifest.NAME} or {STATE_FILE})")
        verify_checkpoint(spec)
        return spec
    root = os.path.join(output_dir, "checkpoints")
    candidates = list_checkpoints(root)[::-1]
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            named = os.path.join(root, f.read().strip())
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    if not candidates:
        raise FileNotFoundError(f"resume_from='latest' but there is no checkpoint under {root}")
    for p in candidates:
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            warnings.warn(f"resume_from='latest': skipping {p}: {e}", stacklevel=2)
    raise CheckpointError(f"resume_from='latest': no checkpoint under {root} verifies (see the warnings above)")


def load_checkpoint(path: str, *, models: dict, optimizer, scheduler, sharded: bool = False) -> dict:
    """Restores models, optimizer, scheduler and RNG in place; returns the trainer state. Under
    distribution every rank calls it (and reads the files); sharded=True for FSDP2 models. Each
    rank restores its own RNG state where the checkpoint has one (rng-rank<r>.*), else rank 0's.
    Call resolve_checkpoint (which verifies) first."""
    read = _read_legacy if _is_legacy(path) else _read_state
    for role, model in models.items():
        load_weights(model, os.path.join(path, role), sharded=sharded)
    opt_state = read(path, "optimizer")
    if sharded:
        D.load_full_optimizer_state(models, optimizer, opt_state)
    else:
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(read(path, "scheduler"))
    rng = f"rng-rank{D.rank()}" if D.is_initialized() and D.rank() > 0 else "rng"
    if not (os.path.exists(os.path.join(path, rng + ".json")) or os.path.exists(os.path.join(path, rng + ".pt"))):
        rng = "rng"
    set_rng_state(read(path, rng))
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{os.path.join(path, STATE_FILE)} is not valid JSON ({e})") from None


def _read_state(path, name):
    try:
        return state_files.load(os.path.join(path, name))
    except state_files.StateFileError as e:
        raise CheckpointError(str(e)) from None


def _read_legacy(path, name):
    """A .pt file of a checkpoint from before manifests, through torch's weights_only unpickler:
    tensors, containers and numbers only (plus the NumPy array type of NumPy's RNG state)."""
    f = os.path.join(path, name + ".pt")
    safe = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), getattr(np, "_core", np).multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(f, weights_only=True, map_location="cpu")
    except Exception as e:  # the unpickler refuses anything that is not plain data
        # keep torch's reason, without its advice to retry with weights_only=False
        why = str(e).split("trusted source.")[-1].split("Check the documentation")[0]
        why = " ".join(re.sub(r"Please file an issue.*?WeightsUnpickler error:", "", why, flags=re.S).split())
        why = why[:300] or type(e).__name__
        raise CheckpointError(f"{f} is not plain data (tensors, containers, numbers only): {why}; a checkpoint "
                              "must never run code, so it is refused") from None
