// CPU implementation of fastalign::gae_fwd: Generalized Advantage Estimation as one reverse scan
// per row, rows in parallel (at::parallel_for over B). No gradient (GAE inputs are data).
//
// Per row, state (V = value of the next valid step, A = running advantage), both 0 after the
// last step. At a valid step t (mask true):
//   delta = r_t + gamma * V - v_t;  A = delta + gamma * lam * A;  V = v_t
//   advantages[t] = A, returns[t] = A + v_t
// A masked step leaves (V, A) unchanged and writes 0 to both outputs. fp32 state and outputs for
// every input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

namespace fastalign::cpu {
namespace {

template <typename scalar_t>
void gae_rows(const scalar_t* rewards, const scalar_t* values, const bool* mask, float* adv, float* ret, int64_t steps,
              float gamma, float gamma_lam, int64_t row_begin, int64_t row_end) {
  for (int64_t b = row_begin; b < row_end; ++b) {
    const int64_t base = b * steps;  // 64-bit offsets
    float next_value = 0.f, running = 0.f;
    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t i = base + t;
      if (mask[i]) {
        const float v = static_cast<float>(values[i]);
        const float delta = static_cast<float>(rewards[i]) + gamma * next_value - v;
        running = delta + gamma_lam * running;
        next_value = v;
        adv[i] = running;
        ret[i] = running + v;
      } else {
        adv[i] = 0.f;
        ret[i] = 0.f;
      }
    }
  }
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
    const bool* m = mask.data_ptr<bool>();
    float* a = adv.data_ptr<float>();
    float* rt = ret.data_ptr<float>();
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) { gae_rows(r, v, m, a, rt, steps, g, gl, b0, b1); });
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) { m.impl("gae_fwd", &gae_fwd); }

}  // namespace fastalign::cpu
