"""The training configs that ship with fastalign (the YAML files in this directory), and how a
config is found and its file paths resolved, so that `fastalign train ALGO --config NAME` works
from any directory and from the wheel.

  * `--config` takes a file path or the name of a packaged config (`dpo_bundled`); `fastalign
    configs` lists the names.
  * File options declared with `option(..., path=True)` (data.train, data.eval,
    algo.pretrain_data) name files relative to the config file that holds them, or packaged data
    as `bundled:NAME` (fastalign/data/bundled/NAME) -- never relative to the working directory,
    which would tie a config to the directory it is run from. Values given as command-line
    overrides are relative to the working directory, as every path typed in a shell is.
  * Model paths and output_dir stay relative to the working directory: they name the outputs of
    earlier runs (runs/...), which live where the user runs fastalign.
"""

from __future__ import annotations

import os

from fastalign.errors import DataNotFoundError

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
BUNDLED_DIR = os.path.join(os.path.dirname(CONFIG_DIR), "data", "bundled")
BUNDLED = "bundled:"
_EXTS = (".yaml", ".yml", ".json")


def packaged() -> dict:
    """{name: path} of the packaged configs."""
    return {os.path.splitext(f)[0]: os.path.join(CONFIG_DIR, f)
            for f in sorted(os.listdir(CONFIG_DIR)) if f.endswith(_EXTS)}


def describe(path: str) -> tuple[str, list[str]]:
    """(description, example command lines) from a packaged config's leading comments."""
    about, usage = [], []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            text = line[1:].strip()
            (usage if text.startswith("fastalign ") else about).append(text)
    return " ".join(about), usage


def find(spec: str) -> str:
    """The config file `spec` names: an existing path, else a packaged config's name (with or
    without its extension)."""
    if os.path.isfile(spec):
        return spec
    name = os.path.splitext(spec)[0] if spec.endswith(_EXTS) else spec
    found = packaged()
    if os.sep not in spec and name in found:
        return found[name]
    raise DataNotFoundError(f"--config {spec}: no such file, and no packaged config of that name "
                            f"(packaged: {', '.join(found)}; see `fastalign configs`)")


def bundled(name: str) -> str:
    """The path of packaged data file `name` (what `bundled:NAME` means)."""
    path = os.path.join(BUNDLED_DIR, name)
    if not name or os.path.isabs(name) or ".." in name.split("/") or not os.path.isfile(path):
        have = sorted(f for f in os.listdir(BUNDLED_DIR) if not f.startswith("."))
        raise DataNotFoundError(f"{BUNDLED}{name}: no such bundled data file (bundled: {', '.join(have)})")
    return path


def resolve_path(value, base_dir: str | None):
    """A file option's value as a path: `bundled:NAME` -> the packaged file; a relative path ->
    relative to base_dir (the config file's directory; None: the working directory)."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith(BUNDLED):
        return bundled(value[len(BUNDLED):])
    value = os.path.expanduser(value)
    if base_dir is None or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base_dir, value))
