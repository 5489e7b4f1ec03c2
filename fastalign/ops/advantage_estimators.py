"""The built-in advantage estimators of `fastalign.advantages`, vectorised over groups.

Every estimator here has the registry's signature `fn(rewards, mask, group, **options) ->
(advantages, returns)`: rewards fp32 `[B, T]` token-level rewards, mask bool `[B, T]` (True = a
response token), group int64 `[B]` dense group ids in [0, B) or None (see `dense_group_ids`).
Group statistics are index_add / scatter_reduce over B buckets (a bucket per possible group, so
every shape is static: no torch.unique, no host synchronisation, torch.compile(fullgraph=True)
traces it). The peers (verl, OpenRLHF) build a dict of lists in a Python loop over samples.

These are the "torch" backend of fastalign.advantages (the fused cpp/cuda/triton ops are in
fastalign/ops/advantage_ops.py). On the CPU index_add is deterministic; on CUDA it uses float
atomics (run-to-run bit equality there needs torch.use_deterministic_algorithms(True); the fused
ops are deterministic without it).
"""

from __future__ import annotations

import torch

from fastalign.ops.kl import masked_whiten


def dense_group_ids(index: torch.Tensor) -> torch.Tensor:
    """int64 `[B]`: each sample's group as the rank of its index value among the distinct values
    (0 for the smallest). Any integer ids, in any order, not necessarily consecutive. A stable sort
    plus a cumulative sum of "value changed" flags: static shapes, unlike torch.unique."""
    order = torch.sort(index, stable=True)
    sorted_ids = order.values
    new_group = torch.ones_like(sorted_ids, dtype=torch.int64)
    new_group[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    ranks = new_group.cumsum(0) - 1
    return torch.empty_like(ranks).scatter_(0, order.indices, ranks)


def group_sum(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """`[B]` per-group sums of x `[B]`, gathered back to each sample."""
    sums = torch.zeros_like(x).index_add_(0, group, x)
    return sums[group]


def group_count(group: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """`[B]` the size of each sample's group."""
    return group_sum(torch.ones(group.shape, dtype=dtype, device=group.device), group)


def _mean_std(scores, group):
    """Per-sample (group size, group mean, unbiased group std); two-pass variance (the deviations
    are summed after the mean is known) for accuracy. Groups of one: std is NaN (0 / 0)."""
    n = group_count(group)
    mean = group_sum(scores, group) / n
    dev = scores - mean
    var = group_sum(dev * dev, group) / (n - 1)
    return n, mean, var.sqrt()


def _outcome(scores, mask):
    """The per-sample advantage broadcast over the response tokens (verl's `adv.unsqueeze(-1) *
    response_mask`), used as both advantages and returns, as verl returns them."""
    adv = scores.unsqueeze(-1) * mask
    return adv, adv


def grpo(rewards, mask, group, *, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    # verl: a group of one has mean 0 and std 1
    return _outcome(_grpo_scalars(rewards.sum(-1), group, epsilon, norm_adv_by_std_in_grpo), mask)


def rloo(rewards, mask, group):
    scores = rewards.sum(-1)
    n = group_count(group)
    mean = group_sum(scores, group) / n
    # n / (n - 1) (s - mean) = s - (mean of the others); a group of one keeps its score (verl)
    adv = torch.where(n > 1, (scores - mean) * (n / (n - 1).clamp(min=1)), scores)
    return _outcome(adv, mask)


def reinforce_plus_plus_baseline(rewards, mask, group, *, epsilon=1e-6):
    del epsilon  # accepted, unused, as in verl (its whitening has its own 1e-8)
    scores = rewards.sum(-1)
    n = group_count(group)
    mean = torch.where(n > 1, group_sum(scores, group) / n, torch.zeros_like(scores))
    adv = (scores - mean).unsqueeze(-1) * mask
    adv = masked_whiten(adv, mask) * mask
    return adv, adv


def discounted_returns(rewards, mask, gamma):
    """verl's REINFORCE++ return, R_t = r_t + gamma * m_{t+1} * R_{t+1} (R_T = 0): the discounted
    sum that restarts after every masked step. A doubling (Hillis-Steele) scan of the affine maps
    R_t = a_t R_{t+1} + b_t, a_t = gamma m_{t+1}: ceil(log2 T) vector steps instead of T, and no
    power gamma^-t that could overflow (only products of coefficients <= 1)."""
    a = torch.zeros_like(rewards)
    a[:, :-1] = gamma * mask[:, 1:]
    b = rewards.clone()
    steps = rewards.shape[1]
    d = 1
    while d < steps:
        # (a_t, b_t) now spans R_t = a_t R_{t+d} + b_t; compose with the map at t + d
        b = torch.cat([b[:, :-d] + a[:, :-d] * b[:, d:], b[:, -d:]], dim=1)
        a = torch.cat([a[:, :-d] * a[:, d:], torch.zeros_like(a[:, -d:])], dim=1)
        d *= 2
    return b


def reinforce_plus_plus(rewards, mask, group, *, gamma=1.0):
    del group
    returns = discounted_returns(rewards, mask.to(rewards.dtype), float(gamma))
    return masked_whiten(returns, mask) * mask, returns


def remax(rewards, mask, group, *, reward_baselines):
    del group
    returns = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    return returns - reward_baselines.float().unsqueeze(-1) * mask, returns


def opo(rewards, mask, group, *, epsilon=1e-6):
    del epsilon  # accepted, unused, as in verl
    scores = rewards.sum(-1)
    lengths = mask.sum(-1).to(scores.dtype)
    n = group_count(group)
    total = group_sum(lengths, group)
    baseline = group_sum(lengths * scores, group) / total.clamp(min=1)
    # verl: a group of one has baseline 0; a group of empty responses gives 0 / 0 there (NaN)
    baseline = torch.where((n > 1) & (total > 0), baseline, torch.zeros_like(baseline))
    return _outcome(scores - baseline, mask)


def grpo_passk(rewards, mask, group, *, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    scores = rewards.sum(-1)
    batch = scores.shape[0]
    neg_inf = torch.full_like(scores, float("-inf"))
    best = neg_inf.scatter_reduce(0, group, scores, "amax")[group]
    # the first sample (lowest position) of each group that reaches the max gets the advantage
    pos = torch.arange(batch, device=scores.device)
    cand = torch.where(scores == best, pos, torch.full_like(pos, batch))
    first = torch.full_like(pos, batch).scatter_reduce(0, group, cand, "amin")[group]
    winner = pos == first
    second = neg_inf.scatter_reduce(0, group, torch.where(winner, neg_inf, scores), "amax")[group]
    adv = best - second
    if norm_adv_by_std_in_grpo:
        adv = adv / (_mean_std(scores, group)[2] + epsilon)
    return _outcome(torch.where(winner, adv, torch.zeros_like(adv)), mask)


# ---- verl's further estimators (torch backend only) ----------------------------------------------


def _grpo_scalars(scores, group, epsilon, norm):
    """grpo's per-sample advantage (mean 0 and std 1 for a group of one, as verl)."""
    n, mean, std = _mean_std(scores, group)
    single = n < 2
    adv = scores - torch.where(single, torch.zeros_like(mean), mean)
    if norm:
        adv = adv / (torch.where(single, torch.ones_like(std), std) + epsilon)
    return adv


def gpg(rewards, mask, group, *, epsilon=1e-6, f_norm=1.0, alpha=1.0):
    del epsilon, alpha  # accepted, unused, as in verl (alpha is recomputed from the batch there)
    scores = rewards.sum(-1)
    n = group_count(group)
    mean = torch.where(n > 1, group_sum(scores, group) / n, torch.zeros_like(scores))
    # alpha = B / (number of nonzero scores): the batch share of responses with a signal
    alpha_b = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1)
    return _outcome(alpha_b * (scores - mean) / f_norm, mask)


def gdpo(rewards, mask, group, *, reward_components=None, reward_weights=None, epsilon=1e-6,
         norm_adv_by_std_in_grpo=True):
    comps = [rewards] if reward_components is None else list(reward_components)
    weights = [1.0] * len(comps) if reward_weights is None else list(reward_weights)
    total = torch.zeros(rewards.shape[0], dtype=torch.float32, device=rewards.device)
    for w, comp in zip(weights, comps):
        scores = comp.float().sum(-1) if comp.dim() == 2 else comp.float()
        total = total + w * _grpo_scalars(scores, group, epsilon, norm_adv_by_std_in_grpo)
    adv = total.unsqueeze(-1) * mask
    adv = masked_whiten(adv, mask) * mask
    return adv, adv


def optimal_token_baseline(rewards, mask, group, *, old_log_probs, sum_pi_squared, rollout_is_weights=None,
                           handle_zero_tail=True, epsilon=1e-8):
    m = mask.to(rewards.dtype)
    returns = (rewards * m).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * old_log_probs.float().exp() + sum_pi_squared.float()  # ||s_t||^2 proxy
    if rollout_is_weights is not None:
        w = w * rollout_is_weights.float() ** 2
    big_w = (w * m).cumsum(-1)  # W_t = sum_{j <= t} w_j (masked)
    n = group_count(group)
    num = group_sum(returns * big_w * m, group)  # [B, T]: sums over the group, per time step
    den = group_sum(big_w * m, group) + epsilon
    baseline = torch.where((n > 1).unsqueeze(-1), num / den, torch.zeros_like(num))
    if handle_zero_tail:
        # the unique longest response of a group gets no baseline past the second-longest length
        lengths = mask.sum(-1)
        neg = torch.full_like(lengths, -1)
        longest = neg.scatter_reduce(0, group, lengths, "amax")[group]
        at_max = (lengths == longest).long()
        n_max = torch.zeros_like(lengths).index_add_(0, group, at_max)[group]
        second = neg.scatter_reduce(0, group, torch.where(lengths == longest, neg, lengths), "amax")[group]
        zero_row = (lengths == longest) & (n_max == 1) & (n > 1) & (longest > second)
        steps = torch.arange(mask.shape[1], device=mask.device)
        baseline = torch.where(zero_row.unsqueeze(-1) & (steps >= second.unsqueeze(-1)), 0.0, baseline)
    return (returns - baseline) * m, returns
