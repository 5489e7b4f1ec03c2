// CUDA implementation of the unpaired preference ops (math: csrc/cpu/unpaired.cpp):
//   unpaired_loss_fwd/bwd     a thread per example
//   unpaired_tokens_fwd       a block per row (the N example rows, then the M KL rows); with a KL
//                             batch the last block to finish (a ticket from a counter, after a
//                             __threadfence) computes z0 = max(0, mean) and every loss, and resets
//                             the counter (per device and stream, zero between launches)
//   unpaired_tokens_bwd       a block per row: the row's scalar gradient at its valid tokens
// fp32 math and outputs, token gradients in the input dtype; 64-bit offsets. The point tensor is
// read on the device (no host sync).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../unpaired_checks.h"

#include <cmath>
#include <map>
#include <mutex>
#include <utility>

#include "common.cuh"
#include "preference_common.cuh"

namespace fastalign::cuda {
namespace {

// the DPO head's block size, block/row sums and stable sigmoid (preference_common.cuh)
using dpo::block_sum;
using dpo::kThreads;
using dpo::row_sum;
using dpo::sigmoid;

struct Params {
  float beta, wd, wu;
  int kind;
};

Params make_params(double beta, double wd, double wu, int64_t kind) {
  return {static_cast<float>(beta), static_cast<float>(wd), static_cast<float>(wu), static_cast<int>(kind)};
}

__device__ __forceinline__ float signed_arg(float lr, bool d, float z, const Params& p) {
  const float u = p.kind == 0 ? p.beta * (lr - z) : p.beta * lr - z;
  return d ? u : -u;
}

__device__ __forceinline__ float example_loss(float lr, bool d, float z, const Params& p) {
  const float x = signed_arg(lr, d, z, p);
  const float w = d ? p.wd : p.wu;
  if (p.kind == 0) return w * sigmoid(-x);
  return -w * (fminf(x, 0.f) - log1pf(expf(-fabsf(x))));
}

__device__ __forceinline__ float example_grad(float lr, bool d, float z, const Params& p) {
  const float x = signed_arg(lr, d, z, p);
  const float wsb = d ? p.wd * p.beta : -(p.wu * p.beta);
  if (p.kind == 0) {
    const float e = expf(-fabsf(x));
    return -wsb * (e / ((1.f + e) * (1.f + e)));
  }
  return -wsb * sigmoid(-x);
}

__device__ __forceinline__ float point_of(const float* pt, float point) { return pt != nullptr ? pt[0] : point; }

template <typename T>
__global__ void loss_fwd_kernel(const T* pol, const T* ref, const bool* labels, const float* pt, float point,
                                float* loss, float* rw, int64_t n, Params p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float lr = to_f32(pol[i]) - to_f32(ref[i]);
  loss[i] = example_loss(lr, labels[i], point_of(pt, point), p);
  rw[i] = p.beta * lr;
}

template <typename T>
__global__ void loss_bwd_kernel(const float* go, const T* pol, const T* ref, const bool* labels, const float* pt,
                                float point, float* g, int64_t n, Params p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float lr = to_f32(pol[i]) - to_f32(ref[i]);
  g[i] = go[i] * example_grad(lr, labels[i], point_of(pt, point), p);
}

struct TokOut {
  float *loss, *rw, *z, *pseq, *rseq, *kl;  // kl: scratch [M] of the KL rows' log-ratios
  unsigned int* counter;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    tok_fwd_kernel(const T* pol, const T* ref, const bool* m, const bool* labels, const T* klp, const T* klr,
                   const bool* klm, const float* pt, float point, TokOut o, int64_t rows, int64_t steps,
                   int64_t kl_rows, int64_t kl_steps, bool mean, Params p) {
  __shared__ float scratch[kThreads / 32];
  __shared__ bool last;
  const int64_t b = blockIdx.x;
  if (klp == nullptr) {  // the point is given: each block finishes its own example
    const float ps = row_sum(pol + b * steps, m + b * steps, steps, mean, scratch);
    const float qs = row_sum(ref + b * steps, m + b * steps, steps, mean, scratch);
    if (threadIdx.x == 0) {
      const float z = point_of(pt, point);
      o.pseq[b] = ps;
      o.rseq[b] = qs;
      o.loss[b] = example_loss(ps - qs, labels[b], z, p);
      o.rw[b] = p.beta * (ps - qs);
      if (b == 0) o.z[0] = z;
    }
    return;
  }
  if (b < rows) {
    const float ps = row_sum(pol + b * steps, m + b * steps, steps, mean, scratch);
    const float qs = row_sum(ref + b * steps, m + b * steps, steps, mean, scratch);
    if (threadIdx.x == 0) {
      o.pseq[b] = ps;
      o.rseq[b] = qs;
    }
  } else {
    const int64_t k = b - rows;
    const float ps = row_sum(klp + k * kl_steps, klm + k * kl_steps, kl_steps, mean, scratch);
    const float qs = row_sum(klr + k * kl_steps, klm + k * kl_steps, kl_steps, mean, scratch);
    if (threadIdx.x == 0) o.kl[k] = ps - qs;
  }
  if (threadIdx.x == 0) {
    __threadfence();  // this block's results are visible before its ticket
    const unsigned int ticket = atomicAdd(o.counter, 1u);
    last = ticket == static_cast<unsigned int>(rows + kl_rows - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  float acc = 0.f;
  for (int64_t k = threadIdx.x; k < kl_rows; k += kThreads) acc += __ldcg(o.kl + k);
  const float mean_kl = block_sum(acc, scratch) / static_cast<float>(kl_rows);
  const float z = (mean_kl > 0.f || isnan(mean_kl)) ? mean_kl : 0.f;  // clamp(min=0), NaN kept
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) {
    const float lr = __ldcg(o.pseq + i) - __ldcg(o.rseq + i);
    o.loss[i] = example_loss(lr, labels[i], z, p);
    o.rw[i] = p.beta * lr;
  }
  if (threadIdx.x == 0) {
    o.z[0] = z;
    *o.counter = 0u;  // zero again for the next launch on this stream
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    tok_bwd_kernel(const float* go, const float* gs, const float* pseq, const float* rseq, const float* z,
                   const bool* m, const bool* labels, T* gx, int64_t steps, bool mean, Params p) {
  __shared__ float scratch[kThreads / 32];
  const int64_t j = blockIdx.x;
  float s = go[j] * example_grad(pseq[j] - rseq[j], labels[j], z[0], p);
  if (gs != nullptr) s += gs[j];
  const bool* mr = m + j * steps;
  if (mean) {
    float cnt = 0.f;
    for (int64_t t = threadIdx.x; t < steps; t += kThreads) cnt += mr[t] ? 1.f : 0.f;
    s = s / fmaxf(block_sum(cnt, scratch), 1.f);
  }
  const T v = from_f32<T>(s), zero = from_f32<T>(0.f);
  T* g = gx + j * steps;
  for (int64_t t = threadIdx.x; t < steps; t += kThreads) g[t] = mr[t] ? v : zero;
}

// ---- host side ----------------------------------------------------------------------------------

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

unsigned int vec_blocks(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

void check_grid(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= 2147483647LL, op, ": at most 2^31 - 1 rows on CUDA, got ", blocks);
}

// The ticket counter of the current stream on `device`: one int32, zeroed once, reset by the
// last block of every launch. Launches on one stream are ordered, so they never share it.
unsigned int* counter_for(const at::Device& device) {
  static std::mutex lock;
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> counters;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const std::lock_guard<std::mutex> guard(lock);
  auto key = std::make_pair(static_cast<int>(device.index()), stream);
  auto it = counters.find(key);
  if (it == counters.end()) {
    it = counters.emplace(key, at::zeros({1}, at::TensorOptions().device(device).dtype(at::kInt))).first;
  }
  return reinterpret_cast<unsigned int*>(it->second.mutable_data_ptr());
}

const float* point_ptr(const c10::optional<at::Tensor>& point_t, at::Tensor& keep) {
  if (!point_t.has_value()) return nullptr;
  keep = point_t->to(at::kFloat).contiguous();
  return keep.const_data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor> unpaired_loss_fwd(const at::Tensor& pol_in, const at::Tensor& ref_in,
                                                     const at::Tensor& labels_in,
                                                     const c10::optional<at::Tensor>& point_t, double point,
                                                     double beta, double wd, double wu, int64_t kind) {
  constexpr const char* op = "unpaired_loss";
  checks::unpaired_seq(op, pol_in, ref_in);
  checks::unpaired_labels(op, labels_in, pol_in);
  checks::unpaired_point(op, point_t, pol_in);
  checks::unpaired_params(op, beta, wd, wu, kind);
  const c10::cuda::CUDAGuard guard(pol_in.device());
  const at::Tensor pol = pol_in.contiguous(), ref = ref_in.contiguous(), labels = labels_in.contiguous();
  const int64_t n = pol.size(0);
  auto opts = pol.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, opts), rw = at::empty({n}, opts), pt_keep;
  if (n == 0) return {loss, rw};
  const float* pt = point_ptr(point_t, pt_keep);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Params p = make_params(beta, wd, wu, kind);
  FASTALIGN_DISPATCH_FLOAT_TYPES(pol.scalar_type(), "unpaired_loss", [&] {
    loss_fwd_kernel<scalar_t><<<vec_blocks(n), kThreads, 0, stream>>>(
        cptr<scalar_t>(pol), cptr<scalar_t>(ref), labels.const_data_ptr<bool>(), pt, static_cast<float>(point),
        loss.mutable_data_ptr<float>(), rw.mutable_data_ptr<float>(), n, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, rw};
}

at::Tensor unpaired_loss_bwd(const at::Tensor& grad_in, const at::Tensor& pol_in, const at::Tensor& ref_in,
                             const at::Tensor& labels_in, const c10::optional<at::Tensor>& point_t, double point,
                             double beta, double wd, double wu, int64_t kind) {
  constexpr const char* op = "unpaired_loss";
  checks::unpaired_seq(op, pol_in, ref_in);
  checks::unpaired_labels(op, labels_in, pol_in);
  checks::unpaired_point(op, point_t, pol_in);
  checks::unpaired_params(op, beta, wd, wu, kind);
  TORCH_CHECK(grad_in.sizes() == pol_in.sizes(), op, ": grad must be [N], got ", grad_in.sizes());
  checks::same_device(op, "grad", grad_in, "the log-probs", pol_in);
  const c10::cuda::CUDAGuard guard(pol_in.device());
  const at::Tensor pol = pol_in.contiguous(), ref = ref_in.contiguous(), labels = labels_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const int64_t n = pol.size(0);
  at::Tensor g = at::empty({n}, pol.options().dtype(at::kFloat)), pt_keep;
  if (n == 0) return g;
  const float* pt = point_ptr(point_t, pt_keep);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Params p = make_params(beta, wd, wu, kind);
  FASTALIGN_DISPATCH_FLOAT_TYPES(pol.scalar_type(), "unpaired_loss", [&] {
    loss_bwd_kernel<scalar_t><<<vec_blocks(n), kThreads, 0, stream>>>(
        grad.const_data_ptr<float>(), cptr<scalar_t>(pol), cptr<scalar_t>(ref), labels.const_data_ptr<bool>(), pt,
        static_cast<float>(point), g.mutable_data_ptr<float>(), n, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unpaired_tokens_fwd(
    const at::Tensor& pol_in, const at::Tensor& ref_in, const at::Tensor& mask_in, const at::Tensor& labels_in,
    const c10::optional<at::Tensor>& klp_in, const c10::optional<at::Tensor>& klr_in,
    const c10::optional<at::Tensor>& klm_in, const c10::optional<at::Tensor>& point_t, double point, double beta,
    double wd, double wu, int64_t kind, bool mean) {
  constexpr const char* op = "unpaired_tokens";
  checks::unpaired_tokens_fwd(pol_in, ref_in, mask_in, labels_in, klp_in, klr_in, klm_in, point_t, beta, wd, wu,
                              kind);
  const c10::cuda::CUDAGuard guard(pol_in.device());
  const at::Tensor pol = pol_in.contiguous(), ref = ref_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const bool has_kl = klp_in.has_value();
  at::Tensor klp, klr, klm;
  if (has_kl) {
    klp = klp_in->contiguous();
    klr = klr_in->contiguous();
    klm = klm_in->contiguous();
  }
  const int64_t rows = pol.size(0), steps = pol.size(1);
  const int64_t kl_rows = has_kl ? klp.size(0) : 0, kl_steps = has_kl ? klp.size(1) : 0;
  check_grid(op, rows + kl_rows);
  auto opts = pol.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, opts), rw = at::empty({rows}, opts), z = at::empty(at::IntArrayRef{}, opts);
  at::Tensor pseq = at::empty({rows}, opts), rseq = at::empty({rows}, opts);
  at::Tensor kl = at::empty({std::max<int64_t>(kl_rows, 1)}, opts), pt_keep;
  const float* pt = point_ptr(point_t, pt_keep);
  if (rows + kl_rows == 0) {
    z.fill_(point_t.has_value() ? *point_t : at::scalar_tensor(point, opts));
    return {loss, rw, z, pseq, rseq};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Params p = make_params(beta, wd, wu, kind);
  TokOut o{loss.mutable_data_ptr<float>(), rw.mutable_data_ptr<float>(), z.mutable_data_ptr<float>(),
           pseq.mutable_data_ptr<float>(), rseq.mutable_data_ptr<float>(), kl.mutable_data_ptr<float>(),
           has_kl ? counter_for(pol.device()) : nullptr};
  FASTALIGN_DISPATCH_FLOAT_TYPES(pol.scalar_type(), "unpaired_tokens", [&] {
    tok_fwd_kernel<scalar_t><<<static_cast<unsigned int>(rows + kl_rows), kThreads, 0, stream>>>(
        cptr<scalar_t>(pol), cptr<scalar_t>(ref), mask.const_data_ptr<bool>(), labels.const_data_ptr<bool>(),
        has_kl ? cptr<scalar_t>(klp) : nullptr, has_kl ? cptr<scalar_t>(klr) : nullptr,
        has_kl ? klm.const_data_ptr<bool>() : nullptr, pt, static_cast<float>(point), o, rows, steps, kl_rows,
        kl_steps, mean, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, rw, z, pseq, rseq};
}

at::Tensor unpaired_tokens_bwd(const at::Tensor& grad_in, const c10::optional<at::Tensor>& grad_seq_in,
                               const at::Tensor& pseq_in, const at::Tensor& rseq_in, const at::Tensor& point_in,
                               const at::Tensor& pol, const at::Tensor& mask_in, const at::Tensor& labels_in,
                               double beta, double wd, double wu, int64_t kind, bool mean) {
  constexpr const char* op = "unpaired_tokens";
  checks::unpaired_tokens_bwd(grad_in, grad_seq_in, pseq_in, rseq_in, point_in, pol, mask_in, labels_in, beta, wd,
                              wu, kind);
  const int64_t rows = pol.size(0), steps = pol.size(1);
  check_grid(op, rows);
  const c10::cuda::CUDAGuard guard(pol.device());
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), mask = mask_in.contiguous();
  const at::Tensor pseq = pseq_in.to(at::kFloat).contiguous(), rseq = rseq_in.to(at::kFloat).contiguous();
  const at::Tensor point = point_in.to(at::kFloat).contiguous(), labels = labels_in.contiguous();
  at::Tensor gseq;
  if (grad_seq_in.has_value()) gseq = grad_seq_in->to(at::kFloat).contiguous();
  at::Tensor gx = at::empty({rows, steps}, pol.options());
  if (rows == 0 || steps == 0) return gx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Params p = make_params(beta, wd, wu, kind);
  FASTALIGN_DISPATCH_FLOAT_TYPES(pol.scalar_type(), "unpaired_tokens", [&] {
    tok_bwd_kernel<scalar_t><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        grad.const_data_ptr<float>(), gseq.defined() ? gseq.const_data_ptr<float>() : nullptr,
        pseq.const_data_ptr<float>(), rseq.const_data_ptr<float>(), point.const_data_ptr<float>(),
        mask.const_data_ptr<bool>(), labels.const_data_ptr<bool>(), mptr<scalar_t>(gx), steps, mean, p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("unpaired_loss_fwd", &unpaired_loss_fwd);
  m.impl("unpaired_loss_bwd", &unpaired_loss_bwd);
  m.impl("unpaired_tokens_fwd", &unpaired_tokens_fwd);
  m.impl("unpaired_tokens_bwd", &unpaired_tokens_bwd);
}

}  // namespace fastalign::cuda
