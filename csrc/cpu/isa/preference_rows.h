// The DPO head's table entries in one ISA object: the plain-data arguments (kernel_args.h) to the
// typed W-lane row loops of preference_lanes.h, at kPreferenceLanes lanes (lanes.h).
#pragma once

#include "lanes.h"

namespace fastalign::cpu {
namespace CPU_CAPABILITY {

namespace preference_lanes {
constexpr int W = kPreferenceLanes;
#include "preference_lanes.h"
}  // namespace preference_lanes

inline void masked_sums(const MaskedRows& rows, const void* x, bool mean, float* out, int64_t r0, int64_t r1) {
  with_row_types(rows, "sequence_logps", [&](auto t, auto m) {
    using T = typename decltype(t)::type;
    using M = typename decltype(m)::type;
    preference_lanes::masked_sums_rows(static_cast<const T*>(x), static_cast<const M*>(rows.mask), rows.steps, r0,
                                       r1, mean, out);
  });
}

inline void masked_fill(const MaskedRows& rows, void* grad, const float* value, bool mean, int64_t r0, int64_t r1) {
  with_row_types(rows, "sequence_logps_bwd", [&](auto t, auto m) {
    using T = typename decltype(t)::type;
    using M = typename decltype(m)::type;
    preference_lanes::masked_fill_rows(static_cast<T*>(grad), static_cast<const M*>(rows.mask), rows.steps, r0, r1,
                                       value, mean);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastalign::cpu
