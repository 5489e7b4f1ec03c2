// Included once per CPU capability (kernels_{default,avx2,avx512}.cpp) after CPU_CAPABILITY is
// defined: pulls in at::vec for that ISA, every vectorised kernel, and defines the table.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "logprobs_kernel.h"

namespace fastalign::cpu {
const Kernels& FASTALIGN_KERNEL_TABLE() {
  static const Kernels table{
      "" C10_STRINGIZE(CPU_CAPABILITY),
      &CPU_CAPABILITY::logprobs_fwd_rows,
      &CPU_CAPABILITY::logprobs_bwd_rows,
  };
  return table;
}
}  // namespace fastalign::cpu
