"""Steps that recipes share (the non-training stages): preference pairs labelled by an oracle from
a policy's samples, and the oracle's judgement of trained policies. Each takes the run's
`Context` (fastalign.recipes.runner) for the tokenizer, device, output directory and log."""

from __future__ import annotations

import json
import os
import random

import torch

from fastalign.data import collate as C
from fastalign.trainer.generation import generate, response_logps


def label_preferences(ctx, policy, prompts: list, oracle, samples_per_prompt: int, max_new_tokens: int,
                      seed: int, shuffle_seed: int, policy_name: str = "SFT") -> dict:
    """The policy samples K responses per prompt (temperature 1, sampling seed `seed`); the
    oracle, playing the labeller, compares every pair it can tell apart. A tenth of the pairs,
    shuffled with `shuffle_seed`, is held out. Writes <output_dir>/preferences.jsonl; returns
    {"pairs", "train_pairs", "eval_pairs", "ties"}."""
    k = samples_per_prompt
    samples, _, trunc = generate(policy, ctx.tokenizer, [p for p in prompts for _ in range(k)], temperature=1.0,
                                 max_new_tokens=max_new_tokens, seed=seed, device=ctx.device)
    pairs, ties = [], 0
    for i, p in enumerate(prompts):
        got, t_ = oracle.all_pairs(p, samples[i * k: (i + 1) * k])
        pairs += got
        ties += t_
    random.Random(shuffle_seed).shuffle(pairs)
    n_eval_pairs = max(len(pairs) // 10, 1)
    with open(os.path.join(ctx.output_dir, "preferences.jsonl"), "w") as f:
        for r in pairs:
            f.write(json.dumps(r) + "\n")
    ctx.announce(f"preferences: {k} {policy_name} samples for each of {len(prompts)} prompts, oracle "
                 f"(noise {oracle.noise}, length bias {oracle.length_bias}) compared them: {len(pairs)} pairs, "
                 f"{ties} ties left out (equally good), {trunc} samples without EOS cut at {max_new_tokens} tokens "
                 f"({ctx.elapsed():.0f}s)")
    return {"pairs": pairs, "eval_pairs": pairs[:n_eval_pairs], "train_pairs": pairs[n_eval_pairs:], "ties": ties}


def judge(ctx, policies: dict, reference, reward_model, prompts: list, oracle, max_new_tokens: int,
          seed: int) -> tuple[dict, dict]:
    """Each policy (name -> model; the first is the baseline) answers the held-out prompts,
    sampling at temperature 1 (seed `seed`) and greedily. Returns (results, outputs): per policy
    the oracle score (sampled, greedy), KL to `reference` (mean log pi - log pi_ref of the
    samples, nats per response), entropy (nats per token), mean length (tokens), the reward
    model's mean score (NaN without one), the count cut without EOS and the win rate against the
    baseline by oracle score (ties 1/2); outputs[name] = (sampled responses, their oracle scores)."""
    device, tok = ctx.device, ctx.tokenizer
    results, outputs = {}, {}
    for name, model in policies.items():
        texts, ids, trunc = generate(model, tok, prompts, temperature=1.0, max_new_tokens=max_new_tokens,
                                     seed=seed, device=device)
        greedy, _, _ = generate(model, tok, prompts, do_sample=False, max_new_tokens=max_new_tokens, device=device)
        lp, ent = response_logps(model, tok, prompts, ids, device=device, return_entropy=True)
        lp_ref = response_logps(reference, tok, prompts, ids, device=device)
        rm_score = float("nan")
        if reward_model is not None:
            with torch.no_grad():
                rm_score = float(reward_model_scores(reward_model, tok, prompts, texts, device).mean())
        scores = [oracle.score(p, r) for p, r in zip(prompts, texts)]
        greedy_scores = [oracle.score(p, r) for p, r in zip(prompts, greedy)]
        outputs[name] = (texts, scores, greedy_scores)
        results[name] = {
            "oracle score": sum(scores) / len(scores),
            "oracle SE": mean_and_se(scores)[1],
            "oracle score (greedy)": sum(greedy_scores) / len(greedy_scores),
            "KL to ref": float((lp - lp_ref).mean()),
            "entropy": float(ent.mean()),
            "mean length": sum(len(x) for x in ids) / len(ids),
            "reward model": rm_score,
            "no EOS": trunc,
        }
    baseline = next(iter(policies))
    base_scores = outputs[baseline][1]
    for name in results:
        sc = outputs[name][1]
        results[name][f"win rate vs {baseline}"] = sum(1.0 if a > b else 0.5 if a == b else 0.0
                                                       for a, b in zip(sc, base_scores)) / len(sc)
    return results, outputs


def mean_and_se(values) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); NaN for n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, (var / n) ** 0.5


def paired_gains(outputs: dict) -> list[dict]:
    """Each policy of `judge`'s outputs against the one before it (in order): the mean per-prompt
    difference of oracle scores, sampled and greedy, with the standard error of that paired
    difference (same prompts and sampling seed, so prompt difficulty cancels out). A gain is
    beyond noise when it is several standard errors from 0."""
    names = list(outputs)
    out = []
    for prev, name in zip(names, names[1:]):
        row = {"model": name, "vs": prev}
        for key, i in (("", 1), ("greedy_", 2)):
            d = [a - b for a, b in zip(outputs[name][i], outputs[prev][i], strict=True)]
            row[key + "gain"], row[key + "se"] = mean_and_se(d)
        out.append(row)
    return out


def reward_model_scores(rm, tok, prompts, responses, device):
    """The scalar reward model's score of each (prompt, response), in batches of 128."""
    out = []
    for i in range(0, len(prompts), 128):
        exs = []
        for p, r in zip(prompts[i: i + 128], responses[i: i + 128]):
            ids = tok(C.prompt_text(tok, p) + C.completion_text(tok, p, r), add_special_tokens=False)["input_ids"]
            exs.append({"input_ids": ids, "labels": ids})
        b = C.collate_lm(exs, tok.pad_token_id)
        out.append(rm.score(b["input_ids"].to(device), b["attention_mask"].to(device)).cpu())
    return torch.cat(out)


def format_table(results: dict, baseline: str = "SFT") -> str:
    """`judge`'s results as a table; the oracle score with its standard error; the reward-model
    column only when some policy has a reward-model score."""
    cols = ["oracle score", "oracle score (greedy)", f"win rate vs {baseline}", "KL to ref", "entropy",
            "mean length", "reward model"]
    if all(r["reward model"] != r["reward model"] for r in results.values()):  # all NaN: no reward model
        cols.remove("reward model")
    head = f"{'model':6s} " + " ".join(f"{c:>22s}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        cells = [f"{r[c]:.3f} ± {r['oracle SE']:.3f}" if c == "oracle score" else f"{r[c]:.3f}" for c in cols]
        lines.append(f"{name:6s} " + " ".join(f"{c:>22s}" for c in cells))
    return "\n".join(lines)
