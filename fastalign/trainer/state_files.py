"""Plain data to files and back, with nothing in them that can run code when loaded.

A checkpoint's optimizer, scheduler and RNG states are nested dicts, lists and tuples of numbers,
strings and tensors. `save(obj, stem)` writes them as `stem.json` (the structure and every
non-tensor value) and, when there are tensors, `stem.safetensors` (the tensors, by number).
`load(stem)` reads both back exactly: tuples stay tuples, int dict keys stay ints, floats round-trip
through repr (inf and NaN included), tensors keep dtype and shape. Unlike pickle (torch.save), a
crafted file can at worst fail to parse: JSON and safetensors hold data, never code.

Encoding of what JSON cannot say directly: {"__tensor__": "<n>"}, {"__tuple__": [...]},
{"__items__": [[key, value], ...]} for a dict whose keys are not all plain strings, and
{"__ndarray__": [...], "dtype": "..."} for a NumPy array (NumPy's RNG state).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch


class StateFileError(ValueError):
    """A state file that cannot be read as plain data (malformed, truncated, or not one of ours)."""


def save(obj, stem: str) -> None:
    """Writes obj as stem.json (+ stem.safetensors if it holds tensors)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": "fastalign-state-1", "data": _encode(obj, tensors, "state")}
    if tensors:
        save_file(tensors, stem + ".safetensors")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f)


def load(stem: str):
    """Reads what save(obj, stem) wrote. Raises StateFileError naming the file if it is not
    plain data written by save()."""
    path = stem + ".json"
    try:
        with open(path) as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise StateFileError(f"{path} is not a fastalign state file (not valid JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "fastalign-state-1" or "data" not in doc:
        raise StateFileError(f"{path} is not a fastalign state file (no 'format': 'fastalign-state-1')")
    tensors = read_tensors(stem + ".safetensors") if os.path.exists(stem + ".safetensors") else {}
    try:
        return _decode(doc["data"], tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise StateFileError(f"{path}: malformed state ({type(e).__name__}: {e})") from None


def read_tensors(path: str) -> dict:
    """A safetensors file's tensors; StateFileError naming the file if it is not one."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise StateFileError(f"{path} is not a valid safetensors file ({e})") from None


def _encode(obj, tensors, where):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in obj.items()]}
    raise TypeError(f"{where}: {type(obj).__name__} is not plain data (dict, list, tuple, number, string, "
                    "tensor or NumPy array)")


def _decode(obj, tensors):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        if obj is not None and not isinstance(obj, (bool, int, float, str)):
            raise TypeError(f"unexpected {type(obj).__name__}")
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__ndarray__" in obj:
        dtype = np.dtype(str(obj["dtype"]))
        if dtype.kind not in "biuf":
            raise ValueError(f"an array of dtype {dtype} (only numbers are plain data)")
        return np.array(obj["__ndarray__"], dtype=dtype)
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key):
    if isinstance(key, (list, dict, torch.Tensor, np.ndarray)):
        raise TypeError(f"a dict key of type {type(key).__name__}")
    return key
