"""The algorithm plugin registry.

Built-ins register with `@register_algorithm("name")`. Third-party packages expose algorithms
through the `importlib.metadata` entry-point group `fastalign.algorithms`:

    [project.entry-points."fastalign.algorithms"]
    simpo = "my_package.simpo:SimPO"      # an Algorithm subclass, or a module that registers

Entry points are loaded lazily: only when a name is not a built-in, or when the whole list is
asked for. A name registered twice is an error; an unknown name lists the known ones.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import warnings

from fastalign.algorithms.base import Algorithm
from fastalign.errors import UserError

ENTRY_POINT_GROUP = "fastalign.algorithms"

_REGISTRY: dict[str, type] = {}
_ORIGIN: dict[str, str] = {}  # name -> where it was registered from (module), for error messages
_PLUGINS_LOADED = False


class UnknownAlgorithmError(UserError, KeyError):  # a name on the command line
    def __str__(self):  # KeyError repr-quotes its message; keep it readable
        return str(self.args[0])


def register_algorithm(name: str):
    """Class decorator: registers an `Algorithm` subclass under `name` (sets `cls.name`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_algorithm: name must be a non-empty string, got {name!r}")

    def deco(cls):
        _add(name, cls, cls.__module__)
        return cls

    return deco


def _add(name: str, cls, origin: str) -> None:
    if not (inspect.isclass(cls) and issubclass(cls, Algorithm)):
        raise TypeError(f"algorithm {name!r}: expected a subclass of fastalign.algorithms.Algorithm, got {cls!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(
            f"algorithm {name!r} is already registered (by {_ORIGIN[name]}); "
            f"{origin} tries to register it again -- pick another name"
        )
    cls.name = name
    _REGISTRY[name] = cls
    _ORIGIN[name] = origin


def _entry_points():
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def load_plugins(*, reload: bool = False) -> None:
    """Loads every `fastalign.algorithms` entry point once (again with reload=True). An entry
    point may name an Algorithm subclass (registered under the entry point's name unless it
    registered itself) or a module whose import registers algorithms. A plugin that fails to
    import is reported with a warning and skipped; a duplicate name raises."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED and not reload:
        return
    _PLUGINS_LOADED = True
    for ep in _entry_points():
        origin = f"plugin {ep.value!r} (entry point {ep.name!r} of {getattr(ep.dist, 'name', '?')})"
        if ep.name in _REGISTRY and _ORIGIN.get(ep.name, "").startswith("plugin "):
            continue  # loaded before (reload)
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break the others
            warnings.warn(f"fastalign: could not load algorithm plugin {origin}: {type(e).__name__}: {e}", stacklevel=2)
            continue
        if inspect.isclass(obj):
            if _REGISTRY.get(ep.name) is not obj:
                _add(ep.name, obj, origin)
            else:
                _ORIGIN[ep.name] = origin
        elif not inspect.ismodule(obj):
            raise TypeError(f"{origin} must name an Algorithm subclass or a module, got {obj!r}")


def get_algorithm(name: str) -> type:
    """The Algorithm class registered under `name` (built-in or plugin)."""
    if name not in _REGISTRY:
        load_plugins()
    if name not in _REGISTRY:
        raise UnknownAlgorithmError(f"unknown algorithm {name!r}; known algorithms: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_algorithms() -> dict[str, str]:
    """{name: one-line description} for every built-in and installed plugin algorithm."""
    load_plugins()
    return {n: (inspect.getdoc(c) or "").splitlines()[0] if inspect.getdoc(c) else "" for n, c in sorted(_REGISTRY.items())}
