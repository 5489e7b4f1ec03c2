// The PPO losses' per-token math and row loops on W-lane float vectors (see lanes.h). NOT a normal
// header: ppo_rows.h includes it once per ISA object, inside a namespace that defines
// `constexpr int W` (4, 8 or 16 lanes).
//
// The math mirrors kernels/reference.py and kernels/reference_policy_losses.py op by op, with
// torch's NaN-propagating max/min/clamp forward and autograd's half shares at ties and inclusive
// clamp bounds backward. Every loss runs on one row driver (fwd_rows / bwd_rows at the end): a
// per-row context first (a row pass for the sequence-level gspo and geo_mean, nothing for the
// per-token losses), then the token sweep.

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

// Slots of acc (kernel_args.h kPpoParts): loss, count, then the statistics.
enum Part { kLoss = 0, kCount = 1, kClipped = 2, kLower = 3, kKl = 4, kClipLow = 5, kClipHigh = 6, kRatio = 7,
            kRatioMax = kPpoMaxPart };

// torch.maximum's NaN propagation for the running ratio max (the reference's amax)
FA_INLINE void acc_ratio(vf ratio, vi valid, vf* acc) {
  acc[kRatio] += sel(valid, ratio);
  acc[kRatioMax] = tmax(acc[kRatioMax], sel(valid, ratio));
}

// The clipped surrogate l = max(-A r, -A clamp(r, lo, hi)) and its statistics: clipped = the
// clipped term strictly larger, which is r < lo with A < 0 (clip low) or r > hi with A > 0 (clip
// high). Returns l; the ppo and gspo losses share it.
FA_INLINE vf clip_acc(vf ratio, vf a, vi valid, float lo, float hi, vf* acc) {
  const vf na = -a;
  const vf l1 = na * ratio, l2 = na * tclamp(ratio, splat(lo), splat(hi));
  const vi clipped = valid & (l2 > l1);
  acc[kClipped] += sel(clipped, splat(1.f));
  acc[kClipLow] += sel(clipped & (a < 0.f), splat(1.f));
  acc[kClipHigh] += sel(clipped & (a > 0.f), splat(1.f));
  acc_ratio(ratio, valid, acc);
  return tmax(l1, l2);
}

// d l / d r of the clipped surrogate times gm: autograd's half shares at a tie of the max, the
// clamp passing the gradient on [lo, hi].
FA_INLINE vf clip_grad(vf ratio, vf a, float lo, float hi, vf gm) {
  const vf na = -a;
  const vf l1 = na * ratio, l2 = na * tclamp(ratio, splat(lo), splat(hi));
  return na * (gm * max_share(l1, l2)) + sel(inside(ratio, splat(lo), splat(hi)), na * (gm * max_share(l2, l1)));
}

// ---- the losses ----------------------------------------------------------------------------------
// A loss is a struct with its Params type, a per-row context Row (empty for the per-token losses)
// and four functions on W-lane vectors:
//   fwd_row(x, y, z, m, base, steps, p) / bwd_row(...)  the row's constants (a row pass, or none);
//   acc(x, y, z, valid, p, row, acc[kPpoParts])         adds the token's loss and statistics to acc;
//   grad(x, y, z, valid, p, row, g)                     g * d(row loss)/dx at valid tokens, 0 elsewhere.
// A new loss of this shape (three [B, T] inputs, a mask, scalar parameters) is those only.

// Calls f(x, y, z, valid, t, k) on the row [base, base + steps) in W-lane steps (t: the first
// token, k: how many lanes are real); the tail padded with masked lanes.
template <typename T, typename M, typename F>
FA_INLINE void sweep_row(const T* x, const T* y, const T* z, const M* m, int64_t base, int64_t steps, F&& f) {
  int64_t t = 0;
  for (; t + W <= steps; t += W) {
    const int64_t i = base + t;
    f(vload(x + i), vload(y + i), vload(z + i), load_mask(m + i), t, static_cast<int64_t>(W));
  }
  if (t < steps) {
    const Pad<T, M> q(x, y, z, m, base + t, steps - t);
    f(vload(q.x), vload(q.y), vload(q.z), load_mask(q.m), t, steps - t);
  }
}

struct NoRow {};

