// CPU implementations of fastalign::gather_logprobs_{fwd,bwd}: argument checks, allocation,
// and parallelism over rows. The vectorised per-row loops are in logprobs_kernel.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <cmath>

#include "capability.h"
#include "memory.h"

namespace fastalign::cpu {
namespace {

void check_logits_labels(const char* op, const at::Tensor& logits, const at::Tensor& labels, double temperature,
                         int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) <= 1, op, ": logits must have unit stride in the vocabulary dim");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels are on ", labels.device(), " but logits on ",
              logits.device());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels must be [N] = [", logits.size(0),
              "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64 here, got ", labels.scalar_type());
  checks::temperature(op, temperature);
  // Both passes index the row at the label (the backward writes there), so the range check guards
  // memory, not just the result. O(N), negligible next to the O(N V) kernels.
  const int64_t vocab = logits.size(1);
  const at::Tensor lab_c = labels.contiguous();
  const int64_t* lab = lab_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.size(0); ++i) {
    TORCH_CHECK_INDEX(lab[i] == ignore_index || (lab[i] >= 0 && lab[i] < vocab), op, ": labels[", i, "] = ", lab[i],
                      " is outside [0, ", vocab, ") and is not ignore_index (", ignore_index, ")");
  }
}

// A per-row input of the backward ([N] elements, any float dtype, on the CPU) as contiguous fp32.
at::Tensor row_vector(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.numel() == n, op, ": ", name, " must have N = ", n, " elements, got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", t.scalar_type());
  return t.reshape({-1}).to(at::kFloat).contiguous();
}

int64_t grain_for(int64_t vocab) {
  // ~32k elements of work per task keeps the scheduling overhead negligible.
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels_in,
                                                                   double temperature, int64_t ignore_index,
                                                                   bool with_entropy) {
  check_logits_labels("gather_logprobs", logits, labels_in, temperature, ignore_index);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = logits.size(0);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({n}, opts);
  at::Tensor entropy = at::empty({with_entropy ? n : 0}, opts);
  at::Tensor row_stats = at::empty({n, 2}, opts);
  if (n == 0) return {logprobs, entropy, row_stats};
  TORCH_CHECK(logits.size(1) > 0, "gather_logprobs: the vocabulary dim of logits is empty");
  const LogprobsFwdArgs args{logits.data_ptr(),
                             logits.stride(0),
                             logits.scalar_type(),
                             logits.size(1),
                             labels.data_ptr<int64_t>(),
                             static_cast<float>(1.0 / temperature),
                             ignore_index,
                             logprobs.data_ptr<float>(),
                             with_entropy ? entropy.data_ptr<float>() : nullptr,
                             row_stats.data_ptr<float>()};
  const auto& k = best_kernels();
  at::parallel_for(0, n, grain_for(args.vocab), [&](int64_t b, int64_t e) { k.logprobs_fwd(args, b, e); });
  return {logprobs, entropy, row_stats};
}

at::Tensor gather_logprobs_bwd(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                               const at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& row_stats,
                               const std::optional<at::Tensor>& entropy, double temperature, int64_t ignore_index) {
  constexpr const char* op = "gather_logprobs_bwd";
  check_logits_labels(op, logits, labels_in, temperature, ignore_index);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = logits.size(0);
  at::Tensor grad_logits = at::empty({n, logits.size(1)}, logits.options());
  if (n == 0 || logits.size(1) == 0) return grad_logits;
  const at::Tensor g = row_vector(op, "grad_logprobs", grad_logprobs, n);
  TORCH_CHECK(row_stats.device().is_cpu() && row_stats.dim() == 2 && row_stats.size(0) == n && row_stats.size(1) == 2 &&
                  row_stats.scalar_type() == at::kFloat,
              op, ": row_stats must be fp32 [N, 2] on the CPU, got ", row_stats.scalar_type(), " ", row_stats.sizes(),
              " on ", row_stats.device());
  const at::Tensor stats = row_stats.contiguous();
  at::Tensor gh, h;
  const bool use_h = grad_entropy.has_value() && grad_entropy->defined();
  if (use_h) {
    TORCH_CHECK(entropy.has_value() && entropy->defined(), op, ": grad_entropy given without entropy");
    gh = row_vector(op, "grad_entropy", *grad_entropy, n);
    h = row_vector(op, "entropy", *entropy, n);
  }
  advise_huge_pages(grad_logits.data_ptr(), grad_logits.nbytes());
  const LogprobsBwdArgs args{logits.data_ptr(),
                             logits.stride(0),
                             logits.scalar_type(),
                             logits.size(1),
                             labels.data_ptr<int64_t>(),
                             static_cast<float>(1.0 / temperature),
                             ignore_index,
                             g.data_ptr<float>(),
                             use_h ? gh.data_ptr<float>() : nullptr,
                             stats.data_ptr<float>(),
                             use_h ? h.data_ptr<float>() : nullptr,
                             grad_logits.data_ptr()};
  const auto& k = best_kernels();
  at::parallel_for(0, n, grain_for(args.vocab), [&](int64_t b, int64_t e) { k.logprobs_bwd(args, b, e); });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("gather_logprobs_fwd", &gather_logprobs_fwd);
  m.impl("gather_logprobs_bwd", &gather_logprobs_bwd);
}

}  // namespace fastalign::cpu
