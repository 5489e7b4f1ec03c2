// CPU implementation of fastalign::outcome_advantage_fwd and fastalign::return_advantage_fwd, the
// fused advantage estimators of fastalign.advantages (formulas and verl's conventions:
// fastalign/ops/advantages.py). Forward only: advantages are computed from rollout data and take
// no gradient.
//
// outcome_advantage_fwd(rewards [B, K], mask [B, T], group [B], kind, epsilon, norm) -> adv [B, T]
//   kind 0 grpo, 1 rloo, 2 opo, 3 grpo_passk, 4 reinforce_plus_plus_baseline.
//   1. rows in parallel: the score s_i = sum_k r_ik (kLanes fixed partial sums combined in a
//      fixed order: the same bits on every ISA and thread count) and, for opo and
//      reinforce_plus_plus_baseline, the response length |y_i| = number of valid steps;
//   2. one serial pass in batch order over the O(B) scores into B buckets indexed by the dense
//      group id: count, sum (then mean), and the kind's own statistics (length-weighted sums,
//      max / first argmax / second max); a second pass sums the squared deviations from the mean
//      (two-pass variance). Each group is reduced in batch order: deterministic;
//   3. the per-row advantage A_i; for reinforce_plus_plus_baseline also the batch whitening, whose
//      mean and variance over the tiled B x T entries are the |y_i|-weighted row statistics;
//   4. rows in parallel: adv[i, t] = A_i * m_it (a product, as verl's `scores.unsqueeze(-1) * mask`).
// return_advantage_fwd(rewards [B, T], mask [B, T], baselines [B]?, gamma, kind) -> (adv, returns)
//   kind 0 reinforce_plus_plus: R_t = r_t + gamma * (m_{t+1} R_{t+1}) (verl's loop: the carry is
//     multiplied by the mask after each step), adv = whiten(R over the mask) * m, with the
//     whitening statistics as per-row partial sums (rows in parallel) combined in row order;
//   kind 1 remax: R_t = sum_{t' >= t} r_t' m_t', adv = R_t - b_i m_t.
// The scans are serial chains per row, so kRows rows are scanned together (independent chains
// overlap in the pipeline, as in gae.cpp). fp32 arithmetic and outputs for every input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "../checks.h"
#include "mask.h"

namespace fastalign::cpu {
namespace {

enum OutcomeKind : int64_t { kGrpo = 0, kRloo = 1, kOpo = 2, kPassk = 3, kRppBaseline = 4 };
constexpr int kLanes = 8;
constexpr int kRows = 8;

inline float combine_lanes(const float* a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }

// sum of x[0, n) in fp32: element k goes to lane k % kLanes, the lanes are combined in one order
template <typename T>
inline float lane_sum(const T* x, int64_t n) {
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<float>(x[k + j]);
  for (int j = 0; k < n; ++k, ++j) acc[j] += static_cast<float>(x[k]);
  return combine_lanes(acc);
}

// sum over the valid entries of (x - mean)^2, lanes as lane_sum; a masked entry adds exact 0
// (a select, so NaN there stays out)
template <typename M>
inline float lane_sq_dev(const float* x, const M* m, int64_t n, float mean) {
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float d = x[k + j] - mean;
      acc[j] += m[k + j] != 0 ? d * d : 0.f;
    }
  for (int j = 0; k < n; ++k, ++j) {
    const float d = x[k] - mean;
    acc[j] += m[k] != 0 ? d * d : 0.f;
  }
  return combine_lanes(acc);
}

template <typename M>
inline int64_t valid_count(const M* m, int64_t n) {
  int64_t c = 0;
  for (int64_t t = 0; t < n; ++t) c += m[t] != 0;
  return c;
}

int64_t row_grain(int64_t steps) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(steps, 1)); }

// ---- step 2 and 3 of outcome_advantage: the group statistics, serial in batch order -------------

