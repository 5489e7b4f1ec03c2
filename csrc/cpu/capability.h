// The CPU capability in use, for fastalign._C.cpu_capability() (csrc/fastalign.cpp):
// best_kernels().name is "DEFAULT", "AVX2" or "AVX512". The dispatch itself is in dispatch.h.
#pragma once
#include "dispatch.h"
