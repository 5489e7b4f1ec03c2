"""One contender of the end-to-end benchmark in its own process (so its peak memory is its own):
`python -m fastalign.benchmarks._e2e_child SPEC.json OUT.json`. SPEC: kind ("train" or
"rollout"), algo, contender ("fastalign", "trl", "trl+patch"), precision, overrides, model,
device, batch, seq_len, prompt_len, new_tokens, warmup, steps, lr, workdir, threads. OUT:
step seconds (after the warm-up steps), losses, tokens per step, peak memory; or the error."""

from __future__ import annotations

import json
import os
import sys
import traceback


def tokens_per_step(spec: dict, prompt_tokens) -> int:
    """Tokens the step trains on: SFT batch x seq_len; DPO 2 x batch x seq_len (chosen and
    rejected, each truncated to seq_len); GRPO batch x (prompt + new tokens)."""
    if spec["algo"] == "sft":
        return spec["batch"] * spec["seq_len"]
    if spec["algo"] == "dpo":
        return 2 * spec["batch"] * spec["seq_len"]
    return spec["batch"] * (prompt_tokens + spec["new_tokens"])


def run_train(spec: dict) -> dict:
    from fastalign.benchmarks import _e2e_data
    from fastalign.benchmarks._e2e_steps import peak_memory
    from fastalign.models import load_tokenizer

    tok = load_tokenizer(spec["model"])
    steps = spec["warmup"] + spec["steps"]
    n_records = steps * (1 if spec["algo"] == "grpo" else spec["batch"])
    data = _e2e_data.build(spec["algo"], tok, n_records=n_records, seq_len=spec["seq_len"],
                           prompt_len=spec["prompt_len"])
    os.makedirs(spec["workdir"], exist_ok=True)
    path = _e2e_data.write_jsonl(data["records"], spec["workdir"], f"{spec['algo']}.jsonl")
    if spec["contender"] == "fastalign":
        from fastalign.benchmarks import _e2e_fastalign

        res = _e2e_fastalign.run(spec, data, path)
    else:
        from fastalign.benchmarks import _e2e_trl

        res = _e2e_trl.run(spec, data, patched=spec["contender"] == "trl+patch")
    log = res.pop("log")
    secs = log.step_seconds(spec["warmup"])
    if len(log.ends) != steps:
        raise RuntimeError(f"{len(log.ends)} step ends recorded, expected {steps}")
    out = {"step_seconds": secs, "losses": log.losses, "tokens_per_step": tokens_per_step(spec, data["prompt_tokens"]),
           "prompt_tokens": data["prompt_tokens"], **peak_memory(spec["device"]), **res}
    if spec["algo"] == "grpo":
        out["generate_calls"] = log.generate_calls
        out["generated_tokens_per_step"] = log.generated_tokens / steps if log.generate_calls else None
    return out


def main(argv=None) -> int:
    spec_path, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        if spec["kind"] == "rollout":
            from fastalign.benchmarks import _e2e_rollout
            from fastalign.benchmarks._e2e_steps import peak_memory

            result = {"rollout": _e2e_rollout.measure(spec), **peak_memory(spec["device"])}
        else:
            result = run_train(spec)
    except Exception as e:  # reported in the table as this contender's note; the run goes on
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