// The per-token losses: no row pass.
struct TokenLoss {
  using Row = NoRow;
  template <typename T, typename M, typename P>
  static FA_INLINE Row fwd_row(const T*, const T*, const T*, const M*, int64_t, int64_t, const P&) { return {}; }
  template <typename T, typename M, typename P>
  static FA_INLINE Row bwd_row(const T*, const T*, const T*, const M*, int64_t, int64_t, const P&) { return {}; }
};

// ppo: the clipped surrogate of r = exp(clamp(x - o, -20, 20)), dual clip c for A < 0: min(l, -A c).
struct PolicyLoss : TokenLoss {
  using Params = PolicyParams;
  static constexpr const char* kName = "ppo_policy_loss";
  static FA_INLINE void acc(vf x, vf o, vf a, vi valid, const Params& p, const Row&, vf* acc) {
    const vf ratio = vexp(tclamp(x - o, splat(-20.f), splat(20.f)));
    vf m = clip_acc(ratio, a, valid, p.lo, p.hi, acc);
    if (p.use_dual) {
      const vi neg = a < 0.f;
      const vf l3 = -a * p.dual;
      acc[kLower] += sel(valid & neg & (m > l3), splat(1.f));
      m = blend(neg, tmin(m, l3), m);
    }
    acc[kLoss] += sel(valid, m);
    acc[kCount] += sel(valid, splat(1.f));
    acc[kKl] += sel(valid, o - x);
  }
  static FA_INLINE vf grad(vf x, vf o, vf a, vi valid, const Params& p, const Row&, float g) {
    const vf d = x - o;
    const vf ratio = vexp(tclamp(d, splat(-20.f), splat(20.f)));
    vf gm = splat(g);
    if (p.use_dual) {
      const vf na = -a;
      const vf l1 = na * ratio, l2 = na * tclamp(ratio, splat(p.lo), splat(p.hi));
      gm = blend(a < 0.f, gm * min_share(tmax(l1, l2), na * p.dual), gm);
    }
    return sel(valid & inside(d, splat(-20.f), splat(20.f)), clip_grad(ratio, a, p.lo, p.hi, gm) * ratio);
  }
};

// fastalign.policy_loss's other fused types (kernels/reference_policy_losses.py):
//   reinforce: -A x;   cispo: -clamp(r, a, b) A x (the weight is a constant of the gradient);
//   sapo: -sigmoid(z) (4 / tau) A, z = tau (r - 1), tau = a if A > 0 else b, the sigmoid as
//   1 / (1 + exp(-z)) with z clamped to [-20, 20] (vexp's range): off by < 2.1e-9 beyond;
//   gspo: the clipped surrogate of the row's ratio s = exp(min(L, 10)), L = the row's mean of
//   x - o, differentiable through every token (d s / d x_t = s / n where L <= 10);
//   geo_mean: every token of the row carries -Abar R, R = exp(mean_t m_t), Abar = mean_t A_t,
//   m = sign(A) min(sign(A) d, sign(A) clamp(d, -a, b)), d = clamp(x - o, -20, 20).
FA_INLINE vf sapo_sigmoid(vf ratio, vf tau) {
  const vf z = tclamp(tau * (ratio - 1.f), splat(-20.f), splat(20.f));
  return 1.f / (1.f + vexp(-z));
}

// geo_mean's log-ratio: (d, the clamped d, sign(A), m)
struct GeoTerms {
  vf d, dc, sgn, m;
};
FA_INLINE GeoTerms geo_terms(vf x, vf o, vf a, float lo, float hi) {
  GeoTerms t;
  t.d = tclamp(x - o, splat(-20.f), splat(20.f));
  t.dc = tclamp(t.d, splat(-lo), splat(hi));
  t.sgn = blend(a > 0.f, splat(1.f), blend(a < 0.f, splat(-1.f), a * 0.f));  // torch.sign: 0 -> 0, NaN -> NaN
  t.m = t.sgn * tmin(t.sgn * t.d, t.sgn * t.dc);
  return t;
}

struct PgLoss {
  using Params = PgParams;
  static constexpr const char* kName = "pg_policy_loss";
  // gspo: s = exp(min(L, 10)), open = L <= 10 (the clamp passes the gradient), n; bwd: S = sum_t d l_t / d s.
  // geo_mean: row loss -Abar R, with R.
  struct Row {
    float s = 1.f, n = 1.f, sum_dl = 0.f, lrow = 0.f, neg_abar_r = 0.f;
    bool open = false;
  };

