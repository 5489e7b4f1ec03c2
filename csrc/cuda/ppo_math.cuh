// The per-token math of the PPO policy and value losses for csrc/cuda/ppo.cu (torch's NaN-propagating
// max/min/clamp forward, autograd's half shares at ties backward): included by it inside its
// anonymous namespace, after kParts/Part/Agg; not a standalone header.
#pragma once

__device__ __forceinline__ float tmax(float a, float b) { return (a >= b || a != a) ? a : b; }
__device__ __forceinline__ float tmin(float a, float b) { return (a <= b || a != a) ? a : b; }
__device__ __forceinline__ float tclamp(float x, float lo, float hi) { return tmin(tmax(x, lo), hi); }
__device__ __forceinline__ bool inside(float x, float lo, float hi) { return x >= lo && x <= hi; }
__device__ __forceinline__ float max_share(float s, float o) { return s < o ? 0.f : (s == o ? 0.5f : 1.f); }
__device__ __forceinline__ float min_share(float s, float o) { return s > o ? 0.f : (s == o ? 0.5f : 1.f); }
// NaN-propagating max (torch's amax)
__device__ __forceinline__ float nanmax(float a, float b) { return a != a ? a : ((b > a || b != b) ? b : a); }

struct PolicyParams {
  float lo, hi, dual;
  bool use_dual;
};
struct ValueParams {
  float clip;  // <= 0: off
};

__device__ __forceinline__ void acc_ratio(float ratio, float* acc) {
  acc[kRatio] += ratio;
  acc[kMaxPart] = nanmax(acc[kMaxPart], ratio);
}

// The clipped surrogate max(-A r, -A clamp(r, lo, hi)) of one valid token and its statistics
// (clipped: the clipped term strictly larger; low: with A < 0, high: with A > 0).
__device__ __forceinline__ float clip_acc(float ratio, float a, float lo, float hi, float* acc) {
  const float na = -a;
  const float l1 = na * ratio, l2 = na * tclamp(ratio, lo, hi);
  const bool clipped = l2 > l1;
  acc[kClipped] += clipped ? 1.f : 0.f;
  acc[kClipLow] += clipped && a < 0.f ? 1.f : 0.f;
  acc[kClipHigh] += clipped && a > 0.f ? 1.f : 0.f;
  acc_ratio(ratio, acc);
  return tmax(l1, l2);
}

// gm * d max(l1, l2) / d r: autograd's half shares at ties, the clamp passing on [lo, hi]
__device__ __forceinline__ float clip_grad(float ratio, float a, float lo, float hi, float gm) {
  const float na = -a;
  const float l1 = na * ratio, l2 = na * tclamp(ratio, lo, hi);
  float gr = na * (gm * max_share(l1, l2));
  if (inside(ratio, lo, hi)) gr += na * (gm * max_share(l2, l1));
  return gr;
}

// Accumulates one valid token into the partials (loss, count, statistics).
__device__ __forceinline__ void policy_acc(float x, float o, float a, const PolicyParams& p, float* acc) {
  const float ratio = expf(tclamp(x - o, -20.f, 20.f));
  float m = clip_acc(ratio, a, p.lo, p.hi, acc);
  if (p.use_dual && a < 0.f) {
    const float l3 = -a * p.dual;
    acc[kLower] += m > l3 ? 1.f : 0.f;
    m = tmin(m, l3);
  }
  acc[kLoss] += m;
  acc[kCount] += 1.f;
  acc[kKl] += o - x;
}

__device__ __forceinline__ float policy_grad(float x, float o, float a, const PolicyParams& p, float g) {
  const float d = x - o;
  const float ratio = expf(tclamp(d, -20.f, 20.f));
  float gm = g;
  if (p.use_dual && a < 0.f) {
    const float na = -a;
    gm *= min_share(tmax(na * ratio, na * tclamp(ratio, p.lo, p.hi)), na * p.dual);
  }
  return inside(d, -20.f, 20.f) ? clip_grad(ratio, a, p.lo, p.hi, gm) * ratio : 0.f;
}

__device__ __forceinline__ void value_acc(float v, float vo, float r, const ValueParams& p, float* acc) {
  const float e1 = v - r;
  const float s1 = e1 * e1;
  float m = s1;
  if (p.clip > 0.f) {
    const float e2 = tclamp(v, vo - p.clip, vo + p.clip) - r;
    const float s2 = e2 * e2;
    acc[2] += s2 > s1 ? 1.f : 0.f;
    m = tmax(s1, s2);
  }
  acc[0] += m;
  acc[1] += 1.f;
  acc[3] += v;
  acc[4] += s1;
}

__device__ __forceinline__ float value_grad(float v, float vo, float r, const ValueParams& p, float g) {
  const float e1 = v - r;
  if (p.clip <= 0.f) return g * 2.f * e1;
  const float lo = vo - p.clip, hi = vo + p.clip;
  const float e2 = tclamp(v, lo, hi) - r;
  const float s1 = e1 * e1, s2 = e2 * e2;
  float gv = g * max_share(s1, s2) * 2.f * e1;
  if (inside(v, lo, hi)) gv += g * max_share(s2, s1) * 2.f * e2;
  return gv;
}

// Fixed-order reduction of N values over the block (kThreads threads): sums, and a
// NaN-propagating max for value MAXK (if any); the result is in thread 0.
