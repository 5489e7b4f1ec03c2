"""Choosing the next token of each row from its logits [B, V]: greedy, or sampled with
temperature, top-k and top-p, with at most one working [B, V] fp32 buffer besides the logits
(two more, sorted values and their order, only when top_p < 1).

Sampling is by inversion: the buffer becomes the unnormalised probabilities exp((l - max) / T)
(top-k / top-p exclusions set to 0), then in place their running sum, and each row draws one
uniform u in [0, total) and takes the first token whose running sum exceeds u. A token of
probability 0 has the same running sum as its predecessor, so it can never be drawn; one uniform
per row replaces the V exponentials of torch.multinomial's exponential trick. The CPU cumsum of
fp32 accumulates in double (sequentially), so the running sum never decreases.

The filters follow transformers' warpers: top-k keeps the k largest (ties at the k-th value
kept), top-p then keeps the smallest set of most probable tokens whose mass reaches top_p (a
token stays when the mass strictly above it is < top_p; at least one token always stays).
"""

from __future__ import annotations

import torch


def choose_tokens(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] (int64) from logits [B, V] (not modified)."""
    if not do_sample:
        return logits.argmax(-1)
    weights = logits.float() / temperature  # the one working buffer (a copy even for fp32 logits)
    V = weights.shape[-1]
    if 0 < top_k < V:
        kth = weights.topk(top_k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        weights.masked_fill_(weights < kth, float("-inf"))
    weights.sub_(weights.amax(-1, keepdim=True)).exp_()  # exp(-inf) = 0 for what top-k dropped
    if top_p < 1.0:
        _drop_outside_top_p(weights, top_p)
    cdf = weights.cumsum_(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=total.device, dtype=total.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: a token with p > 0
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def _drop_outside_top_p(weights: torch.Tensor, top_p: float) -> None:
    """Sets to 0 (in place) the tokens outside each row's top-p nucleus of weights [B, V] >= 0."""
    ordered, order = weights.sort(-1, descending=True)
    above = ordered.cumsum(-1) - ordered  # the mass of the tokens before each one in the order
    drop = above >= top_p * ordered.sum(-1, keepdim=True)
    drop[:, 0] = False  # the most probable token always stays
    weights.scatter_(-1, order, ordered.masked_fill_(drop, 0.0))
