"""Optional peers (TRL, Liger-Kernel), imported lazily; every getter raises Skip with the reason
when the peer is missing. Peer code is only *called*, never copied: the reference loops that
TRL and verl write inline (GAE, verl's advantage estimators) are written out below from their
formulas (tests/test_gae.py and tests/test_advantages.py check fastalign against them)."""

from __future__ import annotations

import importlib
from collections import defaultdict
import importlib.util
import os

import torch

from fastalign.benchmarks._common import Skip


def trl_logprob_functions():
    """(selective_log_softmax(logits, index), selective_log_softmax_and_entropy(logits, index))
    as TRL's trainers call them. On CUDA TRL routes both to its fused Triton kernel
    (trl/kernels/logprob_entropy.py); on the CPU to its row-looped torch code.

    Where `trl.trainer.utils` cannot be imported (e.g. a GPU machine without transformers), the
    kernel module is loaded from the installed TRL by file path: it needs only torch and Triton."""
    try:
        from trl.trainer import utils

        return (utils.selective_log_softmax,
                lambda x, i: utils.selective_log_softmax_and_entropy(x, i))
    except Exception as exc:  # ImportError, or TRL's own dependency checks
        first_error = f"{type(exc).__name__}: {exc}"
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise Skip("TRL not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "kernels", "logprob_entropy.py")
    if not os.path.exists(path):
        raise Skip(f"trl.trainer.utils failed to import ({first_error[:120]}) and {path} is absent")
    kspec = importlib.util.spec_from_file_location("_trl_logprob_entropy", path)
    mod = importlib.util.module_from_spec(kspec)
    try:
        kspec.loader.exec_module(mod)
    except Exception as exc:
        raise Skip(f"TRL's logprob kernel failed to load: {type(exc).__name__}: {exc}") from None
    fused = mod.selective_log_softmax_and_entropy
    return (lambda x, i: fused(x, i)[0]), (lambda x, i: fused(x, i))


def trl_chunked_logprob():
    """TRL's chunked hidden -> logprob function (ChunkedLogProbFunction.apply(hidden, weight,
    bias, targets, temperature, chunk_size)), used by its trainers to avoid the full logits."""
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except Exception as exc:
        raise Skip(f"TRL's ChunkedLogProbFunction not importable ({type(exc).__name__})") from None
    # outputs=(): log-probabilities only (no entropy/statistics), as for a plain logprob pass
    return lambda h, w, t: ChunkedLogProbFunction.apply(h, w, None, t, 1.0, chunk, None, 1.0, ())[0]


def liger_function(name: str, device: str):
    """liger_kernel.transformers.functional.<name> (e.g. liger_cross_entropy,
    liger_fused_linear_cross_entropy); Skip off CUDA or where Liger-Kernel is missing."""
    if not device.startswith("cuda"):
        raise Skip("Liger-Kernel runs on CUDA only")
    try:
        return getattr(importlib.import_module("liger_kernel.transformers.functional"), name)
    except Exception as exc:
        raise Skip(f"Liger-Kernel not installed ({type(exc).__name__})") from None


# ---- the peers' GAE loops, written from their code (not imported) ---------------------------------


def trl_gae_loop(rewards, values, gamma, lam):
    """TRL PPOTrainer's GAE: the reverse loop without a mask (values zero-filled past the end by
    the caller)."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


def verl_gae_loop(rewards, values, response_mask, gamma, lam):
    """verl core_algos.compute_gae_advantage_return (multi-turn variant), before its whitening:
    value and advantage carried through masked steps by multiplying with the mask."""
    nextvalues = 0
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


# ---- verl's advantage estimators (verl/trainer/ppo/core_algos.py), as written there ----------------
# The functions named in each docstring, re-derived with verl's Python loop over samples and its dict
# of groups (reinforce_plus_plus: its loop over time steps; remax is vectorised in verl); `index`
# any sequence of integer group ids (verl: an np.ndarray of uid strings). Each returns verl's
# (advantages, returns). One copy: tests/test_advantages.py checks fastalign.advantages against
# them, and the advantages benchmark times them as the verl contender.


def verl_whiten(values, mask):
    """verl/utils/torch_functional.py masked_whiten: masked mean, unbiased masked variance,
    (values - mean) * rsqrt(var + 1e-8)."""
    mean = (values * mask).sum() / mask.sum()
    centered = values - mean
    var = (centered**2 * mask).sum() / mask.sum() * (mask.sum() / (mask.sum() - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def verl_groups(scores, index, extra=None):
    id2score, id2extra = defaultdict(list), defaultdict(list)
    for i in range(scores.shape[0]):
        id2score[int(index[i])].append(scores[i])
        if extra is not None:
            id2extra[int(index[i])].append(extra[i])
    return id2score, id2extra


def verl_grpo(r, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """compute_grpo_outcome_advantage."""
    scores = r.sum(-1)
    id2score, _ = verl_groups(scores, index)
    id2mean, id2std = {}, {}
    for g, vals in id2score.items():
        if len(vals) == 1:
            id2mean[g], id2std[g] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            id2mean[g], id2std[g] = torch.mean(torch.stack(vals)), torch.std(torch.stack(vals))
    for i in range(scores.shape[0]):
        g = int(index[i])
        scores[i] = (scores[i] - id2mean[g]) / (id2std[g] + epsilon) if norm_adv_by_std_in_grpo \
            else scores[i] - id2mean[g]
    out = scores.unsqueeze(-1) * mask
    return out, out


def verl_rloo(r, mask, index):
    """compute_rloo_outcome_advantage."""
    scores = r.sum(-1)
    id2score, _ = verl_groups(scores, index)
    id2mean = {g: torch.mean(torch.stack(v)) if len(v) > 1 else torch.tensor(0.0) for g, v in id2score.items()}
    for i in range(scores.shape[0]):
        n = len(id2score[int(index[i])])
        if n > 1:
            scores[i] = scores[i] * n / (n - 1) - id2mean[int(index[i])] * n / (n - 1)
    out = scores.unsqueeze(-1) * mask
    return out, out


def verl_reinforce_plus_plus_baseline(r, mask, index):
    """compute_reinforce_plus_plus_baseline_outcome_advantage."""
    scores = r.sum(-1)
    id2score, _ = verl_groups(scores, index)
    id2mean = {g: torch.mean(torch.stack(v)) if len(v) > 1 else torch.tensor(0.0) for g, v in id2score.items()}
    for i in range(scores.shape[0]):
        scores[i] = scores[i] - id2mean[int(index[i])]
    m = mask.float()
    scores = scores.unsqueeze(-1).tile([1, r.shape[1]]) * m
    out = verl_whiten(scores, m) * m
    return out, out


def verl_opo(r, mask, index):
    """compute_opo_outcome_advantage."""
    lengths, scores = mask.float().sum(-1), r.sum(-1)
    id2score, id2len = verl_groups(scores, index, lengths)
    bsl = {g: (torch.stack(id2len[g]) * torch.stack(v)).sum() / torch.stack(id2len[g]).sum()
           if len(v) > 1 else torch.tensor(0.0) for g, v in id2score.items()}
    for i in range(scores.shape[0]):
        scores[i] = scores[i] - bsl[int(index[i])]
    out = scores.unsqueeze(-1) * mask
    return out, out


def verl_grpo_passk(r, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """compute_grpo_passk_outcome_advantage."""
    scores = r.sum(-1)
    adv = torch.zeros_like(scores)
    id2score, id2pos = verl_groups(scores, index, list(range(scores.shape[0])))
    for g, vals in id2score.items():
        rewards = torch.stack(vals)
        topk, topk_idx = torch.topk(rewards, 2)
        a = topk[0] - topk[1]
        if norm_adv_by_std_in_grpo:
            a = a / (torch.std(rewards) + epsilon)
        adv[id2pos[g][topk_idx[0].item()]] = a
    out = adv.unsqueeze(-1) * mask
    return out, out


def verl_reinforce_plus_plus(r, mask, gamma_):
    """compute_reinforce_plus_plus_outcome_advantage."""
    m = mask.float()
    returns = torch.zeros_like(r)
    running = 0
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma_ * running
        returns[:, t] = running
        running = running * m[:, t]
    return verl_whiten(returns, m) * m, returns


def verl_remax(r, mask, baselines):
    """compute_remax_outcome_advantage."""
    m = mask.float()
    returns = (r * m).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    return returns - baselines.unsqueeze(-1) * m, returns


VERL_OUTCOME = {"grpo": verl_grpo, "rloo": verl_rloo, "reinforce_plus_plus_baseline": verl_reinforce_plus_plus_baseline,
        "opo": verl_opo, "grpo_passk": verl_grpo_passk}
