// CPU implementations of fastalign::ppo_policy_loss_{fwd,bwd} and fastalign::ppo_value_loss_{fwd,bwd}.
//
// Forward: one pass over the tokens, rows in parallel (at::parallel_for over B); each row writes
// its own partial sums (fp32 in 8 lanes, added in lane order) into a [B, 5] buffer, which one
// thread then reduces in row order (in double), so the result does not depend on the number of
// threads. The per-token math (inline functions below) mirrors kernels/reference.py op by op, including the way autograd
// splits gradients at ties of max/min (half to each side) and passes them at clamp boundaries
// (inclusive), so the fused backward equals autograd of the reference exactly, not just nearly.
//
// Aggregation (see fastalign/ops/ppo.py): loss = sum_b w_b * sum_{t valid} l_bt, with a per-row
// weight w_b that depends on agg (0 for rows without valid tokens); the forward also returns w_b,
// so the backward is grad_b,t = g * w_b * dl_bt/dx_bt without any reduction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "capability.h"

namespace fastalign::cpu {
namespace {

// agg codes, as fastalign/ops/ppo.py passes them
enum Agg : int64_t { kTokenMean = 0, kSeqMeanTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSumNorm = 3 };
constexpr int kParts = 5;  // per-row partials: loss sum, valid count, stat1, stat2, stat3 sums

// The per-token math runs on 8-lane vectors (GCC/Clang vector extensions: SSE2 pairs on a baseline
// x86-64 build, NEON on ARM), with a polynomial exp, because scalar libm expf alone would cost
// more than the whole eager PyTorch graph saves. Row tails are padded with masked lanes.
constexpr int W = 8;
// Everything here has internal linkage, so the AVX-sized vector ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
// Forced inlining: the helpers then compile for the instruction set of the row loop that calls
// them (see FA_CLONES), and no vector crosses a call boundary.
#define FA_INLINE inline __attribute__((always_inline))
using vf = float __attribute__((vector_size(W * sizeof(float))));
using vi = int32_t __attribute__((vector_size(W * sizeof(int32_t))));

FA_INLINE vf splat(float x) { return vf{} + x; }
// torch.maximum / torch.minimum / torch.clamp forward, NaN-propagating like torch.
FA_INLINE vf tmax(vf a, vf b) { return ((a >= b) | (a != a)) ? a : b; }
FA_INLINE vf tmin(vf a, vf b) { return ((a <= b) | (a != a)) ? a : b; }
FA_INLINE vf tclamp(vf x, vf lo, vf hi) { return tmin(tmax(x, lo), hi); }
// clamp passes the gradient on [lo, hi] (inclusive), as autograd's clamp_backward
FA_INLINE vi inside(vf x, vf lo, vf hi) { return (x >= lo) & (x <= hi); }
// torch.maximum/minimum backward: the share of the gradient that goes to `self` (NaN: all of it).
FA_INLINE vf max_share(vf self, vf other) { return self < other ? splat(0.f) : (self == other ? splat(0.5f) : splat(1.f)); }
FA_INLINE vf min_share(vf self, vf other) { return self > other ? splat(0.f) : (self == other ? splat(0.5f) : splat(1.f)); }
FA_INLINE vf sel(vi c, vf a) { return c ? a : splat(0.f); }

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
  const vi e = (__builtin_convertvector(x == x ? n : splat(0.f), vi) + 127) << 23;
  const vf res = p * (vf)e;  // a vector cast reinterprets the bits
  return x != x ? x : res;
}

template <typename T>
FA_INLINE vf vload(const T* p) {
  vf v;
  for (int j = 0; j < W; ++j) v[j] = static_cast<float>(p[j]);
  return v;
}
FA_INLINE vi load_mask(const bool* m) {
  vi v;
  for (int j = 0; j < W; ++j) v[j] = m[j] ? -1 : 0;
  return v;
}
FA_INLINE float hsum(vf v) {  // fixed lane order: deterministic
  float s = 0.f;
  for (int j = 0; j < W; ++j) s += v[j];
  return s;
}

// A row's last (steps mod W) tokens, copied into W-lane buffers padded with masked lanes.
template <typename T>
struct Pad {
  T x[W], y[W], z[W];
  bool m[W];
  FA_INLINE Pad(const T* xp, const T* yp, const T* zp, const bool* mp, int64_t i, int64_t k) {
    for (int j = 0; j < W; ++j) {
      const bool in = j < k;
      x[j] = in ? xp[i + j] : T(0.f);
      y[j] = in ? yp[i + j] : T(0.f);
      z[j] = in ? zp[i + j] : T(0.f);
      m[j] = in && mp[i + j];
    }
  }
};

template <typename T>
FA_INLINE void vstore(T* out, vf v, int64_t k) {
  for (int j = 0; j < k; ++j) out[j] = static_cast<T>(v[j]);
}

struct PolicyParams {
  float lo, hi, dual;  // 1 - clip_low, 1 + clip_high, dual-clip c (used when use_dual)
  bool use_dual;
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
    m = neg ? tmin(m, l3) : m;
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
  if (p.use_dual) gm = a < 0.f ? gm * min_share(tmax(l1, l2), na * p.dual) : gm;
  vf gr = na * (gm * max_share(l1, l2));
  gr += sel(inside(ratio, lo, hi), na * (gm * max_share(l2, l1)));
  return sel(valid & inside(d, splat(-20.f), splat(20.f)), gr * ratio);  // d exp(x)/dx = exp(x)
}

struct ValueParams {
  float clip;  // > 0: clipped loss; <= 0: plain squared error
};

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

// ---- row loops, compiled for baseline x86-64 (SSE2) and for AVX2 -------------------------------
// The AVX2 clones compute the same IEEE operations (no FMA contraction), so both give identical bits.

template <typename T>
FA_INLINE void policy_fwd_rows(const T* x, const T* y, const T* z, const bool* m, int64_t steps, PolicyParams p,
                               float* parts, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    vf acc[kParts] = {};
    const int64_t base = b * steps;  // 64-bit offsets
    int64_t t = 0;
    for (; t + W <= steps; t += W) {
      const int64_t i = base + t;
      policy_acc(vload(x + i), vload(y + i), vload(z + i), load_mask(m + i), p, acc);
    }
    if (t < steps) {
      const Pad<T> q(x, y, z, m, base + t, steps - t);
      policy_acc(vload(q.x), vload(q.y), vload(q.z), load_mask(q.m), p, acc);
    }
    for (int k = 0; k < kParts; ++k) parts[b * kParts + k] = hsum(acc[k]);
  }
}

