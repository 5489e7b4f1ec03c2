// Chooses the CPU kernel table once per process (see dispatch.h). Compiled for the baseline ISA:
// it must run on every CPU to find out what the CPU runs.
#include "dispatch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace fastalign::cpu {

// One table per ISA object built by setup.py (csrc/cpu/isa/kernels.cpp, compiled per ISA).
namespace DEFAULT {
const Kernels& kernel_table();
}
#if defined(FASTALIGN_X86_ISAS)
namespace AVX2 {
const Kernels& kernel_table();
}
namespace AVX512 {
const Kernels& kernel_table();
}
#endif

const Kernels* kernels_for(Isa isa) {
  switch (isa) {
    case Isa::Default:
      return &DEFAULT::kernel_table();
#if defined(FASTALIGN_X86_ISAS)
    case Isa::Avx2:
      return &AVX2::kernel_table();
    case Isa::Avx512:
      return &AVX512::kernel_table();
#endif
    default:
      return nullptr;
  }
}

// The features each table's compiler flags assume (setup.py's _ISA_FLAGS): all must be present.
static bool cpu_has(Isa isa) {
#if defined(FASTALIGN_X86_ISAS)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == Isa::Avx2) return avx2;
  if (isa == Isa::Avx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return isa == Isa::Default;
}

static const Kernels& select_kernels() {
  const char* forced = std::getenv("FASTALIGN_CPU_CAPABILITY");
  const std::string want = forced ? forced : "";
  if (want == "default") return *kernels_for(Isa::Default);
  if (want == "avx2") {
    TORCH_CHECK(cpu_has(Isa::Avx2), "FASTALIGN_CPU_CAPABILITY=avx2 but this CPU lacks AVX2/FMA/F16C");
    return *kernels_for(Isa::Avx2);
  }
  if (want == "avx512") {
    TORCH_CHECK(cpu_has(Isa::Avx512), "FASTALIGN_CPU_CAPABILITY=avx512 but this CPU lacks AVX-512 F/BW/VL/DQ");
    return *kernels_for(Isa::Avx512);
  }
  TORCH_CHECK(want.empty(), "FASTALIGN_CPU_CAPABILITY must be default, avx2 or avx512, got '", want, "'");
  for (const Isa isa : {Isa::Avx512, Isa::Avx2})
    if (cpu_has(isa)) return *kernels_for(isa);
  return *kernels_for(Isa::Default);
}

const Kernels& best_kernels() {
  static const Kernels& chosen = select_kernels();
  return chosen;
}

void unsupported_dtype(const char* kernel, c10::ScalarType dtype) {
  TORCH_CHECK(false, kernel, ": the CPU kernels do not read ", dtype, " tensors");
}

}  // namespace fastalign::cpu
