"""Kernels: `reference` (eager torch, the ground truth) and `triton/` (Triton kernels)."""
