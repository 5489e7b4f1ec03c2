"""The end-to-end benchmark: `fastalign bench --e2e` (everything) or `--e2e-quick` (a smoke run:
short sequences, one measured step, fp32 only, no variants, a few minutes on an idle machine).

Per optimizer step of SFT, DPO and GRPO on SmolLM2-135M-Instruct (--model), batch 4 x 512
tokens: wall time (median of the measured steps after the warm-up ones), tokens per second and
peak memory (CPU: peak RSS of the contender's own process; CUDA: max_memory_allocated), for

  fastalign   `fastalign train ALGO` (its run_training, Trainer and algorithm; _e2e_fastalign.py)
  trl         TRL's SFTTrainer / DPOTrainer / GRPOTrainer, stock (_e2e_trl.py)
  trl+patch   the same after fastalign.integrations.trl.patch_trl()

in bf16 autocast (TRL's default where bf16 is supported) and fp32, each contender in its own
process, with the same model, data, batch and optimizer (AdamW lr 1e-6 betas (0.9, 0.999) eps
1e-8, no weight decay, constant lr, clipping at 1.0, no gradient checkpointing, no dropout).

A GRPO step, for every contender: one prompt, `batch` completions of exactly --new-tokens tokens
each (EOS masked until then) sampled with `generate` at temperature 1, scored by the same Python
reward function, then one update (no KL term, beta 0: no reference model). fastalign also
computes the old policy's log-probs in a no-grad forward before the update; TRL with
num_iterations=1 reuses the update's own (detached) log-probs instead, one forward fewer.

Variants of fastalign's trainer (VARIANTS: config overrides, each measured against the plain
trainer in the same precision); an override the installed fastalign does not know is reported
"not available". Rollout throughput: generated tokens per second at batch 16 and 64, 128 new
tokens, fastalign.sampling.FastSampler vs transformers `generate`, same prompts, in each precision
(ids 'rollout <precision> batch N'; bf16: both engines on the model cast to bf16).

Writes --out/e2e.json, e2e.md and e2e.png, prints the table and the issue's targets (PASS/FAIL).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ALGOS = ("sft", "dpo", "grpo")
CONTENDERS = ("fastalign", "trl", "trl+patch")
PRECISIONS = ("bf16", "fp32")
VARIANTS = {  # fastalign's trainer with and without each (the last two are other branches' options)
    "gradient checkpointing": ["trainer.gradient_checkpointing=true"],
    "LoRA (model.peft)": ["model.peft={r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj]}"],
    "packing (data.packing)": ["data.packing=true"],
    "bf16 weights": ["trainer.precision=bf16-weights"],
    "full logits (model.fused_head=false)": ["model.fused_head=false"],
}
FULL = dict(batch=4, seq_len=512, prompt_len=384, new_tokens=128, warmup=1, steps=2, rollout_batches=(16, 64),
            rollout_new_tokens=128, rollout_prompt_len=64, rollout_steps=2, precisions=PRECISIONS)
QUICK = dict(batch=4, seq_len=64, prompt_len=48, new_tokens=8, warmup=1, steps=1, rollout_batches=(4,),
             rollout_new_tokens=8, rollout_prompt_len=16, rollout_steps=1, precisions=("fp32",))


def plan(args, settings: dict, device: str) -> list[dict]:
    """The runs of this invocation, each {"id", "kind", "spec"}; --cases keeps runs whose id
    contains any of its comma-separated items."""
    base = dict(model=args.model, device=device, lr=1e-6, threads=args.threads, **{
        k: settings[k] for k in ("batch", "seq_len", "prompt_len", "new_tokens", "warmup", "steps")})
    runs = []
    for algo in ALGOS:
        for prec in settings["precisions"]:
            for cont in args.contenders:
                runs.append({"id": f"{algo} {prec} {cont}", "group": f"{algo} {prec}",
                             "spec": dict(base, kind="train", algo=algo, precision=prec, contender=cont, overrides=[])})
        vprec = args.variant_precision or ("bf16" if device.startswith("cuda") else "fp32")
        if args.variants and (vprec not in settings["precisions"] or "fastalign" not in args.contenders):
            # the variants' baseline: the plain trainer in their precision
            runs.append({"id": f"{algo} {vprec} fastalign", "group": f"{algo} {vprec}",
                         "spec": dict(base, kind="train", algo=algo, precision=vprec, contender="fastalign", overrides=[])})
        for name in args.variants:
            runs.append({"id": f"{algo} {vprec} fastalign + {name}", "group": f"{algo} {vprec} variants",
                         "variant": name, "spec": dict(base, kind="train", algo=algo, precision=vprec,
                                                       contender="fastalign", overrides=VARIANTS[name])})
    for prec in settings["precisions"]:  # bf16: both engines on the model cast to bf16 (_e2e_rollout.py)
        for b in settings["rollout_batches"]:
            runs.append({"id": f"rollout {prec} batch {b}", "group": f"rollout {prec}",
                         "spec": dict(base, kind="rollout", batch=b, new_tokens=settings["rollout_new_tokens"],
                                      prompt_len=settings["rollout_prompt_len"], steps=settings["rollout_steps"],
                                      precision=prec)})
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        runs = [r for r in runs if any(w in r["id"] for w in wanted)]
    seen, out = set(), []
    for r in runs:  # a variant baseline that is also a main run: once
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out


def _child(run: dict, workdir: str, log_dir: str, timeout_s: float) -> dict:
    """Runs one contender in a fresh process; its output goes to log_dir/<id>.log."""
    spec = dict(run["spec"], workdir=os.path.join(workdir, run["id"].replace(" ", "_").replace("+", "p")))
    os.makedirs(spec["workdir"], exist_ok=True)
    spec_path, out_path = os.path.join(spec["workdir"], "spec.json"), os.path.join(spec["workdir"], "out.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false")
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    log_path = os.path.join(log_dir, run["id"].replace(" ", "_").replace("+", "p") + ".log")
    t0 = time.time()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "fastalign.benchmarks._e2e_child", spec_path, out_path],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s (log: {log_path})"}
    if not os.path.exists(out_path):
        return {"error": f"the child exited with {proc.returncode} and wrote nothing (log: {log_path})"}
    with open(out_path) as f:
        res = json.load(f)
    res["wall_s"] = time.time() - t0
    if "error" in res:
        res["error"] += f" (log: {log_path})"
    return res


def merge(old: dict | None, new: dict) -> dict:
    """One run's results over rounds: all measured steps pooled (the median is over them), the
    lowest peak memory (the same work each round; the lowest has the least allocator noise), the
    first round's losses; an error in any round is kept."""
    if old is None:
        return dict(new)
    out = dict(old)
    if "error" in new:
        out["error"] = new["error"]
    if "step_seconds" in new:
        out["step_seconds"] = old.get("step_seconds", []) + new["step_seconds"]
    for k in ("peak_rss_bytes", "peak_cuda_bytes"):
        if k in new:
            out[k] = min(new[k], old.get(k, new[k]))
    if "rollout" in new:
        out["rollout"] = {}
        for n, v in new["rollout"].items():
            prev = (old.get("rollout") or {}).get(n, {})
            if "all_tokens_per_s" in v and "all_tokens_per_s" in prev:
                pooled = sorted(prev["all_tokens_per_s"] + v["all_tokens_per_s"])
                v = dict(v, all_tokens_per_s=pooled, tokens_per_s=pooled[len(pooled) // 2])
            out["rollout"][n] = v
    return out


def summarize(run: dict, res: dict) -> dict:
    """The record of one run: its median step time, tokens/s and peak memory (or its note)."""
    rec = {k: run[k] for k in ("id", "group") if k in run}
    spec = run["spec"]
    rec.update(kind=spec["kind"], algo=spec.get("algo"), precision=spec["precision"], contender=spec.get("contender"),
               variant=run.get("variant"), overrides=spec.get("overrides", []))
    rec.update({k: res[k] for k in ("error", "note", "losses", "tokens_per_step", "prompt_tokens", "peak_rss_bytes",
                                    "peak_cuda_bytes", "patch_calls", "generated_tokens_per_step", "rollout",
                                    "wall_s", "step_seconds") if k in res})
    secs = sorted(res.get("step_seconds") or [])
    if secs:
        rec["median_step_s"] = secs[len(secs) // 2] if len(secs) % 2 else (secs[len(secs) // 2 - 1] + secs[len(secs) // 2]) / 2
        rec["tokens_per_s"] = res["tokens_per_step"] / rec["median_step_s"]
    rec["peak_bytes"] = res.get("peak_cuda_bytes", res.get("peak_rss_bytes"))
    return rec


def _args(argv):
    p = argparse.ArgumentParser(prog="fastalign bench --e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--e2e", action="store_true", help="the full end-to-end benchmark (long: ~1 h on 2 CPU cores)")
    p.add_argument("--e2e-quick", action="store_true", help="smoke run: short sequences, 1 measured step, fp32 only, no variants")
    p.add_argument("--out", default="bench_out", help="output directory (default bench_out/)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the model of every contender (default: "
                                                                  "smollm2-135m-instruct; 'tiny' for a harness check)")
    p.add_argument("--cases", default=None, help="only runs whose id contains one of these comma-separated items, "
                                                 "e.g. 'dpo bf16,rollout' (ids: '<algo> <precision> <contender>[ + "
                                                 "<variant>]', 'rollout <precision> batch N')")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma separated, of {', '.join(CONTENDERS)}")
    p.add_argument("--precisions", default=None, help="comma separated, of bf16, fp32 (default: both; quick: fp32)")
    p.add_argument("--variants", default=None, help="comma separated variant names (default: all; 'none': no "
                                                    f"variants): {'; '.join(VARIANTS)}")
    p.add_argument("--variant-precision", default=None, choices=PRECISIONS,
                   help="precision of the variant runs (default: fp32 on the CPU, bf16 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per run (default 2; quick 1)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; quick 64)")
    p.add_argument("--rollout-batches", default=None, help="comma separated batch sizes (default 16,64; quick 4)")
    p.add_argument("--rounds", type=int, default=1, help="run everything this many times, interleaved (a shared "
                                                        "machine's load drift then hits every contender alike); "
                                                        "medians over all rounds' steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every child (default: torch's)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default 3600; quick 900)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [c for c in args.contenders if c not in CONTENDERS]
    if bad:
        p.error(f"--contenders: unknown {bad}; valid: {', '.join(CONTENDERS)}")
    if args.variants is None:
        args.variants = [] if args.e2e_quick else list(VARIANTS)
    elif args.variants.strip() == "none":
        args.variants = []
    else:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in args.variants if v not in VARIANTS]
        if bad:
            p.error(f"--variants: unknown {bad}; valid: {'; '.join(VARIANTS)} or none")
    return p, args


def settings_of(args) -> dict:
    s = dict(QUICK if args.e2e_quick else FULL)
    if args.precisions:
        s["precisions"] = tuple(x.strip() for x in args.precisions.split(",") if x.strip())
        bad = [x for x in s["precisions"] if x not in PRECISIONS]
        if bad:
            raise SystemExit(f"fastalign bench: --precisions: unknown {bad}; valid: bf16, fp32")
    if args.steps:
        s["steps"] = s["rollout_steps"] = args.steps
    if args.seq_len:
        s["seq_len"], s["prompt_len"] = args.seq_len, args.seq_len * 3 // 4
    if args.rollout_batches:
        s["rollout_batches"] = tuple(int(b) for b in args.rollout_batches.split(",") if b.strip())
    return s


def main(argv=None) -> int:
    import torch

    from fastalign.benchmarks import _e2e_fastalign, _e2e_report
    from fastalign.benchmarks._report import machine_info

    p, args = _args(argv)
    settings = settings_of(args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    timeout_s = args.timeout or (900 if args.e2e_quick else 3600)
    os.makedirs(args.out, exist_ok=True)
    log_dir = os.path.join(args.out, "e2e_logs")
    os.makedirs(log_dir, exist_ok=True)
    runs = plan(args, settings, device)
    meta = {"quick": args.e2e_quick, "model": args.model, "settings": settings, "argv": sys.argv[1:],
            "machine": machine_info(device), "method": __doc__.split("\n\n", 1)[1]}
    records, results, t_start = [], {}, time.time()  # run id -> merged raw result over the rounds
    print(f"== e2e: {len(runs)} runs x {args.rounds} round(s) on {device} ({args.model}); logs in {log_dir}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fastalign_e2e_") as workdir:
        for rnd in range(args.rounds):  # rounds: every run once per round, so load drift hits all alike
            for run in runs:
                spec = run["spec"]
                reason = (_e2e_fastalign.check_overrides(spec["algo"], spec["overrides"])
                          if spec["kind"] == "train" and spec["overrides"] else None)
                if reason and rnd:
                    continue
                res = {"note": reason} if reason else _child(run, workdir, log_dir, timeout_s)
                results[run["id"]] = merge(results.get(run["id"]), res)
                records = [summarize(r, results[r["id"]]) for r in runs if r["id"] in results]
                print(f"  [{rnd + 1}/{args.rounds}] " + _e2e_report.one_line(summarize(run, res)), flush=True)
                _e2e_report.write(args.out, meta, records, [], partial=True)  # a run cut short keeps what it has
    targets = _e2e_report.targets(records, args.e2e_quick)
    meta["wall_s"] = time.time() - t_start
    _e2e_report.write(args.out, meta, records, targets)
    print()
    print(_e2e_report.markdown(meta, records, targets))
    png = _e2e_report.plot(args.out, records)
    print(f"wrote {args.out}/e2e.json, e2e.md" + (f", {os.path.basename(png)}" if png else "")
          + f" in {meta['wall_s']:.0f}s")
    broken = [r for r in records if r.get("error") and r.get("contender") == "fastalign"]
    return 1 if broken else 0