template <typename T>
FA_INLINE void policy_bwd_rows(const T* x, const T* y, const T* z, const bool* m, int64_t steps, PolicyParams p,
                               const float* w, float g, T* gx, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const float gb = g * w[b];
    const int64_t base = b * steps;
    int64_t t = 0;
    for (; t + W <= steps; t += W) {
      const int64_t i = base + t;
      vstore(gx + i, policy_grad(vload(x + i), vload(y + i), vload(z + i), load_mask(m + i), p, gb), W);
    }
    if (t < steps) {
      const Pad<T> q(x, y, z, m, base + t, steps - t);
      vstore(gx + base + t, policy_grad(vload(q.x), vload(q.y), vload(q.z), load_mask(q.m), p, gb), steps - t);
    }
  }
}

template <typename T>
FA_INLINE void value_fwd_rows(const T* x, const T* y, const T* z, const bool* m, int64_t steps, ValueParams p,
                              float* parts, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    vf acc[kParts] = {};
    const int64_t base = b * steps;
    int64_t t = 0;
    for (; t + W <= steps; t += W) {
      const int64_t i = base + t;
      value_acc(vload(x + i), vload(y + i), vload(z + i), load_mask(m + i), p, acc);
    }
    if (t < steps) {
      const Pad<T> q(x, y, z, m, base + t, steps - t);
      value_acc(vload(q.x), vload(q.y), vload(q.z), load_mask(q.m), p, acc);
    }
    for (int k = 0; k < kParts; ++k) parts[b * kParts + k] = hsum(acc[k]);
  }
}

