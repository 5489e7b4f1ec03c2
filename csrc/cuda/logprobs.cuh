// Shared by the CUDA implementations of fastalign::gather_logprobs_fwd (logprobs_fwd.cu) and
// gather_logprobs_bwd (logprobs_bwd.cu); schemas in csrc/fastalign.cpp, semantics of
// csrc/cpu/logprobs.cpp, host argument checks in csrc/checks.h. One thread block per row (token),
// 16-byte vector loads, an online log-sum-exp per thread merged across the block (forward), and
// a fused backward pass.
//
// Math, for one row with logits x_j, tempered z_j = x_j / T and label y:
//   lse = log sum_j exp(z_j),   logp_y = z_y - lse,   p_j = exp(z_j - lse)
//   H   = -sum_j p_j log p_j
//
// Labels: the Python wrapper checks the range (one reduction + sync) before calling the op;
// here, without a device sync, a label outside [0, V) reads nothing and gives NaN (logprob and
// that row's gradient).
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common.cuh"

namespace fastalign::cuda::logprobs {

// Launch shape, aimed at streaming the logits at memory bandwidth (H100: ~3.3 TB/s, i.e.
// ~25 GB/s per SM; at ~1 us load latency that needs >~25 KiB in flight per SM). A block of up
// to 256 threads per row, at most 64 registers a thread so that 4 blocks (1024 threads) share an
// SM; each thread issues kUnroll 16-byte loads before any math: 4 x 256 x 64 B = 64 KiB in
// flight per SM. Several smaller blocks rather than one large one per SM, so that one block's
// end of row (block-wide merge, exit) leaves the others streaming.
constexpr int kMaxThreads = 256;
constexpr int kMinBlocksPerSM = 4;
constexpr int kUnroll = 4;  // 16-byte vectors per thread per step
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLogpFloor = -200.f;  // see "Backward" in logprobs_bwd.cu

// ---- splitting a row into 16-byte vectors -------------------------------------------------------

// A row of `vocab` elements at x: `head` elements up to the first kVec-aligned address, then
// `nvec` whole vectors, then `tail` (< kVec) elements. head + tail < 2 kVec <= 32 <= blockDim.x,
// so one scalar element per thread covers them. kVec = 1 is the plain scalar layout.
struct RowSplit {
  int64_t head, nvec, tail;
};

template <typename T, int kVec>
__device__ __forceinline__ RowSplit split_row(const T* x, int64_t vocab) {
  if (kVec == 1) return {0, vocab, 0};
  constexpr uintptr_t kBytes = sizeof(T) * kVec;
  const uintptr_t mis = reinterpret_cast<uintptr_t>(x) % kBytes;  // a multiple of sizeof(T)
  const int64_t head = std::min<int64_t>(vocab, mis ? (kBytes - mis) / sizeof(T) : 0);
  const int64_t nvec = (vocab - head) / kVec;
  return {head, nvec, vocab - head - nvec * kVec};
}

// The column of the scalar (head or tail) element handled by thread k, or -1.
__device__ __forceinline__ int64_t scalar_column(const RowSplit& sp, int64_t k, int kVec) {
  if (k < sp.head) return k;
  if (k < sp.head + sp.tail) return sp.head + sp.nvec * kVec + (k - sp.head);
  return -1;
}

// Threads per block: enough for kUnroll vectors each over the row, a multiple of 32, <= kMaxThreads.
inline int block_threads(int64_t vocab, int vec) {
  const int64_t per_thread = static_cast<int64_t>(kUnroll) * vec;
  const int64_t want = (vocab + per_thread - 1) / per_thread;
  return static_cast<int>(std::clamp<int64_t>((want + 31) / 32 * 32, 32, kMaxThreads));
}

inline unsigned grid_blocks(int64_t rows) {
  // one block per row; the kernels loop over rows beyond the grid limit
  return static_cast<unsigned>(std::min<int64_t>(rows, std::numeric_limits<int>::max()));
}

// What only the CUDA kernels need of the logits (csrc/checks.h checks the rest): device memory
// and element alignment (the kernels' vector loads assume it).
inline void device_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.numel() == 0 || reinterpret_cast<uintptr_t>(logits.data_ptr()) % logits.element_size() == 0,
              op, ": logits data pointer is not aligned to its element size");
}

}  // namespace fastalign::cuda::logprobs
