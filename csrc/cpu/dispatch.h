// Run-time instruction-set dispatch of the CPU kernels: one table of function pointers per ISA,
// chosen once per process (the scheme of ATen's DispatchStub and torchao).
//
// Every vectorised CPU loop -- the vocabulary loops of the log-probs (on at::vec) and the lane
// kernels of the PPO losses and the DPO head (on GCC/Clang vector extensions) -- is written once
// under csrc/cpu/isa/ and compiled by setup.py into one object per ISA, each with that ISA's
// own compiler flags (-mavx2 -mfma -mf16c; -mavx512f -mavx512bw -mavx512vl -mavx512dq ...) and
// with CPU_CAPABILITY naming its namespace (DEFAULT, AVX2, AVX512), so the three copies never
// collide. best_kernels() picks the widest table the CPU runs, so a wheel built on one x86
// machine is fast and safe on another; FASTALIGN_CPU_CAPABILITY=default|avx2|avx512 narrows the
// choice (tests and benchmarks compare the tables). Non-x86 builds compile only DEFAULT.
//
// Only plain data crosses this boundary (pointers, sizes, c10::ScalarType; never at::Tensor),
// so the ISA objects inline no ATen tensor code compiled for an instruction set the CPU may lack.
// The host files (csrc/cpu/*.cpp) check arguments, allocate, and split rows over threads.
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "kernel_args.h"

namespace fastalign::cpu {

enum class Isa { Default, Avx2, Avx512 };

// Each kernel processes rows [begin, end) (tokens for the log-probs, sequences otherwise); the
// caller parallelises over rows.
struct Kernels {
  const char* name;  // "DEFAULT", "AVX2" or "AVX512" (fastalign._C.cpu_capability())
  // token log-probs and entropy over the vocabulary (csrc/cpu/isa/logprobs_rows.h)
  void (*logprobs_fwd)(const LogprobsFwdArgs&, int64_t begin, int64_t end);
  void (*logprobs_bwd)(const LogprobsBwdArgs&, int64_t begin, int64_t end);
  // PPO losses: per-row partial sums [B, kPpoParts], and the gradient given per-row weights
  // (csrc/cpu/isa/ppo_lanes.h)
  void (*ppo_policy_fwd)(const TokenInputs&, const PolicyParams&, float* parts, int64_t begin, int64_t end);
  void (*ppo_policy_bwd)(const TokenInputs&, const PolicyParams&, const float* row_w, float g, void* grad,
                         int64_t begin, int64_t end);
  void (*pg_policy_fwd)(const TokenInputs&, const PgParams&, float* parts, int64_t begin, int64_t end);
  void (*pg_policy_bwd)(const TokenInputs&, const PgParams&, const float* row_w, float g, void* grad, int64_t begin,
                        int64_t end);
  void (*ppo_value_fwd)(const TokenInputs&, const ValueParams&, float* parts, int64_t begin, int64_t end);
  void (*ppo_value_bwd)(const TokenInputs&, const ValueParams&, const float* row_w, float g, void* grad,
                        int64_t begin, int64_t end);
  // DPO head: out[r] = masked sum (or mean) of row r of x; grad[r, t] = valid ? value[r] (/ count) : 0
  // (csrc/cpu/isa/preference_lanes.h)
  void (*masked_sums)(const MaskedRows&, const void* x, bool mean, float* out, int64_t begin, int64_t end);
  void (*masked_fill)(const MaskedRows&, void* grad, const float* value, bool mean, int64_t begin, int64_t end);
};

// The table of one ISA compiled into this build, or nullptr (AVX2/AVX-512 off x86).
const Kernels* kernels_for(Isa isa);
// The table in use: the widest the CPU supports, narrowed by FASTALIGN_CPU_CAPABILITY.
const Kernels& best_kernels();

// Raised by the ISA objects for a dtype the host checks let through by mistake (unreachable):
// defined in dispatch.cpp, so that no exception machinery is compiled with ISA flags.
[[noreturn]] void unsupported_dtype(const char* kernel, c10::ScalarType dtype);

}  // namespace fastalign::cpu
