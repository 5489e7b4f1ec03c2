"""Rollout throughput for the end-to-end benchmark: generated tokens per second of
fastalign.sampling.FastSampler and of transformers `generate` on the same model and prompts,
sampling at temperature 1 (no top-k / top-p), `new_tokens` per sequence. `generate` is held to
exactly `new_tokens` (min_new_tokens); the sampler stops at EOS, so its count is what it really
generated (its truncated count tells how many ran to the limit). spec["precision"]: fp32 (the
trainer's default CPU precision) or bf16 -- the model cast to bf16 and both engines run on that
same bf16 model (FastSampler's dtype "auto" is then bf16; generate gets its fastest bf16 path, no
autocast re-casts). One untimed call each first (a short one: allocator and caches warm)."""

from __future__ import annotations

import time

import torch

from fastalign.benchmarks import _e2e_data


def _prompts(tokenizer, batch: int, prompt_len: int) -> list[list[int]]:
    recs = _e2e_data.build("grpo", tokenizer, n_records=batch, seq_len=prompt_len, prompt_len=prompt_len, seed=1)
    return [_e2e_data._prompt_ids(tokenizer, r["prompt"][0]["content"]) for r in recs["records"]]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _generate_fn(model, tokenizer, device):
    def run(prompts, new_tokens, seed):
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left padding
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id)
        return (out.shape[1] - width) * out.shape[0]
    return run


def _sampler_fn(model, tokenizer, max_batch):
    from fastalign.sampling import FastSampler  # on branch `sampler` until merged: ImportError -> not available

    sampler = FastSampler(model, tokenizer, max_batch=max_batch)

    def run(prompts, new_tokens, seed):
        out = sampler.sample(prompts, max_new_tokens=new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                             do_sample=True, seed=seed)
        return sum(len(t) for t in out.token_ids)
    return run


def measure(spec: dict) -> dict:
    """{contender: {"tokens_per_s", "seconds", "tokens"} or {"note"}} for spec["batch"] prompts."""
    from fastalign.models import load_model, load_tokenizer

    device = spec["device"]
    tok = load_tokenizer(spec["model"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.get("precision", "fp32")]
    model = load_model(spec["model"], tokenizer=tok).to(device=device, dtype=dtype).eval()
    prompts = _prompts(tok, spec["batch"], spec["prompt_len"])
    fns = {"transformers.generate": lambda: _generate_fn(model, tok, device)}
    fns["fastalign.FastSampler"] = lambda: _sampler_fn(model, tok, max(64, spec["batch"]))
    out = {}
    for name, make in fns.items():
        try:
            fn = make()
        except ImportError as e:
            out[name] = {"note": f"not available: {e}"}
            continue
        with torch.no_grad():
            fn(prompts, min(8, spec["new_tokens"]), 0)  # warm-up
            runs = []
            for r in range(spec["steps"]):
                _sync(device)
                t0 = time.perf_counter()
                n = fn(prompts, spec["new_tokens"], 1 + r)
                _sync(device)
                runs.append((time.perf_counter() - t0, n))
        runs.sort(key=lambda x: x[1] / x[0])
        sec, n = runs[len(runs) // 2]
        out[name] = {"tokens_per_s": n / sec, "seconds": sec, "tokens": n,
                     "all_tokens_per_s": [k / s for s, k in runs]}
    return out
