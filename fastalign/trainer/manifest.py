"""A checkpoint's manifest: every file's size and SHA-256, written last, checked before loading.

Written after every other file of the checkpoint (and before the directory is renamed into
place), so a checkpoint without one was never finished; a file whose size or digest differs was
truncated, corrupted or altered after the fact.
"""

from __future__ import annotations

import hashlib
import json
import os

NAME = "manifest.json"


class ManifestError(RuntimeError):
    """A file that does not match the manifest, or a missing or malformed manifest."""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write(directory: str) -> None:
    """Lists every file under directory (but the manifest) with its size and SHA-256."""
    files = {}
    for dirpath, _, names in os.walk(directory):
        for n in names:
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if rel != NAME:
                files[rel] = {"bytes": os.path.getsize(full), "sha256": sha256(full)}
    with open(os.path.join(directory, NAME), "w") as f:
        json.dump({"format": "fastalign-checkpoint-2", "files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify(directory: str, required=()) -> None:
    """Every listed file exists with its size and SHA-256, and `required` are listed; raises
    ManifestError naming the first file that does not match."""
    path = os.path.join(directory, NAME)
    if not os.path.exists(path):
        raise ManifestError(f"{directory} is incomplete: it has no {NAME} (the write was interrupted, or it "
                            "is not a fastalign checkpoint)")
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        entries = [(str(rel), int(e["bytes"]), str(e["sha256"])) for rel, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is malformed ({type(e).__name__}: {e})") from None
    for rel, size, digest in entries:
        full = os.path.join(directory, rel)
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ManifestError(f"{path} lists {rel!r}, a path outside {directory}")
        if not os.path.isfile(full):
            raise ManifestError(f"{full} is missing (listed in {NAME})")
        if os.path.getsize(full) != size:
            raise ManifestError(f"{full} has {os.path.getsize(full)} bytes, {NAME} says {size} (truncated or altered)")
        if sha256(full) != digest:
            raise ManifestError(f"{full} does not match its SHA-256 in {NAME} (altered or corrupted)")
    for need in required:
        if need not in files:
            raise ManifestError(f"{path} does not list {need}")
