// policy_loss's other fused types for csrc/cuda/ppo.cu: included by it inside its anonymous namespace,
// after the helpers this uses (tclamp, tmin, tmax, block reductions); not a standalone header.
#pragma once

// ---- fastalign.policy_loss's other fused types (fastalign/ops/policy_loss_fused.py) -------------
// kind 0 reinforce / gpg: -A x; 1 cispo: -clamp(r, a, b) A x (the weight a constant of the
// gradient); 2 sapo: -sigmoid(tau (r - 1)) (4 / tau) A, tau = a if A > 0 else b (z clamped to
// [-20, 20], as the CPU kernel); 3 gspo: the clipped surrogate of the row's s = exp(min(L, 10)),
// L = the row's mean of x - o, [a, b] = [1 - clip_low, 1 + clip_high]; 4 geo_mean: every token
// -Abar R, R = exp(mean m), m = sign(A) min(sign(A) d, sign(A) clamp(d, -a, b)), d the clamped
// log-ratio. The math is csrc/cpu/isa/ppo_lanes.h's PgLoss, op for op.
enum PgKind : int { kPgReinforce = 0, kPgCispo = 1, kPgSapo = 2, kPgGspo = 3, kPgGeoMean = 4 };
struct PgParams {
  int kind;
  float a, b;
};
// gspo: s, n = max(count, 1), open = L <= 10 (its clamp passes the gradient); geo_mean: s = R,
// lrow = -Abar R. coef: the backward's per-row factor.
struct PgRow {
  float s, n, lrow, coef;
  bool open;
};

__device__ __forceinline__ float sapo_sigmoid(float ratio, float tau) {
  const float z = tclamp(tau * (ratio - 1.f), -20.f, 20.f);
  return 1.f / (1.f + expf(-z));
}

struct GeoTerms {
  float d, dc, sgn, m;
};
__device__ __forceinline__ GeoTerms geo_terms(float x, float o, float a, float lo, float hi) {
  GeoTerms t;
  t.d = tclamp(x - o, -20.f, 20.f);
  t.dc = tclamp(t.d, -lo, hi);
  t.sgn = a > 0.f ? 1.f : (a < 0.f ? -1.f : a * 0.f);  // torch.sign: 0 -> 0, NaN -> NaN
  t.m = t.sgn * tmin(t.sgn * t.d, t.sgn * t.dc);
  return t;
}

// The row pass of gspo / geo_mean, by the whole block (every thread gets the result).
template <typename scalar_t>
__device__ PgRow pg_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, const scalar_t* __restrict__ z,
                        const bool* __restrict__ mask, int64_t base, int64_t steps, const PgParams& p) {
  PgRow r{1.f, 1.f, 0.f, 0.f, false};
  if (p.kind != kPgGspo && p.kind != kPgGeoMean) return r;
  float acc[3] = {0.f, 0.f, 0.f};  // sum of d (gspo) or m (geo_mean), sum of A, count
  for (int64_t t = threadIdx.x; t < steps; t += kThreads) {
    const int64_t i = base + t;
    if (!mask[i]) continue;
    const float xi = static_cast<float>(x[i]), oi = static_cast<float>(y[i]), ai = static_cast<float>(z[i]);
    acc[0] += p.kind == kPgGspo ? xi - oi : geo_terms(xi, oi, ai, p.a, p.b).m;
    acc[1] += ai;
    acc[2] += 1.f;
  }
  block_sum<3>(acc);
  __shared__ float s_acc[3];
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) s_acc[k] = acc[k];
  }
  __syncthreads();
  r.n = fmaxf(s_acc[2], 1.f);  // the reference's mean over max(n, 1)
  const float mean = s_acc[0] / r.n;
  if (p.kind == kPgGspo) {
    r.open = mean <= 10.f;
    r.s = expf(mean != mean ? mean : fminf(mean, 10.f));
  } else {
    r.s = expf(mean);
    r.lrow = -(s_acc[1] / r.n) * r.s;
  }
  __syncthreads();  // s_acc is read by every thread before the next row pass may write it
  return r;
}

__device__ __forceinline__ void pg_acc(float x, float o, float a, const PgParams& p, const PgRow& r, float* acc) {
  float l;
  if (p.kind == kPgReinforce) {
    l = -a * x;
  } else if (p.kind == kPgGspo) {
    l = clip_acc(r.s, a, p.a, p.b, acc);
  } else if (p.kind == kPgGeoMean) {
    const GeoTerms t = geo_terms(x, o, a, p.a, p.b);
    const bool moved = t.d != t.dc;
    acc[kClipped] += moved && a != 0.f ? 1.f : 0.f;
    acc[kClipLow] += moved && a < 0.f ? 1.f : 0.f;
    acc[kClipHigh] += moved && a > 0.f ? 1.f : 0.f;
    acc_ratio(r.s, acc);
    l = r.lrow;
  } else {
    const float ratio = expf(tclamp(x - o, -20.f, 20.f));
    acc_ratio(ratio, acc);
    if (p.kind == kPgCispo) {
      l = (-tclamp(ratio, p.a, p.b) * a) * x;
      const bool low = ratio < p.a, high = ratio > p.b;
      acc[kClipped] += low || high ? 1.f : 0.f;
      acc[kClipLow] += low ? 1.f : 0.f;
      acc[kClipHigh] += high ? 1.f : 0.f;
    } else {
      const float tau = a > 0.f ? p.a : p.b;
      l = -(sapo_sigmoid(ratio, tau) * (4.f / tau)) * a;
    }
  }
  acc[kLoss] += l;
  acc[kCount] += 1.f;
  acc[kKl] += o - x;
}

// g * d(row loss) / dx of one valid token (g = grad_out[0] w_b; gspo's r.coef holds g S s / n,
// geo_mean's g (-Abar R)).
__device__ __forceinline__ float pg_grad(float x, float o, float a, const PgParams& p, const PgRow& r, float g) {
  if (p.kind == kPgReinforce) return -a * g;
  if (p.kind == kPgGspo) return r.coef;
  const float d = x - o;
  const bool in_range = inside(d, -20.f, 20.f);
  if (p.kind == kPgGeoMean) {
    const GeoTerms t = geo_terms(x, o, a, p.a, p.b);
    const float u = t.sgn * t.d, v = t.sgn * t.dc;
    const float dm = (t.sgn * t.sgn) * (min_share(u, v) + (inside(t.d, -p.a, p.b) ? min_share(v, u) : 0.f));
    return in_range ? r.coef * dm : 0.f;
  }
  const float ratio = expf(tclamp(d, -20.f, 20.f));
  if (p.kind == kPgCispo) return (-tclamp(ratio, p.a, p.b) * a) * g;
  const float tau = a > 0.f ? p.a : p.b;
  const float sg = sapo_sigmoid(ratio, tau);
  return in_range ? ((-a * g) * (4.f * sg * (1.f - sg))) * ratio : 0.f;
}