void group_advantages(int64_t kind, const float* s, const float* len, const int64_t* gid, int64_t batch, float eps,
                      bool norm, float* a) {
  std::vector<int64_t> n(batch, 0);
  std::vector<float> sum(batch, 0.f), mean(batch, 0.f), sq(batch, 0.f);
  for (int64_t i = 0; i < batch; ++i) {
    n[gid[i]] += 1;
    sum[gid[i]] += s[i];
  }
  for (int64_t g = 0; g < batch; ++g)
    if (n[g] > 0) mean[g] = sum[g] / static_cast<float>(n[g]);
  if (kind == kGrpo || kind == kPassk) {
    for (int64_t i = 0; i < batch; ++i) {
      const float d = s[i] - mean[gid[i]];
      sq[gid[i]] += d * d;
    }
  }
  // unbiased std; 0 / 0 = NaN for a group of one (grpo treats it separately, passk refuses it)
  auto std_of = [&](int64_t g) { return std::sqrt(sq[g] / static_cast<float>(n[g] - 1)); };
  switch (kind) {
    case kGrpo:
      for (int64_t i = 0; i < batch; ++i) {
        const int64_t g = gid[i];
        if (n[g] < 2) {  // verl: mean 0, std 1
          a[i] = norm ? s[i] / (1.f + eps) : s[i];
        } else {
          const float d = s[i] - mean[g];
          a[i] = norm ? d / (std_of(g) + eps) : d;
        }
      }
      break;
    case kRloo:  // s - mean of the others = n / (n - 1) (s - mean); a group of one keeps s
      for (int64_t i = 0; i < batch; ++i) {
        const int64_t g = gid[i];
        const float k = static_cast<float>(n[g]) / static_cast<float>(n[g] - 1);
        a[i] = n[g] > 1 ? (s[i] - mean[g]) * k : s[i];
      }
      break;
    case kOpo: {  // baseline sum(|y| s) / sum |y|; 0 for a group of one or of empty responses
      std::vector<float> total(batch, 0.f), weighted(batch, 0.f);
      for (int64_t i = 0; i < batch; ++i) {
        total[gid[i]] += len[i];
        weighted[gid[i]] += len[i] * s[i];
      }
      for (int64_t i = 0; i < batch; ++i) {
        const int64_t g = gid[i];
        a[i] = n[g] > 1 && total[g] > 0.f ? s[i] - weighted[g] / total[g] : s[i];
      }
      break;
    }
    case kPassk: {  // the first (in batch order) maximum gets max - second max, the rest 0
      const float neg_inf = -std::numeric_limits<float>::infinity();
      std::vector<float> best(batch, neg_inf), second(batch, neg_inf);
      std::vector<int64_t> winner(batch, -1);
      for (int64_t i = 0; i < batch; ++i) {
        const int64_t g = gid[i];
        if (s[i] > best[g]) {
          second[g] = best[g];
          best[g] = s[i];
          winner[g] = i;
        } else if (s[i] > second[g]) {  // a tie with the max lands here: second = max, gap 0
          second[g] = s[i];
        }
      }
      for (int64_t i = 0; i < batch; ++i) {
        const int64_t g = gid[i];
        const float gap = best[g] - second[g];
        a[i] = winner[g] == i ? (norm ? gap / (std_of(g) + eps) : gap) : 0.f;
      }
      break;
    }
    case kRppBaseline: {
      for (int64_t i = 0; i < batch; ++i) a[i] = n[gid[i]] > 1 ? s[i] - mean[gid[i]] : s[i];
      // masked_whiten over the tiled entries A_i (|y_i| of them per row): weighted row sums
      float wsum = 0.f;
      int64_t count = 0;
      for (int64_t i = 0; i < batch; ++i) {
        if (len[i] > 0.f) wsum += len[i] * a[i];
        count += static_cast<int64_t>(len[i]);
      }
      const float mu = wsum / static_cast<float>(std::max<int64_t>(count, 1));
      float ssq = 0.f;
      for (int64_t i = 0; i < batch; ++i) {
        const float d = a[i] - mu;
        if (len[i] > 0.f) ssq += len[i] * (d * d);
      }
      const float var = ssq / static_cast<float>(std::max<int64_t>(count - 1, 1));
      const float scale = count >= 2 ? 1.f / std::sqrt(var + 1e-8f) : 1.f;  // fewer than 2 entries: 1
      for (int64_t i = 0; i < batch; ++i) a[i] = (a[i] - mu) * scale;
      break;
    }
  }
}

at::Tensor outcome_advantage_fwd(const at::Tensor& rewards_in, const at::Tensor& mask_in, const at::Tensor& group_in,
                                 int64_t kind, double epsilon, bool norm) {
  checks::outcome_advantage_args(rewards_in, mask_in, group_in, kind, epsilon);
  const at::Tensor rewards = rewards_in.contiguous(), mask = mask_in.contiguous(), group = group_in.contiguous();
  const int64_t batch = mask.size(0), steps = mask.size(1), width = rewards.size(1);
  at::Tensor adv = at::empty({batch, steps}, mask.options().dtype(at::kFloat));
  if (batch == 0) return adv;
  const int64_t* gid = group.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < batch; ++i)  // host memory: guard the bucket writes below
    TORCH_CHECK_INDEX(gid[i] >= 0 && gid[i] < batch, "outcome_advantage: group[", i, "] = ", gid[i],
                      " is outside [0, ", batch, ") (dense group ids expected)");
  std::vector<float> score(batch), length(batch, 0.f), a(batch);
  const bool need_len = kind == kOpo || kind == kRppBaseline;
  float* out = adv.data_ptr<float>();
  with_mask(mask, [&](auto m) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "outcome_advantage", [&] {
      const scalar_t* r = rewards.const_data_ptr<scalar_t>();
      at::parallel_for(0, batch, row_grain(width + (need_len ? steps : 0)), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          score[b] = lane_sum(r + b * width, width);
          if (need_len) length[b] = static_cast<float>(valid_count(m + b * steps, steps));
        }
      });
    });
    group_advantages(kind, score.data(), length.data(), gid, batch, static_cast<float>(epsilon), norm, a.data());
    at::parallel_for(0, batch, row_grain(steps), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float v = a[b];
        const auto* mb = m + b * steps;
        float* ob = out + b * steps;
        for (int64_t t = 0; t < steps; ++t) ob[t] = v * (mb[t] != 0 ? 1.f : 0.f);
      }
    });
  });
  return adv;
}

