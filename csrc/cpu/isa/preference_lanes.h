// The DPO head's row loops on W-lane vectors (see lanes.h). NOT a normal header: preference_rows.h
// includes it once per ISA object, inside a namespace that defines `constexpr int W` (4 or 8).
//
// T: the token log-probs' dtype (float, BFloat16, Half); M: the mask's (bool/uint8, int32, int64,
// float; nonzero = valid). Masked positions are selected away bit-wise, so NaN there never
// reaches a sum.

#include "lanes_w.h"

// out[r] = masked sum (mean: / max(valid count, 1)) of rows [r0, r1) of x [rows, steps]. Eight
// partial sums (token t goes to partial t mod 8: two 4-lane or one 8-lane accumulator), reduced in
// one fixed order, so the result is the same bits at both widths, for the fused DPO head and
// sequence_logps alike.
template <typename T, typename M>
FA_INLINE void masked_sums_rows(const T* x, const M* m, int64_t steps, int64_t r0, int64_t r1, bool mean,
                                float* out) {
  constexpr int K = 8 / W;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * steps;  // 64-bit offsets
    const M* mr = m + r * steps;
    vf acc[K] = {};
    vi valid_lanes = {};  // minus the count per lane
    int64_t t = 0;
    for (; t + 8 <= steps; t += 8) {
      for (int k = 0; k < K; ++k) {
        const vi v = load_mask(mr + t + k * W);
        acc[k] += sel(v, vload(xr + t + k * W));
        valid_lanes += v;
      }
    }
    float part[8];
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < W; ++j) part[k * W + j] = acc[k][j];
    int64_t n = 0;
    for (int j = 0; j < W; ++j) n -= valid_lanes[j];
    for (; t < steps; ++t) {
      const bool ok = mr[t] != 0;
      part[t & 7] += ok ? static_cast<float>(xr[t]) : 0.f;
      n += ok;
    }
    const float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    out[r] = mean ? sum / static_cast<float>(std::max<int64_t>(n, 1)) : sum;
  }
}

// Rows [r0, r1) of g [rows, steps]: g[r, t] = valid ? T(value[r] (/ count_r for the mean)) : 0.
template <typename T, typename M>
FA_INLINE void masked_fill_rows(T* g, const M* m, int64_t steps, int64_t r0, int64_t r1, const float* value,
                                bool mean) {
  for (int64_t r = r0; r < r1; ++r) {
    T* gr = g + r * steps;
    const M* mr = m + r * steps;
    float v = value[r];
    if (mean) {
      vi valid_lanes = {};
      int64_t t = 0, n = 0;
      for (; t + W <= steps; t += W) valid_lanes += load_mask(mr + t);
      for (int j = 0; j < W; ++j) n -= valid_lanes[j];
      for (; t < steps; ++t) n += mr[t] != 0;
      v = v / static_cast<float>(std::max<int64_t>(n, 1));
    }
    const T tv = static_cast<T>(v), zero = static_cast<T>(0.f);
    int64_t t = 0;
    for (; t + W <= steps; t += W) store_masked_const(gr + t, load_mask(mr + t), tv);
    for (; t < steps; ++t) gr[t] = mr[t] != 0 ? tv : zero;
  }
}
