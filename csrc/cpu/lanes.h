// The multi-width machinery of the small CPU kernels (PPO losses, DPO head): their loops are
// written once on W-lane GCC/Clang vector extensions (csrc/cpu/lanes_w.h and the *_lanes.h files
// that include it) and compiled per width: 4 lanes (one 128-bit register: SSE2, NEON; the
// baseline), 8 lanes in target("avx2") clones and, for the PPO losses, 16 lanes in AVX-512 clones.
// One width per instruction set, because GCC scalarises the comparisons of vectors wider than the
// target's registers. Everything below the clone entry points is forced inline and carries its
// width's target, so no vector crosses a call boundary. The run-time choice follows
// capability.cpp (FASTALIGN_CPU_CAPABILITY narrows it, for the tests).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "capability.h"

// The lane code is forced inline and compiled for the instruction set of its width: the file
// that includes a *_lanes.h header sets FA_INLINE to one of these around the include. (GCC
// lowers the vector operations of an inlined function for that function's own target: without
// the attribute, 16-lane comparisons became per-lane scalar code even inside an AVX-512 clone.)
#define FA_INLINE_BASE inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define FA_ISA_AVX2 "avx2"
#define FA_ISA_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#define FA_INLINE_AVX2 inline __attribute__((always_inline, target(FA_ISA_AVX2)))
#define FA_INLINE_AVX512 inline __attribute__((always_inline, target(FA_ISA_AVX512)))
#else
#define FA_INLINE_AVX2 FA_INLINE_BASE
#define FA_INLINE_AVX512 FA_INLINE_BASE
#endif
// Everything using these vectors has internal linkage, so the AVX-sized vector ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastalign::cpu {
// True when the 8-lane AVX2 clones may run: the CPU has AVX2 and FASTALIGN_CPU_CAPABILITY does not
// force "default".
inline bool use_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = std::strcmp(best_kernels().name, "DEFAULT") != 0 && __builtin_cpu_supports("avx2");
  return ok;
#else
  return false;
#endif
}

// True when the 16-lane AVX-512 clones may run: the best kernels chosen (capability.cpp: F, BW,
// VL and DQ present, FASTALIGN_CPU_CAPABILITY not narrower) are the AVX-512 ones.
inline bool use_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = std::strcmp(best_kernels().name, "AVX512") == 0;
  return ok;
#else
  return false;
#endif
}

// f(const M* mask) with M the element type of a bool/uint8, int32, int64 or float32 mask
// (checks::mask_dtype); the kernels read every one of them directly.
template <typename F>
void with_mask(const at::Tensor& mask, F&& f) {
  switch (mask.scalar_type()) {
    case at::kBool:
    case at::kByte:
      return f(static_cast<const uint8_t*>(mask.const_data_ptr()));
    case at::kInt:
      return f(mask.const_data_ptr<int32_t>());
    case at::kLong:
      return f(mask.const_data_ptr<int64_t>());
    case at::kFloat:
      return f(mask.const_data_ptr<float>());
    default:
      TORCH_CHECK(false, "mask dtype ", mask.scalar_type(), " is not read by the CPU kernels");
  }
}
}  // namespace fastalign::cpu

// FA_CLONES(name) defines name(args...): it runs lanes8::name_rows(args...) in an AVX2 clone when
// use_avx2(), else lanes4::name_rows(args...). FA_CLONES_512(name) adds a lanes16 clone for CPUs
// whose best kernels are the AVX-512 ones. Arguments are passed by value (pointers, scalars).
#if defined(__x86_64__) || defined(__i386__)
#define FA_CLONES(name)                                                                     \
  template <typename... A>                                                                  \
  __attribute__((target(FA_ISA_AVX2))) void name##_avx2(A... a) { lanes8::name##_rows(a...); }  \
  template <typename... A>                                                                  \
  void name##_base(A... a) { lanes4::name##_rows(a...); }                                   \
  template <typename... A>                                                                  \
  void name(A... a) { use_avx2() ? name##_avx2(a...) : name##_base(a...); }
#define FA_CLONES_512(name)                                                                              \
  template <typename... A>                                                                               \
  __attribute__((target(FA_ISA_AVX512))) void name##_avx512(A... a) { lanes16::name##_rows(a...); }                           \
  template <typename... A>                                                                               \
  __attribute__((target(FA_ISA_AVX2))) void name##_avx2(A... a) { lanes8::name##_rows(a...); }               \
  template <typename... A>                                                                               \
  void name##_base(A... a) { lanes4::name##_rows(a...); }                                                \
  template <typename... A>                                                                               \
  void name(A... a) { use_avx512() ? name##_avx512(a...) : use_avx2() ? name##_avx2(a...) : name##_base(a...); }
#else
#define FA_CLONES(name)    \
  template <typename... A> \
  void name(A... a) { lanes4::name##_rows(a...); }
#define FA_CLONES_512(name) FA_CLONES(name)
#endif
