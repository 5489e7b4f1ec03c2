"""Builds fastalign._C, the C++ (and, when possible, CUDA) kernels.

The CPU kernels are compiled once per instruction set (DEFAULT, plus AVX2 and AVX-512 on x86) and
chosen at run time from the CPU (FASTALIGN_CPU_CAPABILITY=default|avx2|avx512 narrows the choice);
see ISA_SOURCE below and csrc/cpu/dispatch.h.
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
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The CPU kernel table (csrc/cpu/dispatch.h): csrc/cpu/isa/kernels.cpp is compiled once per
# instruction set, each object with its ISA's own flags and CPU_CAPABILITY (its namespace, and
# at::vec's choice of implementation), as ATen's DispatchStub sources are; the run-time choice
# between the objects is in csrc/cpu/dispatch.cpp, whose CPU feature test must require every
# feature these flags enable. setuptools has no per-file flags, so _BuildExt compiles these
# objects itself and links them into the extension.
ISA_SOURCE = "csrc/cpu/isa/kernels.cpp"
_X86_ISAS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def _isa_objects_spec():
    """(name, macros, flags) per ISA object: DEFAULT everywhere, AVX2 and AVX-512 on x86."""
    spec = [("default", [("CPU_CAPABILITY", "DEFAULT")], [])]
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        for name, flags in _X86_ISAS.items():
            cap = name.upper()
            spec.append((name, [("CPU_CAPABILITY", cap), (f"CPU_CAPABILITY_{cap}", None)], flags))
    return spec


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
    # -ffp-contract=off: no implicit a*b+c -> FMA, so that the lane kernels (csrc/cpu/isa/lanes.h)
    # round every operation alike at 4, 8 and 16 lanes, whatever FMA the ISA object's flags allow
    # (FMAs are only where the code asks).
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp", "-ffp-contract=off"]
    # -g0 after Python's own "-g": no debug info in _C (a tenth of the size; benchmarks/RESULTS.md);
    # FASTALIGN_DEBUG=1 keeps it.
    if os.environ.get("FASTALIGN_DEBUG", "") != "1":
        cxx_flags.append("-g0")
    link_flags = ["-fopenmp"]
    isa_spec = _isa_objects_spec()
    # tells csrc/cpu/dispatch.cpp that the AVX2 and AVX-512 tables are linked in
    define_macros = [("FASTALIGN_X86_ISAS", None)] if len(isa_spec) > 1 else []
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
        ext = CppExtension(
            "fastalign._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    _write_build_info(torch.__version__, torch.version.cuda if with_cuda else None, with_cuda, arch_list)

    class _BuildExt(BuildExtension.with_options(use_ninja=True)):
        # One object directory for in-place, editable (pip -e, which would use a fresh temp dir)
        # and wheel builds, so each reuses the others' objects instead of recompiling everything.
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp")

        def build_extension(self, ext):
            # By now BuildExtension has added torch's flags (-std, ABI, TORCH_EXTENSION_NAME) to
            # ext's; the ISA objects get them too, so they are compiled exactly like the other
            # sources plus their ISA flags (through the same ninja wrapper: one object directory
            # per ISA, reused by later builds).
            cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
            objects = []
            for name, macros, flags in isa_spec:
                objects += self.compiler.compile(
                    [ISA_SOURCE],
                    output_dir=os.path.join(self.build_temp, "isa", name),
                    macros=list(ext.define_macros) + macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=list(cxx) + flags,
                    depends=ext.depends,
                )
            ext.extra_objects = objects
            super().build_extension(ext)

    return [ext], {"build_ext": _BuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
