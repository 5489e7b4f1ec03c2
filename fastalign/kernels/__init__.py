"""Kernels: `reference` (eager torch, the ground truth), `triton/` (Triton kernels) and
`linear_logprobs` (the Python tiler and CPU backward of linear_gather_logprobs). The C++/CUDA
kernels live in csrc/. Kernels implement the op descriptions of fastalign/ops/ (docs/ops.md)."""
