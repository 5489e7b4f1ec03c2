"""`fastalign bench [...]`: runs the benchmark suite, which ships in the package
(fastalign/benchmarks; `python -m benchmarks` in a clone is the same); see `fastalign bench --help`.
Peers that are not installed (TRL, verl, ...) are skipped with a note."""

from __future__ import annotations


def main(argv=None) -> int:
    from fastalign.benchmarks.__main__ import main as run

    return run(argv)
