// Token log-probabilities and entropy, one row (token) at a time, vectorised with at::vec.
// Included by kernels_all.h once per CPU capability; see capability.h.
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
// Zero probabilities (z = -inf, e.g. a masked vocabulary) contribute 0 to t, never 0 * inf.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace fastalign::cpu {
namespace CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 2048;  // floats per block: 8 KiB, stays in L1 between the two sweeps

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

template <typename scalar_t, bool kEntropy>
void logprobs_fwd_typed(const LogprobsFwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kBlock];
  const float ninf = -std::numeric_limits<float>::infinity();
  const fVec lowest(std::numeric_limits<float>::lowest());
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
    float m = ninf, s = 0.f, t = 0.f;
    for (int64_t start = 0; start < a.vocab; start += kBlock) {
      const int64_t n = std::min(kBlock, a.vocab - start);
      const int64_t sweep = load_block(x + start, n, a.inv_temperature, buf);
      fVec vmax(ninf);
      for (int64_t j = 0; j < sweep; j += fVec::size()) vmax = at::vec::maximum(vmax, fVec::loadu(buf + j));
      const float block_max = at::vec::vec_reduce_all<float>(
          [](fVec& p, fVec& q) { return at::vec::maximum(p, q); }, vmax);
      if (block_max == ninf && !std::isnan(block_max)) continue;  // all -inf: contributes nothing
      const float m_new = std::isnan(block_max) ? block_max : std::max(m, block_max);
      if (s > 0.f && m_new != m) {
        // rescale the running sums from max m to m_new (m_new >= m)
        const float scale = std::exp(m - m_new);
        if (kEntropy) t = (t + (m - m_new) * s) * scale;
        s *= scale;
      }
      m = m_new;
      const fVec vm(m);
      fVec vs(0.f), vt(0.f);
      for (int64_t j = 0; j < sweep; j += fVec::size()) {
        const fVec d = fVec::loadu(buf + j) - vm;
        const fVec e = d.exp();
        vs = vs + e;
        if (kEntropy) vt = at::vec::fmadd(e, at::vec::maximum(d, lowest), vt);
      }
      s += at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; }, vs);
      if (kEntropy) t += at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; }, vt);
    }
    const float log_s = std::log(s);
    const float z_label = static_cast<float>(x[label]) * a.inv_temperature;
    a.row_stats[2 * row] = m;
    a.row_stats[2 * row + 1] = log_s;
    a.logprobs[row] = (z_label - m) - log_s;
    if (kEntropy) a.entropy[row] = log_s - t / s;
  }
}

template <typename scalar_t>
void logprobs_bwd_typed(const LogprobsBwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kBlock];
  const fVec lowest(std::numeric_limits<float>::lowest());
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
    const fVec vm(m), vlog_s(log_s), vg(g), vgh(gh), vh(h), vscale(-a.inv_temperature);
    for (int64_t start = 0; start < a.vocab; start += kBlock) {
      const int64_t n = std::min(kBlock, a.vocab - start);
      const int64_t sweep = load_block(x + start, n, a.inv_temperature, buf);
      for (int64_t j = 0; j < sweep; j += fVec::size()) {
        const fVec logp = (fVec::loadu(buf + j) - vm) - vlog_s;
        const fVec p = logp.exp();
        // -(1/T) p (g + g_H (log p + H)); log p clamped so p = 0 gives 0, not 0 * -inf
        const fVec coef = at::vec::fmadd(vgh, at::vec::maximum(logp, lowest) + vh, vg);
        (vscale * p * coef).store(buf + j);
      }
      if (label >= start && label < start + n) {
        // the one-hot term, added in fp32 before rounding to the output dtype
        buf[label - start] += g * a.inv_temperature;
      }
      store_block(buf, n, gx + start);
    }
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
      TORCH_CHECK(false, "gather_logprobs: unsupported logits dtype ", a.dtype);
  }
}

inline void logprobs_bwd_rows(const LogprobsBwdArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return logprobs_bwd_typed<float>(a, begin, end);
    case c10::ScalarType::BFloat16: return logprobs_bwd_typed<c10::BFloat16>(a, begin, end);
    case c10::ScalarType::Half: return logprobs_bwd_typed<c10::Half>(a, begin, end);
    default: TORCH_CHECK(false, "gather_logprobs: unsupported logits dtype ", a.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastalign::cpu
