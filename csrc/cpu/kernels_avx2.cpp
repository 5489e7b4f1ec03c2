// The AVX2/FMA build of the vectorised kernels; chosen at run time only on CPUs that have them.
#include "capability.h"
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")
// GCC's target pragma enables the instructions but not the feature macros that sleef.h and
// at::vec test, so state them here (the pragma guarantees they are true for this file).
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT_AS_AVX2
#endif
#define FASTALIGN_KERNEL_TABLE kernels_avx2
#include "kernels_all.h"
