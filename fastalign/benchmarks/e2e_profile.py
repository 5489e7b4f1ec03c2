"""Where does a training step's time go? torch.profiler over one optimizer step of one contender
of the end-to-end benchmark (after its warm-up steps), top ops by self CPU time (then the same
by input shapes):

    python -m fastalign.benchmarks.e2e_profile --algo dpo --contender trl --precision bf16 \
        [--seq-len 512] [--batch 4] [--model smollm2-135m-instruct] [--top 20] [--out FILE.txt]

Runs the same contender code as `fastalign bench --e2e` (_e2e_fastalign.py / _e2e_trl.py), in
this process; the profiler starts at the end of the last warm-up step and stops at the end of
the profiled one (a callback of the trainer), so the table is one whole step and nothing else.
benchmarks/RESULTS.md explains TRL's DPO step in bf16 autocast vs fp32 from these tables."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastalign.benchmarks.e2e_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", default="dpo", choices=("sft", "dpo", "grpo"))
    p.add_argument("--contender", default="trl", choices=("fastalign", "trl", "trl+patch"))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128, help="GRPO: new tokens per completion")
    p.add_argument("--warmup", type=int, default=1, help="unprofiled steps first (>= 1)")
    p.add_argument("--top", type=int, default=20, help="rows of the table")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup: at least 1 (the profiler starts at the end of a step)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastalign.benchmarks import _e2e_data, _e2e_steps
    from fastalign.models import load_tokenizer

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    real_step_end = _e2e_steps.StepLog.step_end

    def step_end(self, loss=None):  # profile exactly step warmup + 1
        real_step_end(self, loss)
        if len(self.ends) == args.warmup:
            prof.start()
        elif len(self.ends) == args.warmup + 1:
            prof.stop()

    _e2e_steps.StepLog.step_end = step_end
    with tempfile.TemporaryDirectory(prefix="fastalign_e2e_profile_") as workdir:
        spec = dict(kind="train", algo=args.algo, contender=args.contender, precision=args.precision, overrides=[],
                    model=args.model, device="cpu", batch=args.batch, seq_len=args.seq_len,
                    prompt_len=args.seq_len * 3 // 4, new_tokens=args.new_tokens, warmup=args.warmup, steps=1,
                    lr=1e-6, workdir=workdir, threads=args.threads)
        tok = load_tokenizer(args.model)
        n = (args.warmup + 1) * (1 if args.algo == "grpo" else args.batch)
        data = _e2e_data.build(args.algo, tok, n_records=n, seq_len=args.seq_len, prompt_len=spec["prompt_len"])
        path = _e2e_data.write_jsonl(data["records"], workdir, f"{args.algo}.jsonl")
        if args.contender == "fastalign":
            from fastalign.benchmarks import _e2e_fastalign

            res = _e2e_fastalign.run(spec, data, path)
        else:
            from fastalign.benchmarks import _e2e_trl

            res = _e2e_trl.run(spec, data, patched=args.contender == "trl+patch")
    step = res["log"].step_seconds(args.warmup)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60)
    # the same by input shapes: which copies / matmuls (the head's [tokens, vocab] ones, the casts)
    table += "\nby input shapes:\n" + prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40, max_shapes_column_width=70)
    head = (f"{args.contender} {args.algo} {args.precision}, batch {args.batch} x {args.seq_len} tokens, "
            f"{torch.get_num_threads()} threads: profiled step {step[0]:.2f} s (profiler overhead included)\n")
    print(head + table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(head + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
