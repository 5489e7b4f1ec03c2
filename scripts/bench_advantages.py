"""fastalign.advantages against verl-style Python loops over samples, same process.

    python scripts/bench_advantages.py [--batch 4096] [--steps 512] [--group 8] [--rounds 5]

The verl-style loops are written out here from verl/trainer/ppo/core_algos.py
(compute_grpo_outcome_advantage, compute_rloo_outcome_advantage,
compute_opo_outcome_advantage, compute_reinforce_plus_plus_outcome_advantage): a dict of lists
filled sample by sample, statistics per group, then a loop writing each sample. Prints the median
and the minimum time of each side and their ratios. Inputs: token-level rewards with a score on the last of a random
number of response tokens, groups of `--group` responses under shuffled, non-consecutive ids.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

import fastalign


def verl_grpo(r, mask, index, eps=1e-6):
    scores = r.sum(-1)
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for g, v in id2score.items():
        if len(v) == 1:
            id2mean[g], id2std[g] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            t = torch.stack(v)
            id2mean[g], id2std[g] = t.mean(), t.std()
    for i in range(scores.shape[0]):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
    return scores.unsqueeze(-1) * mask


def verl_rloo(r, mask, index):
    scores = r.sum(-1)
    id2score = defaultdict(list)
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    id2mean = {g: torch.stack(v).mean() for g, v in id2score.items()}
    for i in range(scores.shape[0]):
        n = len(id2score[index[i]])
        if n > 1:
            scores[i] = scores[i] * n / (n - 1) - id2mean[index[i]] * n / (n - 1)
    return scores.unsqueeze(-1) * mask


def verl_opo(r, mask, index):
    lengths, scores = mask.sum(-1), r.sum(-1)
    id2score, id2len = defaultdict(list), defaultdict(list)
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
        id2len[index[i]].append(lengths[i])
    bsl = {g: (torch.stack(id2len[g]) * torch.stack(v)).sum() / torch.stack(id2len[g]).sum()
           for g, v in id2score.items()}
    for i in range(scores.shape[0]):
        scores[i] = scores[i] - bsl[index[i]]
    return scores.unsqueeze(-1) * mask


def _time(fn, rounds):
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=512)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b, t = args.batch, args.steps
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t) < lengths.unsqueeze(-1)
    rewards = torch.zeros(b, t)
    rewards[torch.arange(b), lengths - 1] = torch.randn(b, generator=g)
    ids = (torch.randperm(b // args.group, generator=g) * 7 + 3).repeat_interleave(args.group)
    index = ids[torch.randperm(b, generator=g)]
    index_list = index.tolist()  # verl's index is a host array (np.ndarray of uids)
    print(f"B={b} T={t} group={args.group} threads={torch.get_num_threads()} torch={torch.__version__}")
    # the floor both sides share: reading the [B, T] rewards once and writing one [B, T] result
    floor, floor_min = _time(lambda: rewards.sum(-1).unsqueeze(-1) * mask, args.rounds)
    print(f"floor (rewards.sum + one [B,T] write): median {floor * 1e3:.2f} ms, min {floor_min * 1e3:.2f} ms")
    for kind, peer in (("grpo", verl_grpo), ("rloo", verl_rloo), ("opo", verl_opo)):
        ours, ours_min = _time(lambda: fastalign.advantages(kind, rewards, mask, index=index), args.rounds)
        theirs, theirs_min = _time(lambda: peer(rewards.clone(), mask, index_list), max(1, args.rounds // 2))
        print(f"{kind:<5} median: fastalign {ours * 1e3:8.2f} ms, verl-style loop {theirs * 1e3:8.1f} ms, "
              f"ratio {theirs / ours:6.1f}x | min: {ours_min * 1e3:8.2f} ms vs {theirs_min * 1e3:8.1f} ms, "
              f"ratio {theirs_min / ours_min:6.1f}x")


if __name__ == "__main__":
    main()
