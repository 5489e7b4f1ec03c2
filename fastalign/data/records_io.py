"""Reading JSON records from a data file with errors that name the file and line: JSONL or a
JSON array (`read_records`), and checked string fields (`str_field`). The format parsers
(fastalign/data/formats.py) build on these."""

from __future__ import annotations

import json

from fastalign.errors import DataError


class DataFormatError(DataError):
    """A malformed record: the message starts with `file:line:`."""


def where_of(path, line):
    return f"{path}:{line}"


def read_records(path):
    """Yields (line, object) from a JSONL file or a JSON array (line of each element's start)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        dec = json.JSONDecoder()
        i = text.index("[") + 1
        while True:
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text):
                raise DataFormatError(f"{where_of(path, text.count(chr(10), 0, i) + 1)}: JSON array is not closed with ']'")
            if text[i] == "]":
                return
            line = text.count("\n", 0, i) + 1
            try:
                obj, i = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where_of(path, line)}: invalid JSON: {e.msg}") from None
            yield line, obj
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where_of(path, n)}: invalid JSON: {e.msg} (column {e.colno})") from None


def str_field(obj, key, where, *, required=True, allow_empty=False):
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        if required:
            raise DataFormatError(f"{where}: missing field {key!r} (fields present: {sorted(obj)})")
        return ""
    v = obj[key]
    if not isinstance(v, str):
        raise DataFormatError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if required and not allow_empty and not v.strip():
        raise DataFormatError(f"{where}: field {key!r} is empty")
    return v
