"""The benchmark suite, shipped inside the package so `fastalign bench` runs from the wheel
(`python -m benchmarks` in a clone is the same runner; benchmarks/ keeps RESULTS.md and the GPU
check script)."""
