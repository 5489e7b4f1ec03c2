"""The fused CPU kernel of the per-token policy losses other than ppo: reinforce / gpg, cispo and
sapo (fastalign::pg_policy_loss_{fwd,bwd}, csrc/cpu/ppo.cpp and csrc/cpu/isa/ppo_lanes.h).

The same contract as the ppo ops (fastalign/ops/ppo.py, whose fakes and autograd it shares):
  fwd(logprobs, old, adv, mask, kind, a, b, agg, global_count, horizon) -> (out fp32 [4], row_weight [B])
      out = (loss, stat1, stat2, approx_kl); kind 0 = -A logp (reinforce, gpg), 1 = cispo
      (a = 1 - clip_low or 0 without a lower bound, b = 1 + clip_high; stat1 / stat2 = fraction of
      ratios below a / above b), 2 = sapo (a = tau_pos, b = tau_neg; stats 0);
  bwd(grad_out, logprobs, old, adv, mask, row_weight, kind, a, b) -> gradient w.r.t. logprobs.
CPU only (cpp backend); the other backends run the torch formulas. policy_loss falls back to the
torch formula when the loaded extension predates this op.
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
)

KINDS = {"reinforce": 0, "gpg": 0, "cispo": 1, "sapo": 2}


# Whether the loaded extension has the CPU kernel (an older build has only the schema): asked once,
# here, so that policy_loss reads a Python constant (Dynamo cannot trace the dispatcher query, and
# torch.compiler's decorators would import Dynamo at `import fastalign`).
_AVAILABLE = PG_POLICY_LOSS.kernels("cpp") is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastalign::pg_policy_loss_fwd", "CPU")


def available() -> bool:
    return _AVAILABLE


def kernel_args(loss_type: str, params: dict) -> tuple:
    """(kind, a, b) of a checked loss type's parameters."""
    if loss_type == "cispo":
        lo = 0.0 if params["clip_low"] is None else 1.0 - params["clip_low"]
        return 1, lo, 1.0 + params["clip_high"]
    if loss_type == "sapo":
        return 2, params["tau_pos"], params["tau_neg"]
    return 0, 0.0, 0.0
