"""Sampling from a causal LM for evaluation and rollouts (transformers `generate`, KV cache).

`generate` returns, per prompt, the response token ids (cut at the first EOS, which is kept) and
their text; `response_logps` scores given responses under a model with gather_logprobs (the
per-token log-probs PPO and the KL estimates need, at the sampling temperature).
"""

from __future__ import annotations

import torch

from fastalign.data import collate as C
from fastalign.ops.logprobs import gather_logprobs
from fastalign.ops.preference import sequence_logps
from fastalign.trainer import distributed as D


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens=32, temperature=1.0, do_sample=True, batch_size=128,
             device=None, seed=None):
    """prompts: strings or message lists. Returns (responses: list[str], response_ids:
    list[list[int]], truncated: int) -- truncated counts responses that never emitted EOS."""
    device = device or next(model.parameters()).device
    gen = None
    if seed is not None:
        gen = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        gen.__enter__()
        torch.manual_seed(seed)
    try:
        was_training = model.training
        model.eval()
        texts, all_ids, truncated = [], [], 0
        eos = tokenizer.eos_token_id
        sharded = D.is_sharded(model)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i: i + batch_size]
            ids = [tokenizer(C.prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in chunk]
            batch = C.collate_prompts([{"prompt_ids": x} for x in ids], tokenizer.pad_token_id)
            input_ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
            if sharded:  # every step is a collective: ranks whose responses all ended keep stepping
                kw["synced_gpus"] = True
            out = model.generate(input_ids=input_ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **kw)
            for row in out[:, input_ids.shape[1]:].tolist():
                if eos in row:
                    row = row[: row.index(eos) + 1]
                else:
                    truncated += 1
                    row = [t for t in row if t != tokenizer.pad_token_id]
                all_ids.append(row)
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
        if was_training:
            model.train()
        return texts, all_ids, truncated
    finally:
        if gen is not None:
            gen.__exit__(None, None, None)


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
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        got = gather_logprobs(logits[:, :-1], labels, temperature=temperature, return_entropy=return_entropy)
        lp = got[0] if return_entropy else got
        out.append(lp.sum(-1).float().cpu())  # masked positions are 0
        if return_entropy:
            ents.append(sequence_logps(got[1], labels != C.IGNORE, reduce="mean").cpu())
    lps = torch.cat(out) if out else torch.zeros(0)
    if return_entropy:
        return lps, torch.cat(ents) if ents else torch.zeros(0)
    return lps
