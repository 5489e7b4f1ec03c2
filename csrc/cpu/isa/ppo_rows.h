// The PPO losses' table entries in one ISA object: the plain-data arguments (kernel_args.h) to
// the typed W-lane row loops of ppo_lanes.h, at kPpoLanes lanes (lanes.h).
#pragma once

#include <algorithm>
#include <cmath>

#include "lanes.h"

namespace fastalign::cpu {
namespace CPU_CAPABILITY {

// The per-token math runs on float vectors with a polynomial exp, because scalar libm expf alone
// would cost more than the whole eager PyTorch graph. Row tails are padded with masked lanes.
namespace ppo_lanes {
constexpr int W = kPpoLanes;
#include "ppo_lanes.h"
}  // namespace ppo_lanes

// Calls f(x, y, z, mask) with the inputs as typed pointers.
template <typename F>
FA_INLINE void with_typed_inputs(const TokenInputs& in, const char* kernel, F&& f) {
  with_row_types(in.rows, kernel, [&](auto t, auto m) {
    using T = typename decltype(t)::type;
    using M = typename decltype(m)::type;
    f(static_cast<const T*>(in.x), static_cast<const T*>(in.y), static_cast<const T*>(in.z),
      static_cast<const M*>(in.rows.mask));
  });
}

// The table entries of a loss (ppo_lanes.h PolicyLoss, PgLoss, ValueLoss): the inputs typed, then
// its row loops. One driver for every loss; `name` names the kernel in a dtype error.
template <typename Loss>
void rows_fwd(const TokenInputs& in, const typename Loss::Params& p, float* parts, int64_t b0, int64_t b1) {
  with_typed_inputs(in, Loss::kName, [&](auto x, auto y, auto z, auto m) {
    ppo_lanes::fwd_rows<Loss>(x, y, z, m, in.rows.steps, p, parts, b0, b1);
  });
}

template <typename Loss>
void rows_bwd(const TokenInputs& in, const typename Loss::Params& p, const float* row_w, float g, void* grad,
              int64_t b0, int64_t b1) {
  with_typed_inputs(in, Loss::kName, [&](auto x, auto y, auto z, auto m) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(x)>>;
    ppo_lanes::bwd_rows<Loss>(x, y, z, m, in.rows.steps, p, row_w, g, static_cast<T*>(grad), b0, b1);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastalign::cpu
