// The PPO losses' per-token math and row loops on W-lane float vectors (see lanes.h). NOT a normal
// header: ppo_rows.h includes it once per ISA object, inside a namespace that defines
// `constexpr int W` (4, 8 or 16 lanes).
//
// The math mirrors kernels/reference.py op by op, with torch's NaN-propagating max/min/clamp
// forward and autograd's half shares at ties and inclusive clamp bounds backward.

#include "lanes_w.h"

// torch.maximum / torch.minimum / torch.clamp forward, NaN-propagating like torch.
FA_INLINE vf tmax(vf a, vf b) { return blend((a >= b) | (a != a), a, b); }
FA_INLINE vf tmin(vf a, vf b) { return blend((a <= b) | (a != a), a, b); }
FA_INLINE vf tclamp(vf x, vf lo, vf hi) { return tmin(tmax(x, lo), hi); }
// clamp passes the gradient on [lo, hi] (inclusive), as autograd's clamp_backward
FA_INLINE vi inside(vf x, vf lo, vf hi) { return (x >= lo) & (x <= hi); }
// torch.maximum/minimum backward: the share of the gradient that goes to `self` (NaN: all of it).
FA_INLINE vf max_share(vf self, vf other) {
  return blend(self < other, splat(0.f), blend(self == other, splat(0.5f), splat(1.f)));
}
FA_INLINE vf min_share(vf self, vf other) {
  return blend(self > other, splat(0.f), blend(self == other, splat(0.5f), splat(1.f)));
}

// exp(x) for x in [-20, 20] (the clamped log-ratio) or NaN: x = n ln2 + r, |r| <= ln2 / 2, with
// ln2 split in two (Cody-Waite) so that r is exact, exp(r) by Cephes' degree-7 polynomial (about
// 1 ulp), 2^n from the exponent bits (|n| <= 29, never subnormal or overflowing). exp(0) = 1 and
// exp(fp32(ln 2)) = 2 exactly, like libm, so the ties that autograd splits are ties here too.
FA_INLINE vf vexp(vf x) {
  const vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const vi e = (__builtin_convertvector(sel(x == x, n), vi) + 127) << 23;
  const vf res = p * (vf)e;  // a vector cast reinterprets the bits
  return blend(x != x, x, res);
}

// A row's last (steps mod W) tokens, copied into W-lane buffers padded with masked lanes.
template <typename T, typename M>
struct Pad {
  T x[W], y[W], z[W];
  M m[W];
  FA_INLINE Pad(const T* xp, const T* yp, const T* zp, const M* mp, int64_t i, int64_t k) {
    for (int j = 0; j < W; ++j) {
      const bool in = j < k;
      x[j] = in ? xp[i + j] : T(0.f);
      y[j] = in ? yp[i + j] : T(0.f);
      z[j] = in ? zp[i + j] : T(0.f);
      m[j] = in ? mp[i + j] : M(0);
    }
  }
};

// Per-token policy loss, accumulated into acc = (loss, count, clipped, lower-clipped, old - logp).
FA_INLINE void policy_acc(vf x, vf o, vf a, vi valid, const PolicyParams& p, vf* acc) {
  const vf ratio = vexp(tclamp(x - o, splat(-20.f), splat(20.f)));
  const vf na = -a;
  const vf l1 = na * ratio, l2 = na * tclamp(ratio, splat(p.lo), splat(p.hi));
  vf m = tmax(l1, l2);
  if (p.use_dual) {
    const vi neg = a < 0.f;
    const vf l3 = na * p.dual;
    acc[3] += sel(valid & neg & (m > l3), splat(1.f));
    m = blend(neg, tmin(m, l3), m);
  }
  acc[0] += sel(valid, m);
  acc[1] += sel(valid, splat(1.f));
  acc[2] += sel(valid & (l2 > l1), splat(1.f));
  acc[4] += sel(valid, o - x);
}

