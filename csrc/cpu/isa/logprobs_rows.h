// Token log-probabilities and entropy, one row (token) at a time, vectorised with at::vec.
// Included by kernels.cpp, which setup.py compiles once per CPU capability; see ../dispatch.h.
//
// Math, for one row with tempered logits z_j = x_j / T and label y:
//   lse = log sum_j exp(z_j),   logp_y = z_y - lse,   p_j = exp(z_j - lse)
//   H   = -sum_j p_j log p_j = lse - sum_j p_j z_j
// Forward, one pass over the row in L1-sized blocks ("online" log-sum-exp): keep the running
// max m, s = sum exp(z - m) and t = sum exp(z - m) * (z - m). A block with a larger max rescales
// both by exp(m_old - m_new) (t also picks up (m_old - m_new) * s). At the end
//   lse = m + log s,   H = log s - t / s
// and (m, log s) is saved per row: the backward's log p_j = (z_j - m) - log s is then as exact
// as the forward's, which m + log s rounded to one float would not be for |z| >> 1.
// -- entropy measured relative to m, so there is no cancellation between two large numbers.
// Backward (d/dz, then times 1/T):
//   d logp_y / dz_j = [j == y] - p_j,     dH / dz_j = -p_j (log p_j + H)
//   grad_x_j = (1/T) (g [j == y] - p_j (g + g_H (z_j - lse + H)))
// Zero probabilities (z = -inf, e.g. a masked vocabulary) contribute 0 to t, never 0 * inf: log p
// is clamped at kLogpFloor first. (Not at -FLT_MAX: g_H * (-FLT_MAX + H) overflows to inf.)
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../dispatch.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace fastalign::cpu {
namespace CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 2048;  // floats per block: 8 KiB, stays in L1 between the two sweeps
// Below log(smallest fp32 denormal) ~ -103.3, so exp() of anything clamped here is already 0.
constexpr float kLogpFloor = -200.f;

// Loads n (<= kBlock) elements of a row as fp32, pre-multiplied by inv_t, into buf; pads the
// last vector with -inf (probability 0). Returns the number of floats to sweep (a multiple of
// the vector width).
template <typename scalar_t>
inline int64_t load_block(const scalar_t* src, int64_t n, float inv_t, float* buf) {
  const fVec vinv(inv_t);
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; j + fVec::size() <= n; j += fVec::size()) (fVec::loadu(src + j) * vinv).store(buf + j);
  } else {
    using rVec = at::vec::Vectorized<scalar_t>;
    for (; j + rVec::size() <= n; j += rVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(rVec::loadu(src + j));
      (lo * vinv).store(buf + j);
      (hi * vinv).store(buf + j + fVec::size());
    }
  }
  for (; j < n; ++j) buf[j] = static_cast<float>(src[j]) * inv_t;
  const int64_t padded = (n + fVec::size() - 1) / fVec::size() * fVec::size();
  for (int64_t k = n; k < padded; ++k) buf[k] = -std::numeric_limits<float>::infinity();
  return padded;
}

template <typename scalar_t>
inline void store_block(const float* buf, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::copy(buf, buf + n, dst);
  } else {
    int64_t j = 0;
    using rVec = at::vec::Vectorized<scalar_t>;
    for (; j + rVec::size() <= n; j += rVec::size()) {
      at::vec::convert_from_float<scalar_t>(fVec::loadu(buf + j), fVec::loadu(buf + j + fVec::size()))
          .store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<scalar_t>(buf[j]);
  }
}

// exp for the hot loops: at::vec's inline polynomial exp (max error ~20 ulp, i.e. ~2e-6
// relative) instead of the out-of-line Sleef call -- 2-3x less time per element, and the
// error averages out in the row sums: measured max |logp - fp64| is below eager torch's fp32 error.
// It maps NaN to a finite value, so callers keep NaN alive through the row max instead.
inline fVec fast_exp(const fVec& x) { return x.exp_u20(); }

// One row's forward statistics in "online" form: running max m (of z = x / T), s = sum exp(z - m),
// t = sum exp(z - m) (z - m).
struct RowStats {
  float m = -std::numeric_limits<float>::infinity();
  float s = 0.f, t = 0.f;
};

