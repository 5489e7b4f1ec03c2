"""`fastalign bench [...]`: runs the benchmark suite (benchmarks/ in the source tree) -- the same
as `python -m benchmarks [...]` from the repository root; see `fastalign bench --help`."""

from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    try:
        from benchmarks.__main__ import main as run
    except ImportError:
        # an editable/source install: the suite sits next to the package, not inside it
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.exists(os.path.join(root, "benchmarks", "__main__.py")):
            print("fastalign bench: the benchmark suite ships with the source tree (benchmarks/), not the "
                  "wheel; run it from a clone: `python -m benchmarks`", file=sys.stderr)
            return 2
        sys.path.insert(0, root)
        from benchmarks.__main__ import main as run
    return run(argv)
