// The AVX-512 build of the vectorised kernels; chosen at run time only on CPUs that have it.
#include "capability.h"
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// See kernels_avx2.cpp: the pragma does not define the feature macros sleef.h and at::vec test.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#else
#define CPU_CAPABILITY DEFAULT_AS_AVX512
#endif
#define FASTALIGN_KERNEL_TABLE kernels_avx512
#include "kernels_all.h"
