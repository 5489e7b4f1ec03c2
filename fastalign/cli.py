"""The `fastalign` command line: `fastalign info` (more subcommands join as they are built)."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(_args) -> int:
    import torch

    import fastalign
    from fastalign import _backends

    print(f"fastalign {fastalign.__version__}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except ImportError:
        print("triton    not installed")
    try:
        from fastalign import _build_info as info

        print(f"_C built  for torch {info.TORCH_VERSION}, CUDA kernels: {info.WITH_CUDA}"
              + (f" (CUDA {info.CUDA_VERSION}, arch {info.CUDA_ARCH_LIST or 'default'})" if info.WITH_CUDA else ""))
    except ImportError:
        print("_C built  no")
    ext = _backends.extension()
    if ext is not None:
        print(f"CPU ISA   {ext.cpu_capability()}")
    print("backends:")
    for name, rep in fastalign.backends().items():
        state = f"usable on {', '.join(rep['devices'])}" if rep["usable"] else "unusable"
        print(f"  {name:7s} {state}" + (f" -- {rep['reason']}" if rep["reason"] else ""))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends and why any is unusable").set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)
