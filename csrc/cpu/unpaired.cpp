// CPU implementation of the unpaired preference ops (fastalign/ops/unpaired.py):
//   unpaired_loss_fwd/bwd     per-example KTO / BCO losses and rewards from sequence log-probs
//   unpaired_tokens_fwd/bwd   the fused head: token log-probs (and a KL batch) -> losses
//
// Math (lr = policy - ref, s = +1 desirable / -1 undesirable, w its weight, z the point):
//   KTO (kind 0)  u = beta (lr - z)   L = w sigmoid(-s u)   dL/dlr = -w s beta sig(x) sig(-x), x = s u
//   BCO (kind 1)  u = beta lr - z     L = -w logsig(s u)    dL/dlr = -w s beta sig(-x)
// sig(x) sig(-x) = e / (1 + e)^2 and logsig(x) = min(x, 0) - log1p(e), e = exp(-|x|) <= 1: finite
// for any finite x. With a KL batch (KTO from tokens) z = max(0, mean_j(kl_policy_j - kl_ref_j))
// over its rows, reduced with the same row sums as the examples. All math fp32; outputs fp32; the
// token gradient in the token log-probs' dtype. The row loops are the DPO head's (masked_sums,
// masked_fill of the kernel table in dispatch.h, per ISA); masks are read as they are.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../unpaired_checks.h"
#include "dispatch.h"
#include "mask.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastalign::cpu {
namespace {

struct Params {
  float beta, wd, wu;
  int64_t kind;
};

Params make_params(double beta, double wd, double wu, int64_t kind) {
  return {static_cast<float>(beta), static_cast<float>(wd), static_cast<float>(wu), kind};
}

inline float sigmoid(float x) {
  const float e = std::exp(-std::fabs(x));  // in (0, 1]: no overflow
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

inline float signed_arg(float lr, bool d, float z, const Params& p) {
  const float u = p.kind == 0 ? p.beta * (lr - z) : p.beta * lr - z;
  return d ? u : -u;
}

inline float example_loss(float lr, bool d, float z, const Params& p) {
  const float x = signed_arg(lr, d, z, p);
  const float w = d ? p.wd : p.wu;
  if (p.kind == 0) return w * sigmoid(-x);
  return -w * (std::min(x, 0.f) - std::log1p(std::exp(-std::fabs(x))));
}

// d loss / d lr
inline float example_grad(float lr, bool d, float z, const Params& p) {
  const float x = signed_arg(lr, d, z, p);
  const float wsb = d ? p.wd * p.beta : -(p.wu * p.beta);
  if (p.kind == 0) {
    const float e = std::exp(-std::fabs(x));
    return -wsb * (e / ((1.f + e) * (1.f + e)));
  }
  return -wsb * sigmoid(-x);
}

float read_point(const c10::optional<at::Tensor>& point_t, double point) {
  return point_t.has_value() ? point_t->to(at::kFloat).reshape({1}).item<float>() : static_cast<float>(point);
}

// Rows per parallel task: about 32 K tokens, so that small batches stay on one thread.
int64_t row_grain(int64_t steps) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(steps, 1)); }

// ---- unpaired_loss (from sequence log-probs) --------------------------------------------------

std::tuple<at::Tensor, at::Tensor> unpaired_loss_fwd(const at::Tensor& pol_in, const at::Tensor& ref_in,
                                                     const at::Tensor& labels_in,
                                                     const c10::optional<at::Tensor>& point_t, double point,
                                                     double beta, double wd, double wu, int64_t kind) {
  constexpr const char* op = "unpaired_loss";
  checks::unpaired_seq(op, pol_in, ref_in);
  checks::unpaired_labels(op, labels_in, pol_in);
  checks::unpaired_point(op, point_t, pol_in);
  checks::unpaired_params(op, beta, wd, wu, kind);
  const at::Tensor pol = pol_in.contiguous(), ref = ref_in.contiguous(), labels = labels_in.contiguous();
  const int64_t n = pol.size(0);
  auto opts = pol.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, opts), rw = at::empty({n}, opts);
  const Params p = make_params(beta, wd, wu, kind);
  const float z = read_point(point_t, point);
  const bool* pd = labels.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pol.scalar_type(), "unpaired_loss_fwd", [&] {
    const scalar_t *pp = pol.const_data_ptr<scalar_t>(), *pq = ref.const_data_ptr<scalar_t>();
    float *pl = loss.mutable_data_ptr<float>(), *pr = rw.mutable_data_ptr<float>();
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float lr = static_cast<float>(pp[i]) - static_cast<float>(pq[i]);
        pl[i] = example_loss(lr, pd[i], z, p);
        pr[i] = p.beta * lr;
      }
    });
  });
  return {loss, rw};
}

