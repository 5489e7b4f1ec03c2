"""Eager PyTorch references: the ground truth every fused kernel is tested against.

Plain, readable math in fp32, straight from the formulas in DESIGN.md; no fusion tricks.
These are also the `backend="torch"` implementations.
"""

from __future__ import annotations

import torch


def gather_logprobs(logits, labels, temperature=1.0, ignore_index=-100, return_entropy=False):
    """fp32 log_softmax(logits / T)[label] and, optionally, the entropy of softmax(logits / T).

    Positions whose label is ignore_index give 0 (for both outputs) and receive no gradient.
    Labels are assumed valid (the public op checks them).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    token_logp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    token_logp = torch.where(valid, token_logp, torch.zeros_like(token_logp))
    if not return_entropy:
        return token_logp
    p = logp.exp()
    # 0 * log 0 = 0 for masked-out vocabulary entries (logit -inf), with a finite gradient
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return token_logp, entropy