  template <typename T, typename M>
  static FA_INLINE Row fwd_row(const T* x, const T* y, const T* z, const M* m, int64_t base, int64_t steps,
                               const Params& p) {
    Row r;
    if (p.kind != kPgGspo && p.kind != kPgGeoMean) return r;
    vf s1 = {}, s2 = {}, n = {};
    sweep_row(x, y, z, m, base, steps, [&](vf xv, vf ov, vf av, vi valid, int64_t, int64_t) {
      n += sel(valid, splat(1.f));
      if (p.kind == kPgGspo) {
        s1 += sel(valid, xv - ov);
      } else {
        s1 += sel(valid, geo_terms(xv, ov, av, p.a, p.b).m);
        s2 += sel(valid, av);
      }
    });
    r.n = std::max(hsum(n), 1.f);  // the reference's mean over max(n, 1)
    if (p.kind == kPgGspo) {
      const float mean = hsum(s1) / r.n;
      r.open = mean <= 10.f;
      r.s = std::exp(mean != mean ? mean : std::min(mean, 10.f));
    } else {
      r.s = std::exp(hsum(s1) / r.n);
      r.neg_abar_r = -(hsum(s2) / r.n) * r.s;
      r.lrow = r.neg_abar_r;
    }
    return r;
  }

  template <typename T, typename M>
  static FA_INLINE Row bwd_row(const T* x, const T* y, const T* z, const M* m, int64_t base, int64_t steps,
                               const Params& p) {
    Row r = fwd_row(x, y, z, m, base, steps, p);
    if (p.kind != kPgGspo) return r;
    vf sum = {};
    sweep_row(x, y, z, m, base, steps, [&](vf, vf, vf av, vi valid, int64_t, int64_t) {
      sum += sel(valid, clip_grad(splat(r.s), av, p.a, p.b, splat(1.f)));
    });
    r.sum_dl = hsum(sum);
    return r;
  }

  static FA_INLINE void acc(vf x, vf o, vf a, vi valid, const Params& p, const Row& r, vf* acc) {
    vf l;
    if (p.kind == kPgReinforce) {
      l = -a * x;
    } else if (p.kind == kPgGspo) {
      l = clip_acc(splat(r.s), a, valid, p.a, p.b, acc);
    } else if (p.kind == kPgGeoMean) {
      const GeoTerms t = geo_terms(x, o, a, p.a, p.b);
      const vi clipped = valid & (t.d != t.dc);
      acc[kClipped] += sel(clipped & (a != 0.f), splat(1.f));
      acc[kClipLow] += sel(clipped & (a < 0.f), splat(1.f));
      acc[kClipHigh] += sel(clipped & (a > 0.f), splat(1.f));
      acc_ratio(splat(r.s), valid, acc);
      l = splat(r.lrow);
    } else {
      const vf ratio = vexp(tclamp(x - o, splat(-20.f), splat(20.f)));
      acc_ratio(ratio, valid, acc);
      if (p.kind == kPgCispo) {
        l = (-tclamp(ratio, splat(p.a), splat(p.b)) * a) * x;
        const vi low = valid & (ratio < p.a), high = valid & (ratio > p.b);
        acc[kClipped] += sel(low | high, splat(1.f));
        acc[kClipLow] += sel(low, splat(1.f));
        acc[kClipHigh] += sel(high, splat(1.f));
      } else {
        const vf tau = blend(a > 0.f, splat(p.a), splat(p.b));
        l = -(sapo_sigmoid(ratio, tau) * (4.f / tau)) * a;
      }
    }
    acc[kLoss] += sel(valid, l);
    acc[kCount] += sel(valid, splat(1.f));
    acc[kKl] += sel(valid, o - x);
  }

