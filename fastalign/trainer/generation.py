"""Sampling from a causal LM for evaluation and rollouts, through a rollout engine
(fastalign/sampling: `trainer.sampler` = auto | fastalign | transformers).

`generate` returns, per prompt, the response token ids (cut at the first EOS, which is kept) and
their text (and, on request, the sampler's per-token log-probs and entropies);
`response_logps` scores given responses under a model with token_logps (from the hidden states
where the model allows, else gather_logprobs on the logits; at the sampling temperature).
"""

from __future__ import annotations

import torch

from fastalign.algorithms.base import token_logps
from fastalign.data import collate as C
from fastalign.ops.preference import sequence_logps
from fastalign.sampling import make_engine
from fastalign.trainer import distributed as D


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens=32, temperature=1.0, do_sample=True, batch_size=128,
             device=None, seed=None, sampler="auto", return_logprobs=False, sampler_dtype="auto"):
    """prompts: strings or message lists. Returns (responses: list[str], response_ids:
    list[list[int]], truncated: int) -- truncated counts responses that never emitted EOS; with
    return_logprobs, also (logprobs, entropies): lists of fp32 [len(response)] tensors of
    log_softmax(logits / temperature) of each sampled token and the entropy at each step, or
    (None, None) when the engine gives none (transformers' generate). sampler_dtype: FastSampler's
    dtype (auto | fp32 | bf16; fastalign/sampling/fast_sampler.py)."""
    ids = [tokenizer(C.prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    if not ids:
        return ([], [], 0, None, None) if return_logprobs else ([], [], 0)
    engine = make_engine(sampler, model, tokenizer, max_batch=batch_size, sharded=D.is_sharded(model),
                         dtype=sampler_dtype)
    out = engine.sample(ids, max_new_tokens=max_new_tokens, temperature=temperature, do_sample=do_sample, seed=seed)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out.token_ids]
    if return_logprobs:
        return texts, out.token_ids, out.truncated, out.logprobs, out.entropies
    return texts, out.token_ids, out.truncated


@torch.no_grad()
def response_logps(model, tokenizer, prompts, response_ids, *, temperature=1.0, batch_size=128, device=None,
                   return_entropy=False):
    """Summed log-prob of each response (token ids) given its prompt: [N] fp32 tensor (CPU); with
    return_entropy, also the mean per-token entropy of the policy over each response [N]."""
    device = device or next(model.parameters()).device
    out, ents = [], []
    for i in range(0, len(prompts), batch_size):
        exs = []
        for p, r in zip(prompts[i: i + batch_size], response_ids[i: i + batch_size]):
            pid = tokenizer(C.prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]
            exs.append({"input_ids": pid + list(r), "labels": [C.IGNORE] * len(pid) + list(r)})
        b = {k: v.to(device) for k, v in C.collate_lm(exs, tokenizer.pad_token_id).items()}
        got = token_logps(model, b, temperature=temperature, return_entropy=return_entropy)
        out.append(got[0].sum(-1).float().cpu())  # masked positions are 0
        if return_entropy:
            ents.append(sequence_logps(got[1], got[2], reduce="mean").cpu())
    lps = torch.cat(out) if out else torch.zeros(0)
    if return_entropy:
        return lps, torch.cat(ents) if ents else torch.zeros(0)
    return lps

