// W-lane float/int vectors and their loads and stores. NOT a normal header: ppo_rows.h and
// preference_rows.h include it inside a namespace that defines `constexpr int W` (see lanes.h), once
// per family, as the widths of the families may differ. No include guard on purpose.

using vf = float __attribute__((vector_size(W * sizeof(float))));
using vi = int32_t __attribute__((vector_size(W * sizeof(int32_t))));

FA_INLINE vf splat(float x) { return vf{} + x; }
// c ? a : b per lane (c all-ones or all-zeros), as bit operations: lowered well on every ISA
// (GCC may scalarise a vector ?:).
FA_INLINE vf blend(vi c, vf a, vf b) { return (vf)(((vi)a & c) | ((vi)b & ~c)); }
// c ? a : +0 per lane: a NaN or Inf in a deselected lane is dropped, not propagated.
FA_INLINE vf sel(vi c, vf a) { return (vf)((vi)a & c); }

// W elements of p as fp32 (exact for every input dtype).
template <typename T>
FA_INLINE vf vload(const T* p) {
  vf v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 is the top half of an fp32: widen the 16-bit patterns and shift them into place
    using vu16 = uint16_t __attribute__((vector_size(W * sizeof(uint16_t))));
    vu16 h;
    std::memcpy(&h, p, sizeof(h));
    v = (vf)(__builtin_convertvector(h, vi) << 16);
  } else {
    for (int j = 0; j < W; ++j) v[j] = static_cast<float>(p[j]);
  }
  return v;
}

// W mask entries as lanes of -1 (valid: the entry is nonzero, NaN included, as torch's `mask != 0`)
// or 0. M: bool/uint8, int32, int64 or float.
template <typename M>
FA_INLINE vi load_mask(const M* p) {
  // (GCC takes vector_size only on concrete element types, hence one branch per type)
  if constexpr (sizeof(M) == 1) {
    using vb = uint8_t __attribute__((vector_size(W)));
    vb b;
    std::memcpy(&b, p, sizeof(b));
    return __builtin_convertvector(b != 0, vi);
  } else if constexpr (std::is_same_v<M, int64_t>) {
    using vl = int64_t __attribute__((vector_size(W * sizeof(int64_t))));
    vl b;
    std::memcpy(&b, p, sizeof(b));
    return __builtin_convertvector(b != 0, vi);
  } else if constexpr (std::is_same_v<M, int32_t>) {
    vi b;
    std::memcpy(&b, p, sizeof(b));
    return b != 0;
  } else {
    static_assert(std::is_same_v<M, float>, "load_mask: bool/uint8, int32, int64 or float masks");
    vf b;
    std::memcpy(&b, p, sizeof(b));
    return b != 0.f;
  }
}

FA_INLINE float hsum(vf v) {  // fixed lane order: deterministic
  float s = 0.f;
  for (int j = 0; j < W; ++j) s += v[j];
  return s;
}

// The first k lanes of v into out, converted to T (round to nearest even for bf16/fp16).
template <typename T>
FA_INLINE void vstore(T* out, vf v, int64_t k) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // c10's float -> bf16 on all lanes at once: round to nearest even on the top 16 bits, NaN ->
    // the quiet NaN 0x7fc0 (bit-identical to static_cast<c10::BFloat16>)
    using vu = uint32_t __attribute__((vector_size(W * sizeof(uint32_t))));
    using vu16 = uint16_t __attribute__((vector_size(W * sizeof(uint16_t))));
    const vu bits = (vu)v;
    const vu rounded = (bits + (((bits >> 16) & 1u) + 0x7fffu)) >> 16;
    const vu h = (vu)blend(v != v, (vf)(vu{} + 0x7fc0u), (vf)rounded);
    const vu16 out16 = __builtin_convertvector(h, vu16);
    if (k == W) {
      std::memcpy(out, &out16, sizeof(out16));
    } else {
      std::memcpy(out, &out16, k * sizeof(uint16_t));
    }
  } else {
    for (int j = 0; j < k; ++j) out[j] = static_cast<T>(v[j]);
  }
}

// out[j] = valid_j ? value : 0 for W lanes: the bit pattern of `value` under the lane mask for
// 2- and 4-byte T (no per-lane conversion); lane by lane for double.
template <typename T>
FA_INLINE void store_masked_const(T* out, vi valid, T value) {
  if constexpr (sizeof(T) == 4) {
    int32_t bits;
    std::memcpy(&bits, &value, 4);
    const vi v = valid & bits;
    std::memcpy(out, &v, sizeof(v));
  } else if constexpr (sizeof(T) == 2) {
    using vs = int16_t __attribute__((vector_size(W * sizeof(int16_t))));
    int16_t bits;
    std::memcpy(&bits, &value, 2);
    const vs v = __builtin_convertvector(valid, vs) & bits;
    std::memcpy(out, &v, sizeof(v));
  } else {
    for (int j = 0; j < W; ++j) out[j] = valid[j] ? value : static_cast<T>(0);
  }
}