// ---- return_advantage -----------------------------------------------------------------------------

// R rows [b, b + R) scanned from their ends together. REMAX: returns only (adv written after).
// REINFORCE++: returns, plus each row's sum of the valid returns and its valid count.
template <int R, bool kRemax, typename T, typename M>
inline void scan_rows(const T* r, const M* m, float* ret, int64_t steps, float gamma, int64_t b, float* row_sum,
                      int64_t* row_count) {
  float carry[R], acc[R];
  int64_t cnt[R];
  for (int k = 0; k < R; ++k) carry[k] = acc[k] = 0.f, cnt[k] = 0;
  for (int64_t t = steps - 1; t >= 0; --t) {
    for (int k = 0; k < R; ++k) {
      const int64_t i = (b + k) * steps + t;
      const bool ok = m[i] != 0;
      const float mv = ok ? 1.f : 0.f;
      if constexpr (kRemax) {
        carry[k] = static_cast<float>(r[i]) * mv + carry[k];
        ret[i] = carry[k];
      } else {
        const float x = static_cast<float>(r[i]) + gamma * carry[k];
        ret[i] = x;
        carry[k] = x * mv;  // verl: running = running * mask[t]
        acc[k] += ok ? x : 0.f;
        cnt[k] += ok;
      }
    }
  }
  if constexpr (!kRemax)
    for (int k = 0; k < R; ++k) row_sum[b + k] = acc[k], row_count[b + k] = cnt[k];
}

template <bool kRemax, typename T, typename M>
void scan_range(const T* r, const M* m, float* ret, int64_t steps, float gamma, int64_t b0, int64_t b1, float* row_sum,
                int64_t* row_count) {
  int64_t b = b0;
  for (; b + kRows <= b1; b += kRows) scan_rows<kRows, kRemax>(r, m, ret, steps, gamma, b, row_sum, row_count);
  for (; b < b1; ++b) scan_rows<1, kRemax>(r, m, ret, steps, gamma, b, row_sum, row_count);
}

std::tuple<at::Tensor, at::Tensor> return_advantage_fwd(const at::Tensor& rewards_in, const at::Tensor& mask_in,
                                                        const std::optional<at::Tensor>& baselines_in, double gamma,
                                                        int64_t kind) {
  checks::return_advantage_args(rewards_in, mask_in, baselines_in, gamma, kind);
  const at::Tensor rewards = rewards_in.contiguous(), mask = mask_in.contiguous();
  const int64_t batch = rewards.size(0), steps = rewards.size(1);
  auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({batch, steps}, opts), ret = at::empty({batch, steps}, opts);
  if (batch == 0 || steps == 0) return {adv, ret};
  const bool remax = kind == 1;
  const at::Tensor base = remax ? baselines_in->contiguous() : at::Tensor();
  const float g = static_cast<float>(gamma);
  const int64_t grain = row_grain(steps);
  std::vector<float> row_sum(batch, 0.f);
  std::vector<int64_t> row_count(batch, 0);
  float* a = adv.data_ptr<float>();
  float* rt = ret.data_ptr<float>();
  with_mask(mask, [&](auto m) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "return_advantage", [&] {
      const scalar_t* r = rewards.const_data_ptr<scalar_t>();
      at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
        if (remax)
          scan_range<true>(r, m, rt, steps, g, b0, b1, row_sum.data(), row_count.data());
        else
          scan_range<false>(r, m, rt, steps, g, b0, b1, row_sum.data(), row_count.data());
      });
    });
    if (remax) {
      const float* bl = base.const_data_ptr<float>();
      at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t t = b * steps; t < (b + 1) * steps; ++t) a[t] = rt[t] - bl[b] * (m[t] != 0 ? 1.f : 0.f);
      });
      return;
    }
    // masked_whiten of the returns: mean and unbiased variance over the valid entries, row partial
    // sums combined in row order; fewer than 2 valid entries: scale 1 (mean 0 when none)
    float total = 0.f;
    int64_t count = 0;
    for (int64_t b = 0; b < batch; ++b) total += row_sum[b], count += row_count[b];
    const float mu = total / static_cast<float>(std::max<int64_t>(count, 1));
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) row_sum[b] = lane_sq_dev(rt + b * steps, m + b * steps, steps, mu);
    });
    float ssq = 0.f;
    for (int64_t b = 0; b < batch; ++b) ssq += row_sum[b];
    const float var = ssq / static_cast<float>(std::max<int64_t>(count - 1, 1));
    const float scale = count >= 2 ? 1.f / std::sqrt(var + 1e-8f) : 1.f;
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t t = b0 * steps; t < b1 * steps; ++t) a[t] = ((rt[t] - mu) * scale) * (m[t] != 0 ? 1.f : 0.f);
    });
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("outcome_advantage_fwd", &outcome_advantage_fwd);
  m.impl("return_advantage_fwd", &return_advantage_fwd);
}

}  // namespace fastalign::cpu