// Returns grad_losses * dL/dlr [N] fp32: the gradient w.r.t. the policy log-probs (the ref's is
// its negative, applied by the autograd formula in Python).
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
  const at::Tensor pol = pol_in.contiguous(), ref = ref_in.contiguous(), labels = labels_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const int64_t n = pol.size(0);
  at::Tensor g = at::empty({n}, pol.options().dtype(at::kFloat));
  const Params p = make_params(beta, wd, wu, kind);
  const float z = read_point(point_t, point);
  const bool* pd = labels.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pol.scalar_type(), "unpaired_loss_bwd", [&] {
    const scalar_t *pp = pol.const_data_ptr<scalar_t>(), *pq = ref.const_data_ptr<scalar_t>();
    const float* pgo = grad.const_data_ptr<float>();
    float* pg = g.mutable_data_ptr<float>();
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float lr = static_cast<float>(pp[i]) - static_cast<float>(pq[i]);
        pg[i] = pgo[i] * example_grad(lr, pd[i], z, p);
      }
    });
  });
  return g;
}

// ---- unpaired_tokens: token log-probs -> per-example losses ------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unpaired_tokens_fwd(
    const at::Tensor& pol_in, const at::Tensor& ref_in, const at::Tensor& mask_in, const at::Tensor& labels_in,
    const c10::optional<at::Tensor>& klp_in, const c10::optional<at::Tensor>& klr_in,
    const c10::optional<at::Tensor>& klm_in, const c10::optional<at::Tensor>& point_t, double point, double beta,
    double wd, double wu, int64_t kind, bool mean) {
  checks::unpaired_tokens_fwd(pol_in, ref_in, mask_in, labels_in, klp_in, klr_in, klm_in, point_t, beta, wd, wu,
                              kind);
  const at::Tensor pol = pol_in.contiguous(), ref = ref_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t rows = pol.size(0), steps = pol.size(1);
  auto opts = pol.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, opts), rw = at::empty({rows}, opts), zt = at::empty(at::IntArrayRef{}, opts);
  at::Tensor pseq = at::empty({rows}, opts), rseq = at::empty({rows}, opts);
  const Params p = make_params(beta, wd, wu, kind);
  const auto& k = best_kernels();
  float *pps = pseq.mutable_data_ptr<float>(), *prs = rseq.mutable_data_ptr<float>();
  {
    const MaskedRows mr = masked_rows(pol, mask);
    const void *pp = pol.const_data_ptr(), *pq = ref.const_data_ptr();
    at::parallel_for(0, rows, row_grain(steps), [&](int64_t r0, int64_t r1) {
      k.masked_sums(mr, pp, mean, pps, r0, r1);
      k.masked_sums(mr, pq, mean, prs, r0, r1);
    });
  }
  float z = read_point(point_t, point);
  if (klp_in.has_value()) {
    // z0 = max(0, mean of the KL rows' log-ratios): the rows' sums in parallel, then one fp32
    // sum in row order
    const at::Tensor klp = klp_in->contiguous(), klr = klr_in->contiguous(), klm = klm_in->contiguous();
    const int64_t kl_rows = klp.size(0), kl_steps = klp.size(1);
    std::vector<float> sp(kl_rows), sq(kl_rows);
    const MaskedRows mr = masked_rows(klp, klm);
    const void *pp = klp.const_data_ptr(), *pq = klr.const_data_ptr();
    at::parallel_for(0, kl_rows, row_grain(kl_steps), [&](int64_t r0, int64_t r1) {
      k.masked_sums(mr, pp, mean, sp.data(), r0, r1);
      k.masked_sums(mr, pq, mean, sq.data(), r0, r1);
    });
    float acc = 0.f;
    for (int64_t j = 0; j < kl_rows; ++j) acc += sp[j] - sq[j];
    const float m = acc / static_cast<float>(kl_rows);
    z = (m > 0.f || std::isnan(m)) ? m : 0.f;  // clamp(min=0), NaN kept
  }
  zt.fill_(z);
  const bool* pd = labels.const_data_ptr<bool>();
  float *pl = loss.mutable_data_ptr<float>(), *pr = rw.mutable_data_ptr<float>();
  for (int64_t i = 0; i < rows; ++i) {
    const float lr = pps[i] - prs[i];
    pl[i] = example_loss(lr, pd[i], z, p);
    pr[i] = p.beta * lr;
  }
  return {loss, rw, zt, pseq, rseq};
}