  // reinforce -A; cispo -clamp(r, a, b) A; sapo -A 4 s (1 - s) r inside the log-ratio clamp
  // [-20, 20] (autograd's inclusive clamp), 0 outside; gspo S s / n (L <= 10); geo_mean
  // -Abar R dm/dx (the row's n tokens each carry the row loss: n (1 / n) dR/dm).
  static FA_INLINE vf grad(vf x, vf o, vf a, vi valid, const Params& p, const Row& r, float g) {
    if (p.kind == kPgReinforce) return sel(valid, -a * g);
    if (p.kind == kPgGspo) return sel(valid, splat(r.open ? ((g * r.sum_dl) * r.s) / r.n : 0.f));
    const vf d = x - o;
    const vi in_range = inside(d, splat(-20.f), splat(20.f));
    if (p.kind == kPgGeoMean) {
      const GeoTerms t = geo_terms(x, o, a, p.a, p.b);
      const vf u = t.sgn * t.d, v = t.sgn * t.dc;
      const vf dm = (t.sgn * t.sgn) * (min_share(u, v) + sel(inside(t.d, splat(-p.a), splat(p.b)), min_share(v, u)));
      return sel(valid & in_range, (g * r.neg_abar_r) * dm);
    }
    const vf ratio = vexp(tclamp(d, splat(-20.f), splat(20.f)));
    if (p.kind == kPgCispo) return sel(valid, (-tclamp(ratio, splat(p.a), splat(p.b)) * a) * g);
    const vf tau = blend(a > 0.f, splat(p.a), splat(p.b));
    const vf s = sapo_sigmoid(ratio, tau);
    return sel(valid & in_range, ((-a * g) * (4.f * s * (1.f - s))) * ratio);
  }
};

// acc = (loss, count, clipped, sum v, sum (v - R)^2)
struct ValueLoss : TokenLoss {
  using Params = ValueParams;
  static constexpr const char* kName = "ppo_value_loss";
  static FA_INLINE void acc(vf v, vf vo, vf r, vi valid, const Params& p, const Row&, vf* acc) {
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
  static FA_INLINE vf grad(vf v, vf vo, vf r, vi valid, const Params& p, const Row&, float g) {
    const vf e1 = v - r;
    if (p.clip <= 0.f) return sel(valid, g * 2.f * e1);
    const vf lo = vo - p.clip, hi = vo + p.clip;
    const vf e2 = tclamp(v, lo, hi) - r;
    const vf s1 = e1 * e1, s2 = e2 * e2;
    vf gv = g * max_share(s1, s2) * 2.f * e1;
    gv += sel(inside(v, lo, hi), g * max_share(s2, s1) * 2.f * e2);
    return sel(valid, gv);
  }
};

// ---- the row driver, shared by every loss -------------------------------------------------------

FA_INLINE float hmax(vf v) {  // NaN-propagating, fixed lane order
  float s = v[0];
  for (int j = 1; j < W; ++j) s = (v[j] > s || v[j] != v[j]) ? v[j] : s;
  return s;
}

// parts[b, k] = row b's sum (max for kPpoMaxPart) of acc[k] over its valid tokens, rows [b0, b1).
template <typename Loss, typename T, typename M>
FA_INLINE void fwd_rows(const T* x, const T* y, const T* z, const M* m, int64_t steps, typename Loss::Params p,
                        float* parts, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t base = b * steps;  // 64-bit offsets
    const typename Loss::Row row = Loss::fwd_row(x, y, z, m, base, steps, p);
    vf acc[kPpoParts] = {};
    sweep_row(x, y, z, m, base, steps,
              [&](vf xv, vf yv, vf zv, vi valid, int64_t, int64_t) { Loss::acc(xv, yv, zv, valid, p, row, acc); });
    for (int k = 0; k < kPpoParts; ++k) parts[b * kPpoParts + k] = k == kPpoMaxPart ? hmax(acc[k]) : hsum(acc[k]);
  }
}

// gx[b, t] = g * w[b] * d(row loss)/dx for rows [b0, b1), 0 at masked tokens.
template <typename Loss, typename T, typename M>
FA_INLINE void bwd_rows(const T* x, const T* y, const T* z, const M* m, int64_t steps, typename Loss::Params p,
                        const float* w, float g, T* gx, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const float gb = g * w[b];
    const int64_t base = b * steps;
    const typename Loss::Row row = Loss::bwd_row(x, y, z, m, base, steps, p);
    sweep_row(x, y, z, m, base, steps, [&](vf xv, vf yv, vf zv, vi valid, int64_t t, int64_t k) {
      vstore(gx + base + t, Loss::grad(xv, yv, zv, valid, p, row, gb), k);
    });
  }
}
