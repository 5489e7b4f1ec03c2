"""Rollout throughput: FastSampler against transformers' generate on the same model, prompts and
sampling settings, in one process (ratios from the same run).

    python -m fastalign.benchmarks.bench_sampler --model smollm2-135m-instruct --batch 16 64 --new-tokens 128
    python -m fastalign.benchmarks.bench_sampler --dtype bf16 ...     # both engines on the model cast to bf16

Each engine samples `batch` responses (temperature 1, no top-k/top-p) to the same chat prompts,
after one warm-up call; tokens/s counts the response tokens actually produced (up to and with
the EOS) over the wall time, prefill included. `--fixed-length` makes an unlikely token the only
EOS, so every row runs the full `--new-tokens` (the decode-bound case); without it rows stop at
the model's EOS, which generate keeps computing and FastSampler drops.

`--dtype bf16` casts the model to bf16 and runs both engines on it (FastSampler's dtype "auto" is
then bf16): the fair bf16 comparison. `--sampler-dtype bf16` instead keeps the fp32 model and
samples it under bf16 autocast in FastSampler only (what trainer.sampler_dtype: bf16 does), so
the ratio then also counts the dtype, not only the engine.
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain why the sky is blue.",
           "Give three tips for learning a new language.", "What is the capital of France?",
           "Describe a sunset over the ocean.", "Write a haiku about autumn leaves.",
           "How do vaccines work?", "List some uses of a paperclip."]


def _prompts(tokenizer, n):
    from fastalign.data import collate as C

    return [tokenizer(C.prompt_text(tokenizer, PROMPTS[i % len(PROMPTS)] + f" (#{i})"),
                      add_special_tokens=False)["input_ids"] for i in range(n)]


def run(model_name="smollm2-135m-instruct", batches=(16, 64), new_tokens=128, fixed_length=False, seed=0,
        compile=False, engines=("transformers", "fastalign"), dtype="fp32", sampler_dtype="auto"):
    from fastalign.models import load_model, load_tokenizer
    from fastalign.sampling import FastSampler, TransformersEngine

    tok = load_tokenizer(model_name)
    model = load_model(model_name, tokenizer=tok).eval().to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    eos = [model.config.vocab_size - 1] if fixed_length else None
    make = {"transformers": lambda b: TransformersEngine(model, tok, max_batch=b, eos_token_id=eos),
            "fastalign": lambda b: FastSampler(model, tok, max_batch=b, eos_token_id=eos, compile=compile,
                                                          dtype=sampler_dtype)}
    rows = []
    for b in batches:
        prompts = _prompts(tok, b)
        got = {}
        for name in engines:
            engine = make[name](b)
            engine.sample(prompts[:2], max_new_tokens=4, seed=seed)  # warm-up
            t0 = time.perf_counter()
            out = engine.sample(prompts, max_new_tokens=new_tokens, seed=seed)
            dt = time.perf_counter() - t0
            n = sum(map(len, out.token_ids))
            got[name] = n / dt
            print(f"{dtype} batch {b:3d} {name:12s} {n:6d} tokens {dt:7.2f} s {n / dt:8.1f} tokens/s "
                  f"(truncated {out.truncated}/{b})", flush=True)
        if len(got) == 2:
            print(f"{dtype} batch {b:3d} ratio fastalign / generate: {got['fastalign'] / got['transformers']:.2f}x", flush=True)
        rows.append((b, got))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--fixed-length", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile FastSampler's decode step")
    p.add_argument("--engines", nargs="+", default=["transformers", "fastalign"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's dtype, for both engines")
    p.add_argument("--sampler-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="FastSampler's sampling dtype (auto: the model's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.model, a.batch, a.new_tokens, a.fixed_length, compile=a.compile, engines=a.engines, dtype=a.dtype,
        sampler_dtype=a.sampler_dtype)


if __name__ == "__main__":
    main()