// g * d(policy token loss)/d(logp) at valid tokens, 0 elsewhere.
FA_INLINE vf policy_grad(vf x, vf o, vf a, vi valid, const PolicyParams& p, float g) {
  const vf d = x - o;
  const vf ratio = vexp(tclamp(d, splat(-20.f), splat(20.f)));
  const vf na = -a;
  const vf lo = splat(p.lo), hi = splat(p.hi);
  const vf l1 = na * ratio, l2 = na * tclamp(ratio, lo, hi);
  vf gm = splat(g);
  if (p.use_dual) gm = blend(a < 0.f, gm * min_share(tmax(l1, l2), na * p.dual), gm);
  vf gr = na * (gm * max_share(l1, l2));
  gr += sel(inside(ratio, lo, hi), na * (gm * max_share(l2, l1)));
  return sel(valid & inside(d, splat(-20.f), splat(20.f)), gr * ratio);  // d exp(x)/dx = exp(x)
}

// fastalign.policy_loss's reinforce / cispo / sapo token loss (kernels/reference_policy_losses.py),
// accumulated into acc = (loss, count, cispo: ratio < a, cispo: ratio > b, old - logp).
//   reinforce: -A x;   cispo: -clamp(r, a, b) A x (the weight is a constant of the gradient);
//   sapo: -sigmoid(z) (4 / tau) A, z = tau (r - 1), tau = a if A > 0 else b, the sigmoid as
//   1 / (1 + exp(-z)) with z clamped to [-20, 20] (vexp's range): off by < 2.1e-9 beyond.
FA_INLINE vf sapo_sigmoid(vf ratio, vf tau) {
  const vf z = tclamp(tau * (ratio - 1.f), splat(-20.f), splat(20.f));
  return 1.f / (1.f + vexp(-z));
}

FA_INLINE void pg_acc(vf x, vf o, vf a, vi valid, const PgParams& p, vf* acc) {
  vf l;
  if (p.kind == kPgReinforce) {
    l = -a * x;
  } else {
    const vf ratio = vexp(tclamp(x - o, splat(-20.f), splat(20.f)));
    if (p.kind == kPgCispo) {
      l = (-tclamp(ratio, splat(p.a), splat(p.b)) * a) * x;
      acc[2] += sel(valid & (ratio < p.a), splat(1.f));
      acc[3] += sel(valid & (ratio > p.b), splat(1.f));
    } else {
      const vf tau = blend(a > 0.f, splat(p.a), splat(p.b));
      l = -(sapo_sigmoid(ratio, tau) * (4.f / tau)) * a;
    }
  }
  acc[0] += sel(valid, l);
  acc[1] += sel(valid, splat(1.f));
  acc[4] += sel(valid, o - x);
}

// g * d(token loss)/d(logp): reinforce -A; cispo -clamp(r, a, b) A; sapo -A 4 s (1 - s) r inside
// the log-ratio clamp [-20, 20] (autograd's inclusive clamp), 0 outside.
FA_INLINE vf pg_grad(vf x, vf o, vf a, vi valid, const PgParams& p, float g) {
  if (p.kind == kPgReinforce) return sel(valid, -a * g);
  const vf d = x - o;
  const vf ratio = vexp(tclamp(d, splat(-20.f), splat(20.f)));
  if (p.kind == kPgCispo) return sel(valid, (-tclamp(ratio, splat(p.a), splat(p.b)) * a) * g);
  const vf tau = blend(a > 0.f, splat(p.a), splat(p.b));
  const vf s = sapo_sigmoid(ratio, tau);
  return sel(valid & inside(d, splat(-20.f), splat(20.f)), ((-a * g) * (4.f * s * (1.f - s))) * ratio);
}

// acc = (loss, count, clipped, sum v, sum (v - R)^2)
FA_INLINE void value_acc(vf v, vf vo, vf r, vi valid, const ValueParams& p, vf* acc) {
  const vf e1 = v - r;
  const vf s1 = e1 * e1;
  vf m = s1;
  if (p.clip > 0.f) {
    const vf e2 = tclamp(v, vo - p.clip, vo + p.clip) - r;
    const vf s2 = e2 * e2;
    acc[2] += sel(valid & (s2 > s1), splat(1.f));
    m = tmax(s1, s2);
  }
  acc[0] += sel(valid, m);
  acc[1] += sel(valid, splat(1.f));
  acc[3] += sel(valid, v);
  acc[4] += sel(valid, s1);
}

