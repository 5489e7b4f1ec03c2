// Runtime CPU-capability dispatch for the vectorised kernels.
//
// The hot loops are written once (csrc/cpu/*_kernel.h, on at::vec::Vectorized) and compiled
// three times -- kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp -- each in its own
// inline namespace, like ATen's DispatchStub. best_kernels() picks the widest the CPU runs, so a
// wheel built on one x86 machine is fast and safe on another. FASTALIGN_CPU_CAPABILITY=
// default|avx2|avx512 forces a narrower table (for tests and benchmarks).
//
// Only plain data crosses this boundary (no at::Tensor), so nothing inline from ATen is compiled
// with AVX flags in the AVX translation units.
#pragma once
#include <c10/core/ScalarType.h>
#include <cstdint>

namespace fastalign::cpu {

struct LogprobsFwdArgs {
  const void* logits;  // [N, V], element (i, j) at logits + i * row_stride + j
  int64_t row_stride;
  c10::ScalarType dtype;  // Float, BFloat16 or Half
  int64_t vocab;
  const int64_t* labels;  // [N], validated by the caller
  float inv_temperature;
  int64_t ignore_index;
  float* logprobs;  // [N]
  float* entropy;   // [N] or nullptr
  float* row_stats;  // [N, 2]: (max_j z_j, log sum_j exp(z_j - max)), saved for the backward
};

struct LogprobsBwdArgs {
  const void* logits;
  int64_t row_stride;
  c10::ScalarType dtype;
  int64_t vocab;
  const int64_t* labels;
  float inv_temperature;
  int64_t ignore_index;
  const float* grad_logprobs;  // [N]
  const float* grad_entropy;   // [N] or nullptr
  const float* row_stats;      // [N, 2]
  const float* entropy;        // [N] or nullptr (needed only with grad_entropy)
  void* grad_logits;           // [N, V] contiguous, dtype
};

// Each kernel processes rows [begin, end); the caller parallelises over rows.
struct Kernels {
  const char* name;
  void (*logprobs_fwd)(const LogprobsFwdArgs&, int64_t begin, int64_t end);
  void (*logprobs_bwd)(const LogprobsBwdArgs&, int64_t begin, int64_t end);
};

const Kernels& kernels_default();
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
const Kernels& best_kernels();

}  // namespace fastalign::cpu
