// Small device helpers shared by the CUDA kernels: dtype conversion of vectorised loads/stores,
// a NaN-propagating max, and exp2 on the special-function unit.
//
// Logits are stored as float, __nv_bfloat16 or __half (the CUDA types with the layout of
// float, c10::BFloat16 and c10::Half); all arithmetic is fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

namespace fastalign::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x with one MUFU.EX2 instruction (PTX ex2.approx.ftz.f32: relative error about 2^-22, i.e.
// ~2 ulp; results below 2^-126 flushed to 0). The kernels only take exp2 of arguments <= ~0 and
// add the results up, where a flushed 2^-126 is far below fp32 resolution of the sum.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else  // host pass (never run; lets a host-side emulation of the kernels compile)
  return exp2f(x);
#endif
}

// max(a, b) that returns NaN when either is NaN (fmaxf returns the other operand), so that a
// NaN logit poisons its row instead of being skipped.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a > b || a != a) ? a : b;
#endif
}

// ---- fp32 <-> storage type --------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// N consecutive elements of T, aligned to their total size (16 bytes for the vector path).
template <typename T, int N>
struct alignas(sizeof(T) * N) Chunk {
  T v[N];
};

// Raw load/store of a Chunk of 2, 4, 8 or 16 bytes through an integer type of that size, so the
// compiler emits one LDG/STG of that width.
template <int kBytes>
struct Word;
template <>
struct Word<2> { using type = unsigned short; };
template <>
struct Word<4> { using type = unsigned int; };
template <>
struct Word<8> { using type = uint2; };
template <>
struct Word<16> { using type = uint4; };

// Loads N elements at p (read-only path) into out[0..N) as fp32.
template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* p, float* out) {
  using W = typename Word<sizeof(T) * N>::type;
  const W w = __ldg(reinterpret_cast<const W*>(p));
  Chunk<T, N> c;
  memcpy(&c, &w, sizeof(W));
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f32(c.v[i]);
}

// Stores in[0..N) rounded to T at p, with a streaming (evict-first) store: the gradient is not
// read again by this kernel.
template <typename T, int N>
__device__ __forceinline__ void store_f32(T* p, const float* in) {
  using W = typename Word<sizeof(T) * N>::type;
  Chunk<T, N> c;
#pragma unroll
  for (int i = 0; i < N; ++i) c.v[i] = from_f32<T>(in[i]);
  W w;
  memcpy(&w, &c, sizeof(W));
  __stcs(reinterpret_cast<W*>(p), w);
}

// The CUDA storage type of a torch dtype, for the dispatch switch in host code.
#define FASTALIGN_DISPATCH_FLOAT_TYPES(DTYPE, NAME, ...)                                   \
  [&] {                                                                                    \
    switch (DTYPE) {                                                                       \
      case c10::ScalarType::Float: {                                                       \
        using scalar_t = float;                                                            \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      case c10::ScalarType::BFloat16: {                                                    \
        using scalar_t = __nv_bfloat16;                                                    \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      case c10::ScalarType::Half: {                                                        \
        using scalar_t = __half;                                                           \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      default:                                                                             \
        TORCH_CHECK(false, NAME, ": logits must be float32, bfloat16 or float16, got ", DTYPE); \
    }                                                                                      \
  }()

}  // namespace fastalign::cuda
