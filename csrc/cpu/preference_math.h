// The per-pair DPO math shared by the CPU preference ops (preference.cpp: the original four loss
// types of the margin delta) and the general ops (dpo_multi.cpp). See preference.cpp for the formulas.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastalign::cpu::dpo {

enum LossType : int64_t { kSigmoid = 0, kIpo = 1, kHinge = 2, kRobust = 3 };

inline float log_sigmoid(float x) { return std::min(x, 0.f) - std::log1p(std::exp(-std::fabs(x))); }
inline float sigmoid(float x) {
  const float e = std::exp(-std::fabs(x));  // in (0, 1]: no overflow
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

struct PairParams {
  float beta, eps, half_inv_beta, robust_scale;
  int64_t type;
};

inline PairParams make_params(double beta, int64_t type, double eps) {
  return {static_cast<float>(beta), static_cast<float>(eps), static_cast<float>(1.0 / (2.0 * beta)),
          static_cast<float>(1.0 / (1.0 - 2.0 * eps)), type};
}

inline float pair_loss(float delta, const PairParams& p) {
  const float x = p.beta * delta;
  switch (p.type) {
    case kSigmoid:
      return -(1.f - p.eps) * log_sigmoid(x) - p.eps * log_sigmoid(-x);
    case kIpo: {
      const float d = delta - p.half_inv_beta;
      return d * d;
    }
    case kHinge: {
      const float h = 1.f - x;
      return (h > 0.f || std::isnan(h)) ? h : 0.f;
    }
    default:  // kRobust
      return (-(1.f - p.eps) * log_sigmoid(x) + p.eps * log_sigmoid(-x)) * p.robust_scale;
  }
}

// d loss / d delta
inline float pair_grad(float delta, const PairParams& p) {
  const float x = p.beta * delta;
  switch (p.type) {
    case kSigmoid:
      return p.beta * (-(1.f - p.eps) * sigmoid(-x) + p.eps * sigmoid(x));
    case kIpo:
      return 2.f * (delta - p.half_inv_beta);
    case kHinge:
      return (1.f - x > 0.f || std::isnan(x)) ? -p.beta : 0.f;
    default:
      return p.beta * (-(1.f - p.eps) * sigmoid(-x) - p.eps * sigmoid(x)) * p.robust_scale;
  }
}

// Rows per parallel task: about 32 K tokens, so that small batches stay on one thread.
inline int64_t row_grain(int64_t steps) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(steps, 1)); }

}  // namespace fastalign::cpu::dpo
