// CPU implementations of fastalign::gather_logprobs_{fwd,bwd}: argument checks, allocation,
// and parallelism over rows. The vectorised per-row loops are in logprobs_kernel.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "capability.h"
#include "memory.h"

namespace fastalign::cpu {
namespace {

void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2, "gather_logprobs: logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) <= 1, "gather_logprobs: logits must have unit stride in the vocabulary dim");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "gather_logprobs: labels must be [N] = [",
              logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "gather_logprobs: labels must be int64 here, got ", labels.scalar_type());
  const int64_t vocab = logits.size(1);
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.size(0); ++i) {
    TORCH_CHECK_INDEX(lab[i] == ignore_index || (lab[i] >= 0 && lab[i] < vocab), "gather_logprobs: labels[", i,
                      "] = ", lab[i], " is outside [0, ", vocab, ") and is not ignore_index (", ignore_index, ")");
  }
}

int64_t grain_for(int64_t vocab) {
  // ~32k elements of work per task keeps the scheduling overhead negligible.
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels_in,
                                                                   double temperature, int64_t ignore_index,
                                                                   bool with_entropy) {
  const at::Tensor labels = labels_in.contiguous();
  check_logits_labels(logits, labels, ignore_index);
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
  const at::Tensor labels = labels_in.contiguous();
  TORCH_CHECK(logits.dim() == 2 && (logits.stride(1) == 1 || logits.size(1) <= 1), "gather_logprobs_bwd: bad logits");
  const int64_t n = logits.size(0);
  at::Tensor grad_logits = at::empty({n, logits.size(1)}, logits.options());
  if (n == 0 || logits.size(1) == 0) return grad_logits;
  advise_huge_pages(grad_logits.data_ptr(), grad_logits.nbytes());
  const at::Tensor g = grad_logprobs.to(at::kFloat).contiguous();
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == n && row_stats.size(1) == 2 &&
                  row_stats.scalar_type() == at::kFloat,
              "gather_logprobs_bwd: row_stats must be fp32 [N, 2]");
  const at::Tensor stats = row_stats.contiguous();
  at::Tensor gh, h;
  const bool use_h = grad_entropy.has_value() && grad_entropy->defined();
  if (use_h) {
    TORCH_CHECK(entropy.has_value() && entropy->numel() == n, "gather_logprobs_bwd: entropy gradient without entropy");
    gh = grad_entropy->to(at::kFloat).contiguous();
    h = entropy->contiguous();
  }
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
