"""The fused kernel of the policy losses other than ppo: reinforce / gpg, cispo, sapo (per token)
and gspo, geo_mean (per sequence: a row pass for the row's ratio, then the token pass):
fastalign::pg_policy_loss_{fwd,bwd} (C++ CPU, csrc/cpu/ppo.cpp and csrc/cpu/isa/ppo_lanes.h; CUDA,
csrc/cuda/ppo.cu) and fastalign_triton::pg_policy_loss_{fwd,bwd} (fastalign/kernels/triton/pg_policy.py).

The same contract as the ppo ops (fastalign/ops/ppo.py, whose fakes and autograd it shares):
  fwd(logprobs, old, adv, mask, kind, a, b, agg, global_count, horizon) -> (out fp32 [8], row_weight [B])
      out = (loss, *POLICY_STATS) in the loss's own pass (the stats a kind does not have are 0);
      kind 0 = -A logp (reinforce, gpg); 1 = cispo (a = 1 - clip_low or 0 without a lower bound,
      b = 1 + clip_high); 2 = sapo (a = tau_pos, b = tau_neg); 3 = gspo (a = 1 - clip_low,
      b = 1 + clip_high); 4 = geo_mean (a = clip_low, b = clip_high, log-space bounds);
  bwd(grad_out, logprobs, old, adv, mask, row_weight, kind, a, b) -> gradient w.r.t. logprobs.
policy_loss falls back to the torch formula on a backend whose loaded kernels lack the op
(available()).
"""

from __future__ import annotations

import torch

from fastalign.ops import ppo as P
from fastalign.ops._fused import FusedOp

PG_POLICY_LOSS = FusedOp(
    name="pg_policy_loss",
    fwd_schema="(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, int kind, float a, float b, "
               "int agg, float global_count, float horizon) -> (Tensor, Tensor)",
    bwd_schema="(Tensor grad_out, Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
               "Tensor row_weight, int kind, float a, float b) -> Tensor",
    fake_fwd=P._fake_fwd("pg_policy_loss_fwd"),
    fake_bwd=P._fake_bwd("pg_policy_loss_bwd"),
    setup_context=P._setup_context,
    backward=P._backward_with(3),
    triton="fastalign.kernels.triton.pg_policy",
)

KINDS = {"reinforce": 0, "gpg": 0, "cispo": 1, "sapo": 2, "gspo": 3, "geo_mean": 4}
# the stats each type reports (POLICY_STATS names; the reference's keys, kernels/reference_policy_losses.py)
STATS = {
    "reinforce": ("approx_kl",), "gpg": ("approx_kl",),
    "cispo": ("approx_kl", "clipfrac", "clipfrac_low", "clipfrac_high", "ratio_mean", "ratio_max"),
    "sapo": ("approx_kl", "ratio_mean", "ratio_max"),
    "gspo": ("approx_kl", "clipfrac", "clipfrac_low", "clipfrac_high", "ratio_mean", "ratio_max"),
    "geo_mean": ("approx_kl", "clipfrac", "clipfrac_low", "clipfrac_high", "ratio_mean", "ratio_max"),
}


# Whether this process has the kernel per backend (an older C++ build has only the schema): asked
# once, here, so that policy_loss reads a Python constant (Dynamo cannot trace the dispatcher
# query, and torch.compiler's decorators would import Dynamo at `import fastalign`).
def _has(key):
    return PG_POLICY_LOSS.kernels("cpp") is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastalign::pg_policy_loss_fwd", key)


_AVAILABLE = {"cpp": _has("CPU"), "cuda": _has("CUDA"), "triton": PG_POLICY_LOSS.kernels("triton") is not None}


def available(backend: str = "cpp") -> bool:
    """Whether `backend` ("cpp", "cuda" or "triton") has the fused kernel in this process."""
    return _AVAILABLE.get(backend, False)


def kernel_args(loss_type: str, params: dict) -> tuple:
    """(kind, a, b) of a checked loss type's parameters."""
    if loss_type == "cispo":
        lo = 0.0 if params["clip_low"] is None else 1.0 - params["clip_low"]
        return 1, lo, 1.0 + params["clip_high"]
    if loss_type == "sapo":
        return 2, params["tau_pos"], params["tau_neg"]
    if loss_type in ("gspo", "geo_mean"):
        high = params["clip_low"] if params["clip_high"] is None else params["clip_high"]
        if loss_type == "gspo":
            return 3, 1.0 - params["clip_low"], 1.0 + high
        return 4, params["clip_low"], high
    return 0, 0.0, 0.0
