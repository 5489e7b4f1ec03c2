// fastalign._C: the Python module stub of the C++/CUDA kernels.
//
// Each fused kernel is a pair of ops, fastalign::<name>_fwd and <name>_bwd, implemented per device in
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(fastalign, CPU)) and csrc/cuda/*.cu
// (TORCH_LIBRARY_IMPL(fastalign, CUDA)). Their schemas, fake (meta) implementations and autograd
// are defined once in Python, by the op's FusedOp description (fastalign/ops/_fused.py and the
// op modules beside it), for every backend alike. The dispatcher accepts these kernels whether
// this library is loaded before or after the Python definitions, and checks each kernel's
// signature against its schema when both are present.
#include <Python.h>

#include "cpu/dispatch.h"

// A real (empty) Python module, so `import fastalign._C` loads the library and runs the kernel
// registrations of csrc/cpu and csrc/cuda. Build facts live in fastalign/_build_info.py, readable without loading.
static PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastalign::cpu::best_kernels().name);
}
static PyMethodDef fastalign_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "The CPU kernel table in use: DEFAULT, AVX2 or AVX512."},
    {nullptr, nullptr, 0, nullptr}};
static PyModuleDef fastalign_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastalign_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastalign_module); }
