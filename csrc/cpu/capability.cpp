#include "capability.h"

#include <c10/util/Exception.h>
#include <cstdlib>
#include <string>

namespace fastalign::cpu {

static const Kernels& select_kernels() {
  const char* forced = std::getenv("FASTALIGN_CPU_CAPABILITY");
  std::string want = forced ? forced : "";
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
#else
  const bool has_avx512 = false, has_avx2 = false;
#endif
  if (want == "default") return kernels_default();
  if (want == "avx2") {
    TORCH_CHECK(has_avx2, "FASTALIGN_CPU_CAPABILITY=avx2 but this CPU lacks AVX2/FMA/F16C");
    return kernels_avx2();
  }
  if (want == "avx512") {
    TORCH_CHECK(has_avx512, "FASTALIGN_CPU_CAPABILITY=avx512 but this CPU lacks AVX-512 F/BW/VL/DQ");
    return kernels_avx512();
  }
  TORCH_CHECK(want.empty(), "FASTALIGN_CPU_CAPABILITY must be default, avx2 or avx512, got '", want, "'");
  if (has_avx512) return kernels_avx512();
  if (has_avx2) return kernels_avx2();
  return kernels_default();
}

const Kernels& best_kernels() {
  static const Kernels& chosen = select_kernels();
  return chosen;
}

}  // namespace fastalign::cpu
