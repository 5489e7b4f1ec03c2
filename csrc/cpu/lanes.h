// The two-width machinery of the small CPU kernels (PPO losses, DPO head): their loops are written
// once on W-lane GCC/Clang vector extensions (csrc/cpu/lanes_w.h and the *_lanes.h files that
// include it) and compiled twice, 4 lanes (one 128-bit register: SSE2, NEON; the baseline) and
// 8 lanes inside target("avx2") clones. GCC scalarises the comparisons of vectors wider than the
// target's registers, hence two widths rather than one wide one. Everything below the clone entry
// points is forced inline, so it compiles for the instruction set of the clone, and no vector
// crosses a call boundary.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "capability.h"

#define FA_INLINE inline __attribute__((always_inline))
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
}  // namespace fastalign::cpu

// FA_CLONES(name) defines name(args...): it runs lanes8::name_rows(args...) in an AVX2 clone when
// use_avx2(), else lanes4::name_rows(args...). Arguments are passed by value (pointers, scalars).
#if defined(__x86_64__) || defined(__i386__)
#define FA_CLONES(name)                                                                     \
  template <typename... A>                                                                  \
  __attribute__((target("avx2"))) void name##_avx2(A... a) { lanes8::name##_rows(a...); }  \
  template <typename... A>                                                                  \
  void name##_base(A... a) { lanes4::name##_rows(a...); }                                   \
  template <typename... A>                                                                  \
  void name(A... a) { use_avx2() ? name##_avx2(a...) : name##_base(a...); }
#else
#define FA_CLONES(name)    \
  template <typename... A> \
  void name(A... a) { lanes4::name##_rows(a...); }
#endif
