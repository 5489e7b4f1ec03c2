// CPU implementation of fastalign::gae_fwd: Generalized Advantage Estimation as one reverse scan
// per row, rows in parallel (at::parallel_for over B). No gradient (GAE inputs are data).
//
// Per row, state (V = value of the next valid step, A = running advantage), both 0 after the
// last step. At a valid step t (mask true):
//   delta = r_t + gamma * V - v_t;  A = delta + gamma * lam * A;  V = v_t
//   advantages[t] = A, returns[t] = A + v_t
// A masked step leaves (V, A) unchanged and writes 0 to both outputs. fp32 state and outputs for
// every input dtype. The mask may be bool/uint8, int32, int64 or float32 (nonzero = valid).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "mask.h"

namespace fastalign::cpu {
namespace {

// R rows [b, b + R) scanned together: each row's scan is a serial chain of dependent multiply-adds
// (latency-bound), so R independent chains overlap in the pipeline. Branch-free per step (masks are
// irregular): a masked step computes and discards, so NaN in its reward or value never reaches the
// state.
template <int R, typename T, typename M>
inline void scan_rows(const T* rewards, const T* values, const M* mask, float* adv, float* ret, int64_t steps,
                      float gamma, float gamma_lam, int64_t b) {
  float next_value[R], running[R];
  for (int k = 0; k < R; ++k) next_value[k] = running[k] = 0.f;
  for (int64_t t = steps - 1; t >= 0; --t) {
    for (int k = 0; k < R; ++k) {
      const int64_t i = (b + k) * steps + t;  // 64-bit offsets
      const bool ok = mask[i] != 0;
      const float v = static_cast<float>(values[i]);
      const float delta = static_cast<float>(rewards[i]) + gamma * next_value[k] - v;
      const float a = delta + gamma_lam * running[k];
      running[k] = ok ? a : running[k];
      next_value[k] = ok ? v : next_value[k];
      adv[i] = ok ? a : 0.f;
      ret[i] = ok ? a + v : 0.f;
    }
  }
}

template <typename T, typename M>
void gae_rows(const T* rewards, const T* values, const M* mask, float* adv, float* ret, int64_t steps, float gamma,
              float gamma_lam, int64_t row_begin, int64_t row_end) {
  constexpr int kRows = 4;
  int64_t b = row_begin;
  for (; b + kRows <= row_end; b += kRows)
    scan_rows<kRows>(rewards, values, mask, adv, ret, steps, gamma, gamma_lam, b);
  for (; b < row_end; ++b) scan_rows<1>(rewards, values, mask, adv, ret, steps, gamma, gamma_lam, b);
}

std::tuple<at::Tensor, at::Tensor> gae_fwd(const at::Tensor& rewards_in, const at::Tensor& values_in,
                                           const at::Tensor& mask_in, double gamma, double lam) {
  checks::gae_args(rewards_in, values_in, mask_in, gamma, lam);
  const at::Tensor rewards = rewards_in.contiguous(), values = values_in.contiguous(), mask = mask_in.contiguous();
  const int64_t batch = rewards.size(0), steps = rewards.size(1);
  auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({batch, steps}, opts);
  at::Tensor ret = at::empty({batch, steps}, opts);
  if (batch == 0 || steps == 0) return {adv, ret};
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  // ~16k steps per task: the scan is a serial dependency chain per row, so rows are the parallelism
  const int64_t grain = std::max<int64_t>(1, 16384 / steps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "gae_fwd", [&] {
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const scalar_t* v = values.data_ptr<scalar_t>();
    float* a = adv.data_ptr<float>();
    float* rt = ret.data_ptr<float>();
    with_mask(mask, [&](auto m) {
      at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) { gae_rows(r, v, m, a, rt, steps, g, gl, b0, b1); });
    });
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) { m.impl("gae_fwd", &gae_fwd); }

}  // namespace fastalign::cpu
