"""Triton kernels, one module per op family. Imported lazily (only when the triton backend is
used), so fastalign imports without Triton. On the CPU they run under TRITON_INTERPRET=1."""