template <typename T>
FA_INLINE void value_bwd_rows(const T* x, const T* y, const T* z, const bool* m, int64_t steps, ValueParams p,
                              const float* w, float g, T* gx, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const float gb = g * w[b];
    const int64_t base = b * steps;
    int64_t t = 0;
    for (; t + W <= steps; t += W) {
      const int64_t i = base + t;
      vstore(gx + i, value_grad(vload(x + i), vload(y + i), vload(z + i), load_mask(m + i), p, gb), W);
    }
    if (t < steps) {
      const Pad<T> q(x, y, z, m, base + t, steps - t);
      vstore(gx + base + t, value_grad(vload(q.x), vload(q.y), vload(q.z), load_mask(q.m), p, gb), steps - t);
    }
  }
}

// name(args...) runs the AVX2 clone when the CPU has AVX2 (and FASTALIGN_CPU_CAPABILITY does not
// force "default"), else the baseline one.
#if defined(__x86_64__) || defined(__i386__)
bool use_avx2() {
  static const bool ok = std::strcmp(best_kernels().name, "DEFAULT") != 0 && __builtin_cpu_supports("avx2");
  return ok;
}
#define FA_CLONES(name)                                                                     \
  template <typename... A>                                                                  \
  __attribute__((target("avx2"))) void name##_avx2(A... a) { name##_rows(a...); }          \
  template <typename... A>                                                                  \
  void name##_base(A... a) { name##_rows(a...); }                                           \
  template <typename... A>                                                                  \
  void name(A... a) { use_avx2() ? name##_avx2(a...) : name##_base(a...); }
#else
#define FA_CLONES(name)    \
  template <typename... A> \
  void name(A... a) { name##_rows(a...); }
#endif
FA_CLONES(policy_fwd)
FA_CLONES(policy_bwd)
FA_CLONES(value_fwd)
FA_CLONES(value_bwd)

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 2, op, ": inputs must be 2-D [B, T], got ", x.sizes());
  TORCH_CHECK(y.sizes() == x.sizes() && z.sizes() == x.sizes() && mask.sizes() == x.sizes(), op,
              ": all inputs must have one shape ", x.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && z.scalar_type() == x.scalar_type(), op,
              ": the three float inputs must have one dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool here, got ", mask.scalar_type());
}

// Reduces the [B, kParts] row partials in row order into out = (loss, stat1/N, stat2/N, stat3/N)
// and the per-row weights w_b (already times `scale`).
void finalize(const std::vector<float>& parts, int64_t batch, int64_t steps, int64_t agg, double global_count,
              double horizon, double scale, float* out, float* row_w) {
  double n_tok = 0, n_seq = 0, total = 0, st[3] = {0, 0, 0};
  for (int64_t b = 0; b < batch; ++b) {
    const float* p = &parts[b * kParts];
    n_tok += p[1];
    n_seq += p[1] > 0;
    // seq-mean-token-mean: fp32 division per row, as the reference
    total += agg == kSeqMeanTokenMean ? (p[1] > 0 ? static_cast<float>(p[0]) / static_cast<float>(p[1]) : 0.0) : p[0];
    for (int k = 0; k < 3; ++k) st[k] += p[2 + k];
  }
  const double count = global_count >= 0 ? global_count : (agg == kTokenMean ? n_tok : n_seq);
  double norm = 0;  // d loss / d (row sum) for a row with valid tokens (before / n_b)
  const double h = horizon > 0 ? horizon : std::max<double>(static_cast<double>(steps), 1.0);  // T = 0: no tokens
  if (count > 0) norm = scale / count / (agg == kSeqMeanTokenSumNorm ? h : 1.0);
  out[0] = static_cast<float>(total * norm);
  for (int k = 0; k < 3; ++k) out[1 + k] = n_tok > 0 ? static_cast<float>(st[k] / n_tok) : 0.f;
  for (int64_t b = 0; b < batch; ++b) {
    const double n_b = parts[b * kParts + 1];
    row_w[b] = n_b > 0 ? static_cast<float>(agg == kSeqMeanTokenMean ? norm / n_b : norm) : 0.f;
  }
}

