// Host-side checks of the reference-free paired losses (fastalign::ref_free_tokens_fwd/bwd), shared
// by csrc/cpu/ref_free.cpp and csrc/cuda/ref_free.cu so both refuse bad input alike. The Python
// wrappers (fastalign/ops/ref_free.py) validate first with friendlier errors; these guard direct
// calls of torch.ops.fastalign.ref_free_tokens_*.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "checks.h"

namespace fastalign::checks {

// kind: 0 orpo, 1 sigmoid (cpo / simpo), 2 hinge, 3 ipo (fastalign/kernels/reference_ref_free.py).
inline void ref_free_args(double beta, int64_t kind, double gamma, double nll_weight, double eps) {
  constexpr const char* op = "ref_free_tokens";
  TORCH_CHECK(beta > 0.0 && std::isfinite(beta), op, ": beta must be a finite number > 0, got ", beta);
  TORCH_CHECK(kind >= 0 && kind <= 3, op, ": kind must be 0..3 (orpo, sigmoid, hinge, ipo), got ", kind);
  TORCH_CHECK(std::isfinite(gamma), op, ": gamma must be finite, got ", gamma);
  TORCH_CHECK(nll_weight >= 0.0 && std::isfinite(nll_weight), op, ": nll_weight must be finite and >= 0, got ",
              nll_weight);
  TORCH_CHECK(eps >= 0.0 && eps < 0.5, op, ": label_smoothing must be in [0, 0.5), got ", eps);
}

// Forward: token log-probs [2B, T] ([chosen; rejected]) and their mask.
inline void ref_free_fwd_args(const at::Tensor& pol, const at::Tensor& mask, double beta, int64_t kind, double gamma,
                              double nll_weight, double eps) {
  token_rows("ref_free_tokens", pol, mask);
  ref_free_args(beta, kind, gamma, nll_weight, eps);
  TORCH_CHECK(pol.size(0) % 2 == 0, "ref_free_tokens: the batch must have 2B rows [chosen; rejected], got ",
              pol.size(0));
}

// Backward: grad [B] and the saved row stats [2, 2B] (row log-probs, valid counts), on the log-probs' device.
inline void ref_free_bwd_args(const at::Tensor& grad, const at::Tensor& stats, const at::Tensor& pol,
                              const at::Tensor& mask, double beta, int64_t kind, double gamma, double nll_weight,
                              double eps) {
  constexpr const char* op = "ref_free_tokens";
  ref_free_fwd_args(pol, mask, beta, kind, gamma, nll_weight, eps);
  const int64_t rows = pol.size(0);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == rows / 2, op, ": grad must be [B] = [", rows / 2, "], got ",
              grad.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == rows, op, ": row_stats must be [2, 2B] = [2, ",
              rows, "], got ", stats.sizes());
  TORCH_CHECK(is_float(grad.scalar_type()) && is_float(stats.scalar_type()), op,
              ": grad and row_stats must be float tensors");
  same_device(op, "grad", grad, "the log-probs", pol);
  same_device(op, "row_stats", stats, "the log-probs", pol);
}

}  // namespace fastalign::checks
