// CPU implementations of fastalign::gather_logprobs_{fwd,bwd}: argument checks (csrc/checks.h,
// shared with CUDA), allocation, and parallelism over rows. The vectorised per-row loops are in
// isa/logprobs_rows.h, compiled per ISA and reached through the kernel table of dispatch.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <cmath>

#include "dispatch.h"
#include "memory.h"

namespace fastalign::cpu {
namespace {

int64_t grain_for(int64_t vocab) {
  // ~32k elements of work per task keeps the scheduling overhead negligible.
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels_in,
                                                                   double temperature, int64_t ignore_index,
                                                                   bool with_entropy) {
  constexpr const char* op = "gather_logprobs";
  checks::logits_labels(op, logits, labels_in, temperature);
  const at::Tensor labels = labels_in.contiguous();
  checks::label_range(op, labels, logits.size(1), ignore_index);
  const int64_t n = logits.size(0);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({n}, opts);
  at::Tensor entropy = at::empty({with_entropy ? n : 0}, opts);
  at::Tensor row_stats = at::empty({n, 2}, opts);
  checks::vocab_nonempty(op, logits);
  if (n == 0) return {logprobs, entropy, row_stats};
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
  checks::logits_labels(op, logits, labels_in, temperature);
  const at::Tensor labels = labels_in.contiguous();
  checks::label_range(op, labels, logits.size(1), ignore_index);
  const int64_t n = logits.size(0);
  at::Tensor grad_logits = at::empty({n, logits.size(1)}, logits.options());
  if (n == 0 || logits.size(1) == 0) return grad_logits;
  const at::Tensor g = checks::row_vector(op, "grad_logprobs", grad_logprobs, logits);
  checks::row_stats(op, row_stats, logits);
  const at::Tensor stats = row_stats.contiguous();
  at::Tensor gh, h;
  const bool use_h = checks::entropy_grad(op, grad_entropy, entropy);
  if (use_h) {
    gh = checks::row_vector(op, "grad_entropy", *grad_entropy, logits);
    h = checks::row_vector(op, "entropy", *entropy, logits);
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
