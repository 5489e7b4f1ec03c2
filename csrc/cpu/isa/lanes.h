// The lane kernels (PPO losses, DPO head) in one ISA object: their width, and the dtype switch
// from the plain-data arguments to the typed row loops.
//
// Their loops are written once on W-lane GCC/Clang vector extensions (lanes_w.h and the
// *_lanes.h files that include it, inside a namespace that sets W) and compiled at one width per
// ISA object: 4 lanes (one 128-bit register: SSE2, NEON; the DEFAULT object), 8 lanes in the AVX2
// object and, for the PPO losses, 16 lanes in the AVX-512 one (the DPO head stays at 8 there: its
// sums are defined over 8 partials). One width per instruction set, because GCC scalarises the
// comparisons of vectors wider than the target's registers. Every width computes the same IEEE
// operations per token (setup.py compiles with -ffp-contract=off: no implicit FMA), only the
// summation order of partials may differ, so results do not depend on the width where the math
// says so (see each family).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../dispatch.h"

// Everything below a table entry is forced inline, so no vector crosses a call boundary.
#define FA_INLINE inline __attribute__((always_inline))
// The vectors never cross a call boundary (internal, inlined), so the note that their ABI
// changed with AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastalign::cpu {
namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kPpoLanes = 16, kPreferenceLanes = 8;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kPpoLanes = 8, kPreferenceLanes = 8;
#else
constexpr int kPpoLanes = 4, kPreferenceLanes = 4;
#endif

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}, Tag<M>{}) with T the element type of the float token tensors and M that of the
// mask (bool/uint8 as uint8_t, int32, int64, float).
template <typename F>
FA_INLINE void with_row_types(const MaskedRows& rows, const char* kernel, F&& f) {
  const auto with_mask = [&](auto t) {
    switch (rows.mask_dtype) {
      case c10::ScalarType::Bool:
      case c10::ScalarType::Byte:
        return f(t, Tag<uint8_t>{});
      case c10::ScalarType::Int:
        return f(t, Tag<int32_t>{});
      case c10::ScalarType::Long:
        return f(t, Tag<int64_t>{});
      case c10::ScalarType::Float:
        return f(t, Tag<float>{});
      default:
        unsupported_dtype(kernel, rows.mask_dtype);
    }
  };
  switch (rows.dtype) {
    case c10::ScalarType::Float:
      return with_mask(Tag<float>{});
    case c10::ScalarType::BFloat16:
      return with_mask(Tag<c10::BFloat16>{});
    case c10::ScalarType::Half:
      return with_mask(Tag<c10::Half>{});
    default:
      unsupported_dtype(kernel, rows.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastalign::cpu
