"""Padding-free packing (data.packing) on SmolLM2-135M: tokens/s and peak RSS of an SFT and a DPO
optimizer step (loss forward + backward + AdamW), padded vs packed, on a batch of mixed lengths.

    python benchmarks/packing_step.py                  # sft and dpo, one child process each
    python benchmarks/packing_step.py --child sft      # one algorithm (what the parent runs)

Padded and packed steps alternate in the same process (one untimed step of each first), so a
noisy shared machine slows both alike; the median per mode is reported. Memory per step: the
kernel's peak-RSS counter is reset (/proc/self/clear_refs) before each step and read after it;
"extra peak" = that peak - the RSS before the step (what the step allocates: activations, logits,
gradients; the weights and AdamW state are already there). glibc is told to return freed memory
at once (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), so RSS follows the live tensors.
Tokens/s counts real (non-padding) tokens of the policy forward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# SFT: 8 examples; DPO: 4 pairs. Lengths in tokens, mixed as real data is (a few long ones pad the rest).
SFT_LENGTHS = [(16, 48), (24, 96), (32, 160), (16, 40), (48, 360), (16, 24), (32, 120), (24, 80)]  # (prompt, completion)
DPO_LENGTHS = [(40, 60, 180), (24, 30, 48), (64, 220, 90), (32, 20, 36)]  # (prompt, chosen, rejected)


def _ids(gen, n, vocab):
    import torch

    return torch.randint(100, vocab, (n,), generator=gen).tolist()


def _batch(algo, vocab, pad_id):
    import torch

    from fastalign.data import collate as C

    gen = torch.Generator().manual_seed(0)
    if algo == "sft":
        exs = []
        for p, c in SFT_LENGTHS:
            pid, cid = _ids(gen, p, vocab), _ids(gen, c, vocab)
            exs.append({"input_ids": pid + cid, "labels": [C.IGNORE] * p + cid})
        return C.collate_lm(exs, pad_id)
    exs = [{"prompt_ids": _ids(gen, p, vocab), "chosen_ids": _ids(gen, c, vocab), "rejected_ids": _ids(gen, r, vocab)}
           for p, c, r in DPO_LENGTHS]
    return C.collate_pairs(exs, pad_id)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(algo: str, rounds: int, model_name: str) -> list:
    import torch

    from fastalign.algorithms import get_algorithm
    from fastalign.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(model_name)
    policy = load_model(model_name, tokenizer=tok).train()
    models = {"policy": policy}
    if algo == "dpo":
        models["reference"] = load_model(model_name, tokenizer=tok).eval().requires_grad_(False)
    alg = get_algorithm(algo)()
    batch = _batch(algo, policy.config.vocab_size, tok.pad_token_id)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    def step(packed):
        alg.packing = packed
        opt.zero_grad(set_to_none=True)
        loss, _ = alg.loss(models, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    losses = {}
    with torch.no_grad():  # the same weights: the two modes' losses side by side
        for packed in (False, True):
            alg.packing = packed
            losses[packed] = float(alg.loss(models, batch)[0])
    step(False), step(True)  # untimed: AdamW state, first-call costs
    times, peaks, extras = {False: [], True: []}, {False: [], True: []}, {False: [], True: []}
    for _ in range(rounds):
        for packed in (False, True):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            before = _status_mb("VmRSS")
            t0 = time.perf_counter()
            step(packed)
            times[packed].append(time.perf_counter() - t0)
            peaks[packed].append(_status_mb("VmHWM"))
            extras[packed].append(peaks[packed][-1] - before)
    real = int(batch["attention_mask"].sum())
    out = []
    for packed in (False, True):
        med = statistics.median(times[packed])
        out.append({"algo": algo, "packed": packed, "rows": int(batch["input_ids"].shape[0]),
                    "padded_tokens": int(batch["input_ids"].numel()), "real_tokens": real, "s_per_step": med,
                    "all_s": times[packed], "tokens_per_s": real / med, "peak_rss_mb": max(peaks[packed]),
                    "extra_peak_mb": max(extras[packed]), "loss_before_training": losses[packed]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", metavar="ALGO")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--algos", default="sft,dpo")
    args = ap.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.rounds, args.model)))
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    results = []
    for algo in args.algos.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", algo, "--rounds", str(args.rounds),
                              "--threads", str(args.threads), "--model", args.model],
                             env=env, check=True, capture_output=True, text=True).stdout
        for r in json.loads(out.strip().splitlines()[-1]):
            results.append(r)
            print(f"{algo:4s} {'packed' if r['packed'] else 'padded':7s} rows {r['rows']:2d}  real/padded tokens "
                  f"{r['real_tokens']}/{r['padded_tokens']}  {r['s_per_step']:.2f} s/step  "
                  f"{r['tokens_per_s']:.0f} tokens/s  peak RSS {r['peak_rss_mb']:.0f} MB  "
                  f"extra peak {r['extra_peak_mb']:.0f} MB  loss {r['loss_before_training']:.6f}", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
