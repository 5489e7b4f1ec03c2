"""The CPU kernel table's per-ISA objects: setup.py compiles csrc/cpu/isa/kernels.cpp once per
instruction set, each with its own flags, and csrc/cpu/dispatch.cpp picks one at run time."""

import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# build/temp/isa/<isa>/csrc/cpu/isa/kernels.o, as setup.py's _BuildExt writes them
OBJECTS = sorted(glob.glob(os.path.join(ROOT, "build", "temp", "isa", "*", "csrc", "cpu", "isa", "kernels.o")))


@pytest.mark.skipif(not OBJECTS or shutil.which("nm") is None, reason="no per-ISA objects built here, or no nm")
def test_avx_objects_define_no_shared_code_outside_their_namespace():
    # The linker keeps one copy of each weak (inline or template) function among all objects. One
    # that an AVX object defines outside its own namespace (a c10 inline pulled in by TORCH_CHECK,
    # say) may be the copy every caller gets, baseline code included: an illegal instruction on a
    # CPU without AVX. So the AVX objects must keep everything they share in fastalign::cpu::<ISA>.
    for obj in OBJECTS:
        isa = obj.split(os.sep)[-5].upper()
        if isa == "DEFAULT":
            continue  # compiled for the baseline ISA: any copy of its code runs everywhere
        out = subprocess.run(["nm", "-C", "--defined-only", obj], capture_output=True, text=True, check=True).stdout
        weak = [line for line in out.splitlines() if len(line.split()) > 2 and line.split()[1] in ("W", "V", "u")]
        leaked = [line for line in weak if f"fastalign::cpu::{isa}::" not in line]
        assert weak, f"{obj}: no weak symbols at all (nm output changed?)"
        assert not leaked, f"{obj} defines shared code outside fastalign::cpu::{isa}:\n" + "\n".join(leaked[:20])


@pytest.mark.skipif(not OBJECTS or shutil.which("objdump") is None, reason="no per-ISA objects built here, or no objdump")
def test_avx_objects_run_no_avx_code_at_load():
    # Static initialisers run when _C loads, before dispatch.cpp has looked at the CPU: those of an
    # AVX object (today only <iostream>'s, from the headers) must not use AVX instructions.
    for obj in OBJECTS:
        if obj.split(os.sep)[-5] == "default":
            continue
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True, text=True,
                             check=True).stdout
        init = [block for block in asm.split("\n\n") if "<_GLOBAL__sub_I" in block]
        # VEX/EVEX instructions (v-prefixed mnemonics), or AVX registers
        avx = re.compile(r":\s+v[a-z0-9]+\s|%[yz]mm|%k[0-7]\b")
        for block in init:
            assert not avx.search(block), f"{obj}: AVX code at load:\n{block}"