void check_agg(const char* op, int64_t agg) {
  TORCH_CHECK(agg >= kTokenMean && agg <= kSeqMeanTokenSumNorm, op, ": agg code must be in [0, 3], got ", agg);
}

int64_t grain_for(int64_t steps) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(steps, 1)); }

// ---- policy loss ------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd(const at::Tensor& logprobs_in, const at::Tensor& old_in,
                                                       const at::Tensor& adv_in, const at::Tensor& mask_in,
                                                       double clip_lo, double clip_hi, double dual_clip, int64_t agg,
                                                       double global_count, double horizon) {
  check_inputs("ppo_policy_loss", logprobs_in, old_in, adv_in, mask_in);
  check_agg("ppo_policy_loss", agg);
  const at::Tensor lp = logprobs_in.contiguous(), old = old_in.contiguous(), adv = adv_in.contiguous(),
                   mask = mask_in.contiguous();
  const int64_t batch = lp.size(0), steps = lp.size(1);
  auto opts = lp.options().dtype(at::kFloat);
  at::Tensor out = at::empty({4}, opts);
  at::Tensor row_w = at::empty({batch}, opts);
  std::vector<float> parts(batch * kParts, 0.f);
  const PolicyParams p{static_cast<float>(clip_lo), static_cast<float>(clip_hi), static_cast<float>(dual_clip),
                       dual_clip > 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "ppo_policy_loss_fwd", [&] {
    const scalar_t* x = lp.data_ptr<scalar_t>();
    const scalar_t* xo = old.data_ptr<scalar_t>();
    const scalar_t* a = adv.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    float* q = parts.data();
    at::parallel_for(0, batch, grain_for(steps),
                     [&](int64_t b0, int64_t b1) { policy_fwd(x, xo, a, m, steps, p, q, b0, b1); });
  });
  finalize(parts, batch, steps, agg, global_count, horizon, 1.0, out.data_ptr<float>(), row_w.data_ptr<float>());
  return {out, row_w};
}

at::Tensor ppo_policy_loss_bwd(const at::Tensor& grad_out, const at::Tensor& logprobs_in, const at::Tensor& old_in,
                               const at::Tensor& adv_in, const at::Tensor& mask_in, const at::Tensor& row_w_in,
                               double clip_lo, double clip_hi, double dual_clip) {
  check_inputs("ppo_policy_loss_bwd", logprobs_in, old_in, adv_in, mask_in);
  const at::Tensor lp = logprobs_in.contiguous(), old = old_in.contiguous(), adv = adv_in.contiguous(),
                   mask = mask_in.contiguous(), row_w = row_w_in.to(at::kFloat).contiguous();
  const int64_t batch = lp.size(0), steps = lp.size(1);
  TORCH_CHECK(row_w.numel() == batch, "ppo_policy_loss_bwd: row weights must be [B]");
  TORCH_CHECK(grad_out.numel() >= 1, "ppo_policy_loss_bwd: grad_out must hold the loss gradient");
  at::Tensor grad = at::empty({batch, steps}, lp.options());
  if (grad.numel() == 0) return grad;
  const float g = grad_out.reshape(-1)[0].item<float>();
  const PolicyParams p{static_cast<float>(clip_lo), static_cast<float>(clip_hi), static_cast<float>(dual_clip),
                       dual_clip > 0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "ppo_policy_loss_bwd", [&] {
    const scalar_t* x = lp.data_ptr<scalar_t>();
    const scalar_t* xo = old.data_ptr<scalar_t>();
    const scalar_t* a = adv.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    const float* w = row_w.data_ptr<float>();
    scalar_t* gx = grad.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(steps),
                     [&](int64_t b0, int64_t b1) { policy_bwd(x, xo, a, m, steps, p, w, g, gx, b0, b1); });
  });
  return grad;
}

