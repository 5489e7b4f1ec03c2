// Host-side argument checks of the unpaired preference ops (KTO, BCO; fastalign/ops/unpaired.py),
// shared by csrc/cpu/unpaired.cpp and csrc/cuda/unpaired.cu so both refuse bad input alike. The
// Python wrappers validate first with friendlier errors; these guard direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "checks.h"

namespace fastalign::checks {

inline void unpaired_params(const char* op, double beta, double wd, double wu, int64_t kind) {
  TORCH_CHECK(beta > 0.0 && std::isfinite(beta), op, ": beta must be a finite number > 0, got ", beta);
  TORCH_CHECK(wd >= 0.0 && std::isfinite(wd), op, ": desirable_weight must be a finite number >= 0, got ", wd);
  TORCH_CHECK(wu >= 0.0 && std::isfinite(wu), op, ": undesirable_weight must be a finite number >= 0, got ", wu);
  TORCH_CHECK(kind == 0 || kind == 1, op, ": kind must be 0 (kto) or 1 (bco), got ", kind);
}

// labels [N] bool on the log-probs' device.
inline void unpaired_labels(const char* op, const at::Tensor& labels, const at::Tensor& like) {
  TORCH_CHECK(labels.scalar_type() == at::kBool, op, ": labels must be bool here, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == like.size(0), op, ": labels must be [N] = [", like.size(0),
              "], got ", labels.sizes());
  same_device(op, "labels", labels, "the log-probs", like);
}

// A one-element float point tensor (optional) on the log-probs' device.
inline void unpaired_point(const char* op, const c10::optional<at::Tensor>& point, const at::Tensor& like) {
  if (!point.has_value()) return;
  TORCH_CHECK(point->numel() == 1 && is_float(point->scalar_type()), op,
              ": the point tensor must be one float element, got ", point->sizes(), " ", point->scalar_type());
  same_device(op, "the point tensor", *point, "the log-probs", like);
}

// unpaired_loss: policy, ref [N] of one float dtype.
inline void unpaired_seq(const char* op, const at::Tensor& pol, const at::Tensor& ref) {
  TORCH_CHECK(pol.dim() == 1, op, ": policy log-probs must be 1-D [N], got ", pol.sizes());
  TORCH_CHECK(ref.sizes() == pol.sizes(), op, ": ref log-probs must have the shape of the policy's ", pol.sizes(),
              ", got ", ref.sizes());
  TORCH_CHECK(is_float(pol.scalar_type()) && ref.scalar_type() == pol.scalar_type(), op,
              ": log-probs must be float32, bfloat16 or float16, one dtype for both, got ", pol.scalar_type(), " and ",
              ref.scalar_type());
  same_device(op, "ref log-probs", ref, "policy log-probs", pol);
}

// unpaired_tokens forward: policy, ref [N, T] with mask; the optional KL batch [M, T'] (all three
// or none) in the same dtype.
inline void unpaired_tokens_fwd(const at::Tensor& pol, const at::Tensor& ref, const at::Tensor& mask,
                                const at::Tensor& labels, const c10::optional<at::Tensor>& klp,
                                const c10::optional<at::Tensor>& klr, const c10::optional<at::Tensor>& klm,
                                const c10::optional<at::Tensor>& point, double beta, double wd, double wu,
                                int64_t kind) {
  constexpr const char* op = "unpaired_tokens";
  token_rows(op, pol, mask);
  token_rows(op, ref, mask);
  TORCH_CHECK(ref.scalar_type() == pol.scalar_type(), op, ": one dtype for policy and ref here");
  unpaired_labels(op, labels, pol);
  unpaired_point(op, point, pol);
  unpaired_params(op, beta, wd, wu, kind);
  TORCH_CHECK(klp.has_value() == klr.has_value() && klp.has_value() == klm.has_value(), op,
              ": kl_policy, kl_ref and kl_mask go together");
  if (klp.has_value()) {
    token_rows(op, *klp, *klm);
    token_rows(op, *klr, *klm);
    TORCH_CHECK(klp->scalar_type() == pol.scalar_type() && klr->scalar_type() == pol.scalar_type(), op,
                ": the KL token log-probs must have the policy's dtype here");
    TORCH_CHECK(klp->size(0) >= 1, op, ": the KL batch needs at least one row");
    same_device(op, "kl_policy", *klp, "the log-probs", pol);
  }
}

// unpaired_tokens backward: grad [N], the saved sequence log-probs [N] and point, optional grad_seq.
inline void unpaired_tokens_bwd(const at::Tensor& grad, const c10::optional<at::Tensor>& grad_seq,
                                const at::Tensor& pseq, const at::Tensor& rseq, const at::Tensor& point,
                                const at::Tensor& pol, const at::Tensor& mask, const at::Tensor& labels, double beta,
                                double wd, double wu, int64_t kind) {
  constexpr const char* op = "unpaired_tokens";
  token_rows(op, pol, mask);
  unpaired_labels(op, labels, pol);
  unpaired_params(op, beta, wd, wu, kind);
  const int64_t rows = pol.size(0);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == rows && pseq.dim() == 1 && pseq.size(0) == rows &&
                  rseq.sizes() == pseq.sizes() && point.numel() == 1,
              op, ": backward shapes do not match the batch");
  TORCH_CHECK(!grad_seq.has_value() || grad_seq->sizes() == pseq.sizes(), op,
              ": grad of the sequence log-probs must be [N]");
  same_device(op, "grad", grad, "the log-probs", pol);
  same_device(op, "policy sequence log-probs", pseq, "the log-probs", pol);
  same_device(op, "reference sequence log-probs", rseq, "the log-probs", pol);
  same_device(op, "the point", point, "the log-probs", pol);
  if (grad_seq.has_value()) same_device(op, "grad of the sequence log-probs", *grad_seq, "the log-probs", pol);
}

}  // namespace fastalign::checks