// Folds a block of logits x (fp32, in L1: the caller's row or the staging buffer), tempered as
// z = x * inv_t, into st.
template <bool kEntropy>
inline void accumulate_block(const float* x, int64_t sweep, float inv_t, RowStats& st) {
  const float ninf = -std::numeric_limits<float>::infinity();
  fVec vmax(ninf);
  for (int64_t j = 0; j < sweep; j += fVec::size()) vmax = at::vec::maximum(vmax, fVec::loadu(x + j));
  // max(x) * inv_t == max(x * inv_t): rounding is monotonic and inv_t > 0
  const float block_max =
      inv_t * at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return at::vec::maximum(p, q); }, vmax);
  if (block_max == ninf) return;  // all -inf: probability 0, contributes nothing
  const float m_new = std::isnan(block_max) ? block_max : std::max(st.m, block_max);
  if (st.s > 0.f && m_new != st.m) {
    // rescale the running sums from max m to m_new (m_new > m)
    const float scale = std::exp(st.m - m_new);
    if (kEntropy) st.t = (st.t + (st.m - m_new) * st.s) * scale;
    st.s *= scale;
  }
  st.m = m_new;
  const fVec vm(st.m), vinv(inv_t), floor_(kLogpFloor);
  fVec vs0(0.f), vs1(0.f), vt0(0.f), vt1(0.f);  // two accumulators hide the add latency
  int64_t j = 0;
  for (; j + 2 * fVec::size() <= sweep; j += 2 * fVec::size()) {
    const fVec d0 = at::vec::fmsub(fVec::loadu(x + j), vinv, vm);
    const fVec d1 = at::vec::fmsub(fVec::loadu(x + j + fVec::size()), vinv, vm);
    const fVec e0 = fast_exp(d0), e1 = fast_exp(d1);
    vs0 = vs0 + e0;
    vs1 = vs1 + e1;
    if (kEntropy) {
      vt0 = at::vec::fmadd(e0, at::vec::maximum(d0, floor_), vt0);
      vt1 = at::vec::fmadd(e1, at::vec::maximum(d1, floor_), vt1);
    }
  }
  for (; j < sweep; j += fVec::size()) {
    const fVec d = at::vec::fmsub(fVec::loadu(x + j), vinv, vm);
    const fVec e = fast_exp(d);
    vs0 = vs0 + e;
    if (kEntropy) vt0 = at::vec::fmadd(e, at::vec::maximum(d, floor_), vt0);
  }
  const auto add = [](fVec& p, fVec& q) { return p + q; };
  st.s += at::vec::vec_reduce_all<float>(add, vs0 + vs1);
  if (kEntropy) st.t += at::vec::vec_reduce_all<float>(add, vt0 + vt1);
  if (std::isnan(st.m) || st.m == -ninf) {
    // a NaN or +inf logit: softmax is undefined (NaN in torch too); fast_exp would hide it
    st.s = st.t = std::numeric_limits<float>::quiet_NaN();
  }
}

template <typename scalar_t, bool kEntropy>
void logprobs_fwd_typed(const LogprobsFwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kBlock];
  for (int64_t row = begin; row < end; ++row) {
    const int64_t label = a.labels[row];
    if (label == a.ignore_index) {
      a.logprobs[row] = 0.f;
      a.row_stats[2 * row] = 0.f;
      a.row_stats[2 * row + 1] = 0.f;
      if (kEntropy) a.entropy[row] = 0.f;
      continue;
    }
    const scalar_t* x = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    RowStats st;
    for (int64_t start = 0; start < a.vocab; start += kBlock) {
      const int64_t n = std::min(kBlock, a.vocab - start);
      if (std::is_same_v<scalar_t, float> && n % fVec::size() == 0) {
        // fp32: read the row in place, no staging copy
        accumulate_block<kEntropy>(reinterpret_cast<const float*>(x + start), n, a.inv_temperature, st);
      } else {
        accumulate_block<kEntropy>(buf, load_block(x + start, n, a.inv_temperature, buf), 1.f, st);
      }
    }
    const float log_s = std::log(st.s);
    const float z_label = static_cast<float>(x[label]) * a.inv_temperature;
    a.row_stats[2 * row] = st.m;
    a.row_stats[2 * row + 1] = log_s;
    a.logprobs[row] = (z_label - st.m) - log_s;
    if (kEntropy) a.entropy[row] = log_s - st.t / st.s;
  }
}

