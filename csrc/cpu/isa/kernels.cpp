// The CPU kernel table of one instruction set. setup.py compiles this file once per ISA, each
// time with that ISA's compiler flags and -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (plus
// CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512, which select at::vec's implementation), so every
// kernel below lands in namespace fastalign::cpu::<ISA> of its own object; dispatch.cpp picks one
// table at run time. Nothing here may run before that choice (no static initialisers beyond the
// table, which is built on first use).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../dispatch.h"
#include "logprobs_rows.h"
#include "ppo_rows.h"
#include "preference_rows.h"

namespace fastalign::cpu {
namespace CPU_CAPABILITY {

const Kernels& kernel_table() {
  static const Kernels table{
      "" C10_STRINGIZE(CPU_CAPABILITY),
      &logprobs_fwd_rows,
      &logprobs_bwd_rows,
      &rows_fwd<ppo_lanes::PolicyLoss>,
      &rows_bwd<ppo_lanes::PolicyLoss>,
      &rows_fwd<ppo_lanes::PgLoss>,
      &rows_bwd<ppo_lanes::PgLoss>,
      &rows_fwd<ppo_lanes::ValueLoss>,
      &rows_bwd<ppo_lanes::ValueLoss>,
      &masked_sums,
      &masked_fill,
  };
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace fastalign::cpu