// grad wrt policy token log-probs [N, T] in their dtype: row j gets the scalar
// grad_losses[j] * dL/dlr_j + grad_policy_seq[j] (divided by its valid count for the mean) at
// its valid positions.
at::Tensor unpaired_tokens_bwd(const at::Tensor& grad_in, const c10::optional<at::Tensor>& grad_seq_in,
                               const at::Tensor& pseq_in, const at::Tensor& rseq_in, const at::Tensor& point_in,
                               const at::Tensor& pol, const at::Tensor& mask_in, const at::Tensor& labels_in,
                               double beta, double wd, double wu, int64_t kind, bool mean) {
  checks::unpaired_tokens_bwd(grad_in, grad_seq_in, pseq_in, rseq_in, point_in, pol, mask_in, labels_in, beta, wd,
                              wu, kind);
  const int64_t rows = pol.size(0), steps = pol.size(1);
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous(), mask = mask_in.contiguous();
  const at::Tensor pseq = pseq_in.to(at::kFloat).contiguous(), rseq = rseq_in.to(at::kFloat).contiguous();
  const at::Tensor labels = labels_in.contiguous();
  at::Tensor gseq;
  if (grad_seq_in.has_value()) gseq = grad_seq_in->to(at::kFloat).contiguous();
  at::Tensor gx = at::empty({rows, steps}, pol.options());
  const Params p = make_params(beta, wd, wu, kind);
  const float z = point_in.to(at::kFloat).reshape({1}).item<float>();
  std::vector<float> row_value(rows);
  {
    const float *go = grad.const_data_ptr<float>(), *ps = pseq.const_data_ptr<float>();
    const float* rs = rseq.const_data_ptr<float>();
    const float* gs = gseq.defined() ? gseq.const_data_ptr<float>() : nullptr;
    const bool* pd = labels.const_data_ptr<bool>();
    for (int64_t j = 0; j < rows; ++j)
      row_value[j] = go[j] * example_grad(ps[j] - rs[j], pd[j], z, p) + (gs != nullptr ? gs[j] : 0.f);
  }
  const MaskedRows mr = masked_rows(pol, mask);
  void* pg = gx.mutable_data_ptr();
  const float* pv = row_value.data();
  const auto& k = best_kernels();
  at::parallel_for(0, rows, row_grain(steps), [&](int64_t r0, int64_t r1) { k.masked_fill(mr, pg, pv, mean, r0, r1); });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("unpaired_loss_fwd", &unpaired_loss_fwd);
  m.impl("unpaired_loss_bwd", &unpaired_loss_bwd);
  m.impl("unpaired_tokens_fwd", &unpaired_tokens_fwd);
  m.impl("unpaired_tokens_bwd", &unpaired_tokens_bwd);
}

}  // namespace fastalign::cpu
