"""The fastalign ops the algorithms build their losses from, looked up at call time (so that
`import fastalign.algorithms` never forces the op modules to load in a particular order)."""

from __future__ import annotations


def op(name: str):
    import fastalign

    fn = getattr(fastalign, name, None)
    if fn is None:
        raise AttributeError(f"fastalign has no op {name!r} (is this fastalign install complete?)")
    return fn
