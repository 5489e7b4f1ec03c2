// The portable build of the vectorised kernels (at::vec's generic fallback; the compiler
// auto-vectorises it for the baseline ISA).
#include "capability.h"
#define CPU_CAPABILITY DEFAULT
#define FASTALIGN_KERNEL_TABLE kernels_default
#include "kernels_all.h"