// grad for one block: out_j = -(1/T) p_j (g + g_H (log p_j + H)), log p_j = (z_j - m) - log s,
// z_j = x_j * z_scale (x: the caller's fp32 row with z_scale = 1/T, or the tempered staging buffer
// with z_scale = 1).
inline void grad_block(const float* x, int64_t sweep, float z_scale, float m, float log_s, float g, float gh, float h,
                       float inv_t, float* out) {
  const fVec vzs(z_scale), vm(m), vlog_s(log_s), vg(g), vgh(gh), vh(h), vscale(-inv_t);
  const fVec floor_(kLogpFloor);
  if (gh == 0.f) {
    const fVec c(-inv_t * g);
    for (int64_t j = 0; j < sweep; j += fVec::size()) {
      (c * fast_exp(at::vec::fmsub(fVec::loadu(x + j), vzs, vm) - vlog_s)).store(out + j);
    }
    return;
  }
  for (int64_t j = 0; j < sweep; j += fVec::size()) {
    const fVec logp = at::vec::fmsub(fVec::loadu(x + j), vzs, vm) - vlog_s;
    // log p clamped so that p = 0 gives 0, not 0 * -inf
    const fVec coef = at::vec::fmadd(vgh, at::vec::maximum(logp, floor_) + vh, vg);
    (vscale * fast_exp(logp) * coef).store(out + j);
  }
}

template <typename scalar_t>
void logprobs_bwd_typed(const LogprobsBwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kBlock];
  for (int64_t row = begin; row < end; ++row) {
    scalar_t* gx = static_cast<scalar_t*>(a.grad_logits) + row * a.vocab;
    const int64_t label = a.labels[row];
    const float g = a.grad_logprobs[row];
    const float gh = a.grad_entropy ? a.grad_entropy[row] : 0.f;
    if (label == a.ignore_index || (g == 0.f && gh == 0.f)) {
      std::fill(gx, gx + a.vocab, scalar_t(0));
      continue;
    }
    const scalar_t* x = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    const float m = a.row_stats[2 * row], log_s = a.row_stats[2 * row + 1];
    const float h = a.grad_entropy ? a.entropy[row] : 0.f;
    if (!std::isfinite(m) || !std::isfinite(log_s) || std::isnan(h)) {
      // a row whose softmax is undefined (NaN/inf logits): NaN gradient like autograd (fast_exp would hide it)
      std::fill(gx, gx + a.vocab, scalar_t(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
    for (int64_t start = 0; start < a.vocab; start += kBlock) {
      const int64_t n = std::min(kBlock, a.vocab - start);
      if (std::is_same_v<scalar_t, float> && n % fVec::size() == 0) {
        // fp32: straight from the row into the output, no staging
        grad_block(reinterpret_cast<const float*>(x + start), n, a.inv_temperature, m, log_s, g, gh, h,
                   a.inv_temperature, reinterpret_cast<float*>(gx + start));
      } else {
        const int64_t sweep = load_block(x + start, n, a.inv_temperature, buf);
        grad_block(buf, sweep, 1.f, m, log_s, g, gh, h, a.inv_temperature, buf);
        store_block(buf, n, gx + start);
      }
    }
    // The one-hot term, in fp32 from scratch (not added to a rounded value):
    // (1/T) (g (1 - p_y) - g_H p_y (log p_y + H)), log p_y clamped like grad_block's (a label
    // whose logit is -inf has p_y = 0: 0, not 0 * -inf = NaN).
    const float logp_y = (static_cast<float>(x[label]) * a.inv_temperature - m) - log_s;
    const float p_y = std::exp(logp_y);
    gx[label] = static_cast<scalar_t>(a.inv_temperature *
                                      (g * (1.f - p_y) - gh * p_y * (std::max(logp_y, kLogpFloor) + h)));
  }
}

inline void logprobs_fwd_rows(const LogprobsFwdArgs& a, int64_t begin, int64_t end) {
  const bool ent = a.entropy != nullptr;
  switch (a.dtype) {
    case c10::ScalarType::Float:
      return ent ? logprobs_fwd_typed<float, true>(a, begin, end) : logprobs_fwd_typed<float, false>(a, begin, end);
    case c10::ScalarType::BFloat16:
      return ent ? logprobs_fwd_typed<c10::BFloat16, true>(a, begin, end)
                 : logprobs_fwd_typed<c10::BFloat16, false>(a, begin, end);
    case c10::ScalarType::Half:
      return ent ? logprobs_fwd_typed<c10::Half, true>(a, begin, end) : logprobs_fwd_typed<c10::Half, false>(a, begin, end);
    default:
      unsupported_dtype("gather_logprobs", a.dtype);
  }
}

inline void logprobs_bwd_rows(const LogprobsBwdArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return logprobs_bwd_typed<float>(a, begin, end);
    case c10::ScalarType::BFloat16: return logprobs_bwd_typed<c10::BFloat16>(a, begin, end);
    case c10::ScalarType::Half: return logprobs_bwd_typed<c10::Half>(a, begin, end);
    default: unsupported_dtype("gather_logprobs_bwd", a.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastalign::cpu