FA_INLINE vf value_grad(vf v, vf vo, vf r, vi valid, const ValueParams& p, float g) {
  const vf e1 = v - r;
  if (p.clip <= 0.f) return sel(valid, g * 2.f * e1);
  const vf lo = vo - p.clip, hi = vo + p.clip;
  const vf e2 = tclamp(v, lo, hi) - r;
  const vf s1 = e1 * e1, s2 = e2 * e2;
  vf gv = g * max_share(s1, s2) * 2.f * e1;
  gv += sel(inside(v, lo, hi), g * max_share(s2, s1) * 2.f * e2);
  return sel(valid, gv);
}

// ---- row loops, shared by both losses ------------------------------------------------------------
// A loss is a struct with its Params type and two per-token functions on W-lane vectors:
//   acc(x, y, z, valid, p, acc[kPpoParts])  adds the token's loss and statistics to acc;
//   grad(x, y, z, valid, p, g)              g * d(token loss)/dx at valid tokens, 0 elsewhere.
// A new loss of this shape (three [B, T] inputs, a mask, scalar parameters) is those two only.

struct PolicyLoss {
  using Params = PolicyParams;
  static FA_INLINE void acc(vf x, vf y, vf z, vi valid, const Params& p, vf* a) { policy_acc(x, y, z, valid, p, a); }
  static FA_INLINE vf grad(vf x, vf y, vf z, vi valid, const Params& p, float g) {
    return policy_grad(x, y, z, valid, p, g);
  }
};

struct PgLoss {
  using Params = PgParams;
  static FA_INLINE void acc(vf x, vf y, vf z, vi valid, const Params& p, vf* a) { pg_acc(x, y, z, valid, p, a); }
  static FA_INLINE vf grad(vf x, vf y, vf z, vi valid, const Params& p, float g) { return pg_grad(x, y, z, valid, p, g); }
};

struct ValueLoss {
  using Params = ValueParams;
  static FA_INLINE void acc(vf x, vf y, vf z, vi valid, const Params& p, vf* a) { value_acc(x, y, z, valid, p, a); }
  static FA_INLINE vf grad(vf x, vf y, vf z, vi valid, const Params& p, float g) {
    return value_grad(x, y, z, valid, p, g);
  }
};

// parts[b, k] = row b's sum of acc[k] over its valid tokens, for rows [b0, b1).
template <typename Loss, typename T, typename M>
FA_INLINE void fwd_rows(const T* x, const T* y, const T* z, const M* m, int64_t steps, typename Loss::Params p,
                        float* parts, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    vf acc[kPpoParts] = {};
    const int64_t base = b * steps;  // 64-bit offsets
    int64_t t = 0;
    for (; t + W <= steps; t += W) {
      const int64_t i = base + t;
      Loss::acc(vload(x + i), vload(y + i), vload(z + i), load_mask(m + i), p, acc);
    }
    if (t < steps) {
      const Pad<T, M> q(x, y, z, m, base + t, steps - t);
      Loss::acc(vload(q.x), vload(q.y), vload(q.z), load_mask(q.m), p, acc);
    }
    for (int k = 0; k < kPpoParts; ++k) parts[b * kPpoParts + k] = hsum(acc[k]);
  }
}

// gx[b, t] = g * w[b] * d(token loss)/dx for rows [b0, b1), 0 at masked tokens.
template <typename Loss, typename T, typename M>
FA_INLINE void bwd_rows(const T* x, const T* y, const T* z, const M* m, int64_t steps, typename Loss::Params p,
                        const float* w, float g, T* gx, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const float gb = g * w[b];
    const int64_t base = b * steps;
    int64_t t = 0;
    for (; t + W <= steps; t += W) {
      const int64_t i = base + t;
      vstore(gx + i, Loss::grad(vload(x + i), vload(y + i), vload(z + i), load_mask(m + i), p, gb), W);
    }
    if (t < steps) {
      const Pad<T, M> q(x, y, z, m, base + t, steps - t);
      vstore(gx + base + t, Loss::grad(vload(q.x), vload(q.y), vload(q.z), load_mask(q.m), p, gb), steps - t);
    }
  }
}
