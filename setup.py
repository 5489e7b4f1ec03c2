"""Builds fastalign._C, the C++ (and, when possible, CUDA) kernels.

CUDA sources are compiled when torch is a CUDA build and a CUDA toolkit is found
(`torch.version.cuda` and `CUDA_HOME`) -- never decided by whether a GPU is visible.
Environment overrides:
  FASTALIGN_WITH_CUDA=0|1   force the CUDA kernels off / on (on fails loudly without a toolkit)
  FASTALIGN_NO_EXTENSION=1  build a pure-Python package (torch and Triton backends only)
  TORCH_CUDA_ARCH_LIST      the GPU architectures, e.g. "8.0;9.0" (set it explicitly for wheels)
  MAX_JOBS                  parallel compile jobs (ninja)
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _write_build_info(torch_version, cuda_version, with_cuda, arch_list):
    # Read by fastalign/_backends.py *before* importing _C, so that a _C built for another
    # torch is refused with a message instead of crashing on an undefined symbol.
    path = os.path.join(ROOT, "fastalign", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch_version!r}\n")
        f.write(f"CUDA_VERSION = {cuda_version!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCH_LIST = {arch_list!r}\n")


def _extensions():
    if os.environ.get("FASTALIGN_NO_EXTENSION", "0") == "1":
        _write_build_info(None, None, False, None)
        return [], {}

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    flag = os.environ.get("FASTALIGN_WITH_CUDA", "auto").lower()
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "on", "true"):
        if not cuda_possible:
            raise RuntimeError(
                "FASTALIGN_WITH_CUDA=1 but CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. "
                "Install a CUDA build of torch and the CUDA toolkit, or unset FASTALIGN_WITH_CUDA."
            )
        with_cuda = True
    elif flag in ("0", "off", "false"):
        with_cuda = False
    else:
        with_cuda = cuda_possible

    sources = ["csrc/fastalign.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template that is only parallel when the extension
    # itself is compiled with OpenMP (torch's CPU builds use the OpenMP backend).
    # -ffp-contract=off: no implicit a*b+c -> FMA, so that the lane kernels (csrc/cpu/lanes.h)
    # round every operation alike at 4, 8 and 16 lanes (FMAs are only where the code asks).
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp", "-ffp-contract=off"]
    # -g0 after Python's own "-g": no debug info in _C (23 MB -> ~2 MB, the wheel 7.2 MB -> <1 MB);
    # FASTALIGN_DEBUG=1 keeps it.
    if os.environ.get("FASTALIGN_DEBUG", "") != "1":
        cxx_flags.append("-g0")
    link_flags = ["-fopenmp"]
    define_macros = []
    arch_list = None
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("FASTALIGN_WITH_CUDA", None))
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
        ext = CUDAExtension(
            "fastalign._C",
            sources,
            define_macros=define_macros,
            extra_link_args=link_flags,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
            },
        )
    else:
        ext = CppExtension("fastalign._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    _write_build_info(torch.__version__, torch.version.cuda if with_cuda else None, with_cuda, arch_list)

    class _BuildExt(BuildExtension.with_options(use_ninja=True)):
        # One object directory for in-place, editable (pip -e, which would use a fresh temp dir)
        # and wheel builds, so each reuses the others' objects instead of recompiling everything.
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp")

    return [ext], {"build_ext": _BuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
