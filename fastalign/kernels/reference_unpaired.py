"""Eager references of the unpaired preference losses (fastalign/ops/unpaired.py): KTO
(Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"; TRL's
`loss_type="kto"` and `"apo_zero_unpaired"`) and BCO (Jung et al. 2024, "Binary Classifier
Optimization for Large Language Model Alignment"; TRL's experimental BCOTrainer). Plain fp32
math from the formulas; the `backend="torch"` implementations and the tests' ground truth.

Per example i with log-ratio lr_i = logp_i - ref_logp_i, label d_i (True = desirable), sign
s_i = +1 if d_i else -1, weight w_i = desirable_weight if d_i else undesirable_weight and the
reference point z (KTO: the KL estimate z0; BCO: the running reward mean delta):
    KTO   u_i = beta (lr_i - z)      L_i = w_i (1 - sigmoid(s_i u_i)) = w_i sigmoid(-s_i u_i)
    BCO   u_i = beta lr_i - z        L_i = w_i (-logsigmoid(s_i u_i))
The implicit rewards are beta lr_i (detached); z is a constant (no gradient).
"""

from __future__ import annotations

import torch

from fastalign.kernels.reference import sequence_logps

KINDS = ("kto", "bco")  # the kernels' `kind` ids are the positions here


def unpaired_losses(lr, labels, point, beta, desirable_weight, undesirable_weight, kind):
    """(losses, rewards) fp32 [N] from the fp32 log-ratios lr [N], bool labels [N] and the
    reference point (a number or a 0-d fp32 tensor, used as a constant)."""
    lr = lr.float()
    point = point.detach().float() if isinstance(point, torch.Tensor) else float(point)
    u = beta * (lr - point) if kind == "kto" else beta * lr - point
    x = torch.where(labels, u, -u)
    w = torch.where(labels, torch.full_like(lr, desirable_weight), torch.full_like(lr, undesirable_weight))
    per = torch.sigmoid(-x) if kind == "kto" else -torch.nn.functional.logsigmoid(x)
    return w * per, (beta * lr).detach()


def kto_kl_reference(policy_kl_logps, ref_kl_logps):
    """z0 = max(0, mean_j(policy_kl_j - ref_kl_j)), detached fp32 0-d: the KL estimate of KTO on
    mismatched (prompt, completion) pairs (TRL: `(KL_logps - ref_KL_logps).mean().clamp(min=0)`)."""
    return (policy_kl_logps.float() - ref_kl_logps.float()).mean().clamp(min=0).detach()


def unpaired_tokens(policy, ref, mask, labels, kl_policy, kl_ref, kl_mask, point, beta, desirable_weight,
                    undesirable_weight, kind, mean):
    """The fused head from token log-probs: (losses, rewards, point used, policy_seq, ref_seq).
    Rows are reduced to masked sums (means with mean=True); with KL token log-probs the point is
    kto_kl_reference of their rows' reductions, else `point`. ref is treated as frozen."""
    pseq = sequence_logps(policy, mask, mean)
    rseq = sequence_logps(ref.detach(), mask, mean)
    if kl_policy is not None:
        z = kto_kl_reference(sequence_logps(kl_policy.detach(), kl_mask, mean),
                             sequence_logps(kl_ref.detach(), kl_mask, mean))
    else:
        z = torch.as_tensor(point, dtype=torch.float32, device=policy.device).detach().reshape(())
    losses, rewards = unpaired_losses(pseq - rseq, labels, z, beta, desirable_weight, undesirable_weight, kind)
    return losses, rewards, z, pseq, rseq.detach()
