"""Loading and saving models by name: "tiny" (the bundled model, built in code), a known
pretrained model shipped as a package ("smollm2-135m-instruct") or a .gguf file (both converted
once to a plain directory in the user cache: converted.py), or a local directory written by
save_pretrained / fastalign checkpoints (a causal LM, or a ScalarHeadModel when the directory
holds a score head).
Hugging Face hub ids are passed to from_pretrained unchanged (that may download; nothing in
fastalign's own demo or tests does). A name that is none of these -- a path that does not exist,
an id the hub does not know -- raises ModelNotFoundError listing what is accepted, not the hub's
error about repo ids."""

from __future__ import annotations

import os
import re

from fastalign.errors import ModelNotFoundError
from fastalign.models.converted import KNOWN, converted_dir, is_converted_name
from fastalign.models.heads import ScalarHeadModel, is_scalar_head_dir
from fastalign.models.tiny import tiny_model, tiny_tokenizer

ACCEPTED = ("'tiny' (the bundled model), " + ", ".join(repr(k) for k in KNOWN) + " (converted once from an "
            "installed package), a local model directory (save_pretrained or a fastalign checkpoint's "
            "role directory), a .gguf file, or a Hugging Face hub id (org/name)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_name(name, option: str = "model") -> None:
    """Raises ModelNotFoundError unless `name` can name a model: 'tiny', an existing directory or
    .gguf file, or something shaped like a hub id (whether the hub has it shows when loading)."""
    if name is None or name == "tiny" or name in KNOWN:
        return
    if not isinstance(name, str) or not name:
        raise ModelNotFoundError(f"{option}: {name!r} is not a model name; accepted: {ACCEPTED}")
    path = os.path.expanduser(name)
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelNotFoundError(f"{option}: {name} holds LoRA adapters only, not a model; train with "
                                 "model.merge_adapters=true to get a loadable model under the checkpoint's "
                                 "merged/<role> directory")
    if os.path.isdir(path) or (path.endswith(".gguf") and os.path.isfile(path)):
        return
    if path.endswith(".gguf") or os.path.isabs(path) or path.startswith(".") or not _HUB_ID.match(name):
        raise ModelNotFoundError(f"{option}: no such model directory or known model name: {name}; accepted: "
                                 f"{ACCEPTED}")


def _from_pretrained(auto_cls, name: str, **kwargs):
    """auto_cls.from_pretrained for a directory, hub id or .gguf file; a name transformers cannot
    resolve (OSError: not a folder, not on the hub, offline) becomes ModelNotFoundError."""
    check_model_name(name)
    if is_converted_name(name):
        name = converted_dir(name)
    try:
        return auto_cls.from_pretrained(os.path.expanduser(name), **kwargs)
    except OSError as e:
        raise ModelNotFoundError(f"cannot load model {name!r} ({e}); accepted: {ACCEPTED}") from None


def load_tokenizer(name_or_path: str):
    if name_or_path == "tiny":
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, *, tokenizer=None, scalar_head: bool = False, tiny_kwargs=None, seed: int = 0):
    """A causal LM (or, with scalar_head=True or a reward-model directory, a ScalarHeadModel; a
    new scalar head is initialised from `seed`, so the result does not depend on what ran before)."""
    if name_or_path == "tiny":
        lm = tiny_model(tokenizer, seed=seed, **(tiny_kwargs or {}))
        return ScalarHeadModel(lm, seed=seed) if scalar_head else lm
    if is_scalar_head_dir(name_or_path):
        return ScalarHeadModel.from_pretrained(name_or_path)
    from transformers import AutoModelForCausalLM

    lm = _from_pretrained(AutoModelForCausalLM, name_or_path)
    return ScalarHeadModel(lm, seed=seed) if scalar_head else lm


def save_model(model, path, tokenizer=None) -> None:
    """Weights as safetensors (save_pretrained) + config (+ tokenizer when given)."""
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
