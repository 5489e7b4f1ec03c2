"""fastalign's benchmark suite: `python -m benchmarks --help` (or `fastalign bench --help`)."""