// ---- value loss -------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd(const at::Tensor& values_in, const at::Tensor& old_in,
                                                      const at::Tensor& returns_in, const at::Tensor& mask_in,
                                                      double clip, int64_t agg, double global_count, double horizon) {
  check_inputs("ppo_value_loss", values_in, old_in, returns_in, mask_in);
  check_agg("ppo_value_loss", agg);
  const at::Tensor v = values_in.contiguous(), old = old_in.contiguous(), ret = returns_in.contiguous(),
                   mask = mask_in.contiguous();
  const int64_t batch = v.size(0), steps = v.size(1);
  auto opts = v.options().dtype(at::kFloat);
  at::Tensor out = at::empty({4}, opts);
  at::Tensor row_w = at::empty({batch}, opts);
  std::vector<float> parts(batch * kParts, 0.f);
  const ValueParams p{static_cast<float>(clip)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "ppo_value_loss_fwd", [&] {
    const scalar_t* x = v.data_ptr<scalar_t>();
    const scalar_t* xo = old.data_ptr<scalar_t>();
    const scalar_t* r = ret.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    float* q = parts.data();
    at::parallel_for(0, batch, grain_for(steps),
                     [&](int64_t b0, int64_t b1) { value_fwd(x, xo, r, m, steps, p, q, b0, b1); });
  });
  // loss = 0.5 * agg(...): the 0.5 rides on the row weights
  finalize(parts, batch, steps, agg, global_count, horizon, 0.5, out.data_ptr<float>(), row_w.data_ptr<float>());
  return {out, row_w};
}

at::Tensor ppo_value_loss_bwd(const at::Tensor& grad_out, const at::Tensor& values_in, const at::Tensor& old_in,
                              const at::Tensor& returns_in, const at::Tensor& mask_in, const at::Tensor& row_w_in,
                              double clip) {
  check_inputs("ppo_value_loss_bwd", values_in, old_in, returns_in, mask_in);
  const at::Tensor v = values_in.contiguous(), old = old_in.contiguous(), ret = returns_in.contiguous(),
                   mask = mask_in.contiguous(), row_w = row_w_in.to(at::kFloat).contiguous();
  const int64_t batch = v.size(0), steps = v.size(1);
  TORCH_CHECK(row_w.numel() == batch, "ppo_value_loss_bwd: row weights must be [B]");
  TORCH_CHECK(grad_out.numel() >= 1, "ppo_value_loss_bwd: grad_out must hold the loss gradient");
  at::Tensor grad = at::empty({batch, steps}, v.options());
  if (grad.numel() == 0) return grad;
  const float g = grad_out.reshape(-1)[0].item<float>();
  const ValueParams p{static_cast<float>(clip)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "ppo_value_loss_bwd", [&] {
    const scalar_t* x = v.data_ptr<scalar_t>();
    const scalar_t* xo = old.data_ptr<scalar_t>();
    const scalar_t* r = ret.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    const float* w = row_w.data_ptr<float>();
    scalar_t* gx = grad.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(steps),
                     [&](int64_t b0, int64_t b1) { value_bwd(x, xo, r, m, steps, p, w, g, gx, b0, b1); });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd);
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &ppo_value_loss_bwd);
}

}  // namespace fastalign::cpu
