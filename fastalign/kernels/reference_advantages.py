"""Eager references of the advantage estimators (fastalign.advantages): one group at a time.

Plain per-group formulas (a loop over the distinct index values, each group's statistics taken
with ordinary torch reductions over its members), the ground truth that the vectorised
implementations in fastalign/ops/advantage_estimators.py are tested against. Inputs as there:
fp32 rewards [B, T], bool mask [B, T], index [B] (any integer ids). fp32 outputs.
"""

from __future__ import annotations

import torch


def _groups(index):
    """(member positions) for each distinct index value."""
    return [(index == g).nonzero().flatten() for g in torch.unique(index)]


def _outcome(adv, mask):
    out = adv.unsqueeze(-1) * mask
    return out, out


def _whiten(x, mask):
    """verl_F.masked_whiten: (x - mean) * rsqrt(var + 1e-8), unbiased variance over the mask."""
    vals = x[mask]
    mean = vals.mean()
    var = ((vals - mean) ** 2).sum() / (vals.numel() - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def grpo(rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    scores = rewards.sum(-1)
    adv = torch.empty_like(scores)
    for members in _groups(index):
        s = scores[members]
        if len(members) == 1:
            adv[members] = s / (1.0 + epsilon) if norm_adv_by_std_in_grpo else s
        elif norm_adv_by_std_in_grpo:
            adv[members] = (s - s.mean()) / (s.std() + epsilon)
        else:
            adv[members] = s - s.mean()
    return _outcome(adv, mask)


def rloo(rewards, mask, index):
    scores = rewards.sum(-1)
    adv = scores.clone()
    for members in _groups(index):
        s = scores[members]
        if len(members) > 1:
            adv[members] = s - (s.sum() - s) / (len(members) - 1)  # minus the mean of the others
    return _outcome(adv, mask)


def reinforce_plus_plus_baseline(rewards, mask, index):
    scores = rewards.sum(-1)
    adv = scores.clone()
    for members in _groups(index):
        if len(members) > 1:
            adv[members] = scores[members] - scores[members].mean()
    tiled = adv.unsqueeze(-1) * mask
    out = _whiten(tiled, mask) * mask
    return out, out


def reinforce_plus_plus(rewards, mask, gamma=1.0):
    returns = torch.zeros_like(rewards)
    following = torch.zeros_like(rewards[:, 0])  # R_{t+1}, 0 past the end or after a masked step
    for t in reversed(range(rewards.shape[1])):
        returns[:, t] = rewards[:, t] + gamma * following
        following = torch.where(mask[:, t], returns[:, t], torch.zeros_like(following))
    return _whiten(returns, mask) * mask, returns


def remax(rewards, mask, reward_baselines):
    masked = torch.where(mask, rewards, torch.zeros_like(rewards))
    returns = torch.stack([masked[:, t:].sum(-1) for t in range(rewards.shape[1])], dim=1)
    return returns - reward_baselines.unsqueeze(-1) * mask, returns


def opo(rewards, mask, index):
    scores = rewards.sum(-1)
    lengths = mask.sum(-1).float()
    adv = scores.clone()
    for members in _groups(index):
        total = lengths[members].sum()
        if len(members) > 1 and total > 0:
            adv[members] = scores[members] - (lengths[members] * scores[members]).sum() / total
    return _outcome(adv, mask)


def grpo_passk(rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    scores = rewards.sum(-1)
    adv = torch.zeros_like(scores)
    for members in _groups(index):
        s = scores[members]
        ranked = torch.sort(s, descending=True, stable=True)  # stable: the first maximum wins ties
        gap = ranked.values[0] - ranked.values[1]
        if norm_adv_by_std_in_grpo:
            gap = gap / (s.std() + epsilon)
        adv[members[ranked.indices[0]]] = gap
    return _outcome(adv, mask)


def gpg(rewards, mask, index, f_norm=1.0):
    scores = rewards.sum(-1)
    alpha = scores.shape[0] / max(int((scores != 0).sum()), 1)
    adv = scores.clone()
    for members in _groups(index):
        base = scores[members].mean() if len(members) > 1 else 0.0
        adv[members] = alpha * (scores[members] - base) / f_norm
    return _outcome(adv, mask)


def gdpo(rewards, mask, index, reward_components=None, reward_weights=None, epsilon=1e-6,
         norm_adv_by_std_in_grpo=True):
    comps = [rewards] if reward_components is None else reward_components
    weights = [1.0] * len(comps) if reward_weights is None else reward_weights
    total = torch.zeros(rewards.shape[0])
    for w, comp in zip(weights, comps):
        scores = comp.sum(-1) if comp.dim() == 2 else comp
        rows = torch.ones(scores.shape[0], 1, dtype=torch.bool)  # grpo of the component's scores, per row
        total = total + w * grpo(scores.unsqueeze(-1), rows, index, epsilon, norm_adv_by_std_in_grpo)[0][:, 0]
    tiled = total.unsqueeze(-1) * mask
    out = _whiten(tiled, mask) * mask
    return out, out


def optimal_token_baseline(rewards, mask, index, old_log_probs, sum_pi_squared, rollout_is_weights=None,
                           handle_zero_tail=True, epsilon=1e-8):
    m = mask.to(rewards.dtype)
    returns = remax(rewards, mask, torch.zeros(rewards.shape[0], dtype=rewards.dtype))[1]
    w = 1 - 2 * old_log_probs.exp() + sum_pi_squared
    if rollout_is_weights is not None:
        w = w * rollout_is_weights**2
    big_w = torch.stack([(w * m)[:, : t + 1].sum(-1) for t in range(rewards.shape[1])], dim=1)
    baseline = torch.zeros_like(returns)
    lengths = mask.sum(-1)
    for members in _groups(index):
        if len(members) < 2:
            continue
        num = (returns[members] * big_w[members] * m[members]).sum(0)
        den = (big_w[members] * m[members]).sum(0) + epsilon
        baseline[members] = num / den
        if handle_zero_tail:
            ranked = torch.sort(lengths[members]).values
            longest = (lengths[members] == ranked[-1]).nonzero().flatten()
            if len(longest) == 1 and ranked[-1] > ranked[-2]:
                baseline[members[longest[0]], int(ranked[-2]):] = 0.0
    return (returns - baseline) * m, returns
