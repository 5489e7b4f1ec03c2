"""Options of the config dataclasses (TrainerConfig, each algorithm's config, the run's model and
data sections): declaring them with a one-line help and a valid range (`option`), building a
dataclass from user values with every value checked (`build_config`), and listing them with
their defaults and help (`describe`, what `fastalign train ALGO --print-config` prints).

A config written by hand (YAML, command-line overrides) must fail when it is read, naming the
option as the user wrote it (`trainer.lr must be > 0, got -1`), not deep inside the optimizer.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from fastalign.errors import ConfigError

_OPS = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b),
        "lt": ("<", lambda v, b: v < b), "le": ("<=", lambda v, b: v <= b)}


def option(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING,
           choices=None, path: bool = False, **bounds):
    """A dataclass field with a one-line `help` and optional checks: `choices` (a collection) and
    bounds gt/ge/lt/le (numbers; None always passes for optional fields). path=True marks an
    input file, resolved relative to the config file that names it (fastalign.configs)."""
    unknown = set(bounds) - set(_OPS)
    if unknown:
        raise TypeError(f"option: unknown bound(s) {sorted(unknown)}")
    meta = {"help": help, "choices": tuple(choices) if choices else None, "bounds": bounds, "path": path}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _coerce(where: str, hint, value):
    """value checked against (and, where lossless, converted to) the field type `hint`: ints for
    float fields, and numbers written as strings -- YAML reads `3e-4` (no dot) as a string --
    for float and int fields; lists for tuple fields. Other types pass unchecked."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    if args:  # X | None
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif hint in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{where} must be a number ({hint.__name__}), got {value!r}")
        if hint is int:
            if not float(number).is_integer():
                raise ConfigError(f"{where} must be a whole number, got {value!r}")
            return int(number)
        return float(number)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    elif hint is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _range(f: dataclasses.Field, optional: bool) -> str:
    """The declared range in words: `> 0`, `in [0, 1)`, prefixed `None or` for optional fields."""
    b = f.metadata.get("bounds") or {}
    lo = [(op, b[op]) for op in ("gt", "ge") if op in b]
    hi = [(op, b[op]) for op in ("lt", "le") if op in b]
    if lo and hi:
        text = f"in {'(' if lo[0][0] == 'gt' else '['}{lo[0][1]}, {hi[0][1]}{')' if hi[0][0] == 'lt' else ']'}"
    else:
        op, bound = (lo or hi)[0]
        text = f"{_OPS[op][0]} {bound}"
    return ("None or " if optional else "") + text


def _check(where: str, f: dataclasses.Field, value, raw, optional: bool):
    if value is None:
        return
    shown = value if isinstance(raw, str) else raw  # what the user wrote, unless it was a string
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}; got {shown!r}")
    bounds = f.metadata.get("bounds") or {}
    if not all(_OPS[op][1](value, bound) for op, bound in bounds.items()):
        raise ConfigError(f"{where} must be {_range(f, optional)}, got {shown!r}")


def build_config(cls, values, prefix: str | None = None):
    """A config dataclass from a dict: unknown keys are an error naming the known ones, and each
    value is checked against its field's type and declared range. Errors name the option as
    `prefix.key` (the config section, e.g. `trainer.lr`), or `ClassName.key` without a prefix."""
    if values is None:
        values = {}
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        # an instance is checked like a dict: its constructor does not check ranges
        values = {f.name: getattr(values, f.name) for f in dataclasses.fields(values)}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or cls.__name__} must be a mapping of options, got {values!r}")
    where = prefix or cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)}; known options: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for k, raw in values.items():
        out[k] = _coerce(f"{where}.{k}", hints.get(k), raw)
        optional = type(None) in typing.get_args(hints.get(k))
        _check(f"{where}.{k}", fields[k], out[k], raw, optional)
    return cls(**out)


def describe(cls):
    """[(name, default, help)] for every field of the config dataclass `cls`."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((f.name, default, f.metadata.get("help", "")))
    return rows
