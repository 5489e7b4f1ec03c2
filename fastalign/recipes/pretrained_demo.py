"""`fastalign demo --model smollm2-135m-instruct` (or a local model directory / .gguf file): the
demo's synthetic task on a real pretrained chat model, rendered through its tokenizer and chat
template, judged by the task's oracle, within ~15 minutes on a 2-core CPU.

Why these stages. A pretrained 135M chat model does not know the task's terse commands ("reverse
3 1 4"): it answers with prose and scores ~0.04. So the recipe is

1. SFT on demonstrations (a fraction with one mistake, as in the tiny demo): teaches the answer
   format and much of the task in 10 steps of 16 (oracle 0.02 -> 0.50, README);
2. GRPO with the oracle as the reward (a verifiable reward, as in RLVR): the policy's own
   samples, scored by the very oracle the evaluation uses, group-normalised. On this budget it is
   the stage that turns compute into oracle score most directly: DPO would first need a labelling
   pass over several samples per prompt and a reference pass over every pair, and a learned
   reward model trained on a few hundred pairs is too weak to steer a 135M model (the tiny demo
   shows PPO limited by exactly that). The default 4 steps of 16 samples (~1 min) gain within
   noise (+0.03 ± 0.03); `--set grpo_steps=16 --set grpo_prompts_per_step=8` trains it 8x
   longer, still within the budget (whole run 3.5 min by default on 2 idle cores);
3. evaluation of the base model, the SFT model and the GRPO model on the same held-out prompts:
   oracle score sampled (with its standard error) and greedy, win rate against the base model,
   KL to the base model, entropy, length; and each stage's gain over the previous one with the
   standard error of the paired difference (same prompts, same sampling seed).

Everything runs in bf16 autocast by default (fp32 weights and optimiser state): ~3x faster
matmuls than fp32 where the CPU has bf16 dot products (AVX512-BF16, AMX); `precision=fp32` runs
it all in fp32. Sampling, in training and evaluation, goes through fastalign.trainer.generation
(so a faster sampler there speeds the demo up with no change here). The evaluation's log-probs
(KL, entropy) come from bf16-rounded logits under bf16: their error averages out over the
responses, far below the differences the table shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch

from fastalign.data.synthetic import Oracle, SyntheticTask
from fastalign.errors import ConfigError
from fastalign.models import load_model, load_tokenizer
from fastalign.recipes.runner import Context, Stage, run_stages
from fastalign.recipes.steps import format_table, judge, paired_gains
from fastalign.trainer.loop import resolve_device


@dataclass
class PretrainedDemoConfig:
    model: str = "smollm2-135m-instruct"  # a known name, a local model directory or a .gguf file
    output_dir: str = "runs/demo_pretrained"
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    precision: str = "bf16"  # of the training stages: bf16 (autocast) or fp32
    max_length: int = 64  # prompt (~34 tokens with the chat template) + answer (<= ~12)
    max_new_tokens: int = 16
    # SFT
    sft_examples: int = 1024
    sft_steps: int = 10
    sft_batch_size: int = 16
    sft_lr: float = 1e-4
    demo_error_rate: float = 0.3
    # GRPO against the oracle
    grpo_steps: int = 4
    grpo_prompts_per_step: int = 4
    grpo_group_size: int = 4
    grpo_lr: float = 2e-5
    grpo_beta: float = 0.0  # k3 KL to the SFT model (0: no reference model is held)
    # evaluation
    eval_prompts: int = 96
    stages: tuple = ("sft", "grpo")  # "sft" alone stops after SFT


def pretrained_demo_stages(cfg: PretrainedDemoConfig, task: SyntheticTask, oracle: Oracle) -> list[Stage]:
    """SFT, GRPO against the oracle (if in cfg.stages), evaluation of base / SFT / GRPO."""
    trainer = dict(precision=cfg.precision, warmup_steps=2)
    sft = Stage(
        "sft", algorithm="sft", outputs=("sft.policy", "sft.policy_dir"),
        data=lambda ctx: (task.demonstrations(cfg.sft_examples, seed=cfg.seed + 1, error_rate=cfg.demo_error_rate),
                          task.demonstrations(64, seed=cfg.seed + 2)),
        models=lambda ctx: {"policy": load_model(cfg.model)},
        trainer=dict(trainer, max_steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
                     eval_every=max(cfg.sft_steps // 2, 1)),
        describe=lambda ctx, r: (f"SFT: {cfg.model} on {len(r.train)} demonstrations "
                                 f"({cfg.demo_error_rate:.0%} with a mistake), {cfg.sft_steps} steps of "
                                 f"{cfg.sft_batch_size}, lr {cfg.sft_lr}, {cfg.precision}"),
        report=lambda ctx, r: ctx.log(f"      eval loss {r.summary['eval']['loss']:.3f} per token  "
                                      f"({ctx.timings['sft']:.0f}s)"),
    )
    grpo = Stage(
        "grpo", algorithm="grpo", inputs=("sft.policy_dir",), outputs=("grpo.policy",),
        config={"group_size": cfg.grpo_group_size, "max_new_tokens": cfg.max_new_tokens, "beta": cfg.grpo_beta},
        algorithm_kwargs={"reward_fn": Oracle.score, "oracle_fn": Oracle.score},
        data=lambda ctx: (task.sample(cfg.grpo_steps * cfg.grpo_prompts_per_step, seed=cfg.seed + 7),
                          task.sample(32, seed=cfg.seed + 8)),
        models=lambda ctx: {"policy": load_model(ctx["sft.policy_dir"]),
                            **({"reference": load_model(ctx["sft.policy_dir"])} if cfg.grpo_beta > 0 else {})},
        trainer=dict(trainer, max_steps=cfg.grpo_steps, batch_size=cfg.grpo_prompts_per_step, lr=cfg.grpo_lr,
                     eval_every=cfg.grpo_steps),
        describe=lambda ctx, r: (f"GRPO against the oracle from the SFT model: {cfg.grpo_steps} steps of "
                                 f"{cfg.grpo_prompts_per_step} prompts x {cfg.grpo_group_size} samples, lr "
                                 f"{cfg.grpo_lr}, KL coefficient {cfg.grpo_beta}"),
        report=lambda ctx, r: ctx.log(f"      held-out oracle score {r.summary['eval'].get('score', float('nan')):.3f}"
                                      f"  ({ctx.timings['grpo']:.0f}s)"),
    )
    trained = [s for s in (sft, grpo) if s.name in cfg.stages]
    policies = {s.name.upper(): f"{s.name}.policy" for s in trained}
    evaluate = Stage(
        "eval", numbered=False, inputs=tuple(policies.values()), outputs=("eval_prompts", "results", "outputs"),
        run=lambda ctx: _evaluate(ctx, cfg, task, oracle, {name: ctx[a] for name, a in policies.items()}),
    )
    return [*trained, evaluate]


def _evaluate(ctx, cfg, task, oracle, trained: dict) -> dict:
    prompts = [r["prompt"] for r in task.sample(cfg.eval_prompts, seed=cfg.seed + 5)]
    base = load_model(cfg.model).to(ctx.device).eval()
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        results, outputs = judge(ctx, {"base": base, **trained}, base, None, prompts, oracle, cfg.max_new_tokens,
                                 seed=cfg.seed + 6)
    ctx.log(f"evaluation: {len(prompts)} held-out prompts ({ctx.elapsed():.0f}s)")
    return {"eval_prompts": prompts, "results": results, "outputs": outputs}


def run_pretrained_demo(cfg: PretrainedDemoConfig, log=print) -> dict:
    t_start, cpu_start, load_start = time.time(), time.process_time(), _load_average()
    if list(cfg.stages) not in (["sft"], ["sft", "grpo"]):
        raise ConfigError(f"demo: with a pretrained model, stages must be [sft] or [sft, grpo], got {list(cfg.stages)}")
    if cfg.precision not in ("bf16", "fp32"):
        raise ConfigError(f"demo: precision must be bf16 or fp32, got {cfg.precision!r}")
    os.makedirs(cfg.output_dir, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    task, oracle = SyntheticTask(), Oracle(seed=cfg.seed)
    ctx = Context(cfg.output_dir, tok, device, cfg.max_length, log=log,
                  trainer_defaults=dict(seed=cfg.seed, device=cfg.device, progress=cfg.progress, save_total_limit=1))
    a = run_stages(pretrained_demo_stages(cfg, task, oracle), ctx)
    results, outputs, prompts = a["results"], a["outputs"], a["eval_prompts"]
    gains = paired_gains(outputs)
    total = time.time() - t_start
    # the machine may be shared: CPU seconds and the load average say how much of it the run had
    summary = {"results": results, "gains": gains, "seconds": total, "cpu_seconds": time.process_time() - cpu_start,
               "load_average": [load_start, _load_average()], "timings": ctx.timings,
               "config": dataclasses.asdict(cfg), "cpu": _cpu_model(), "threads": torch.get_num_threads(),
               "examples": [{"prompt": p, **{name: outputs[name][0][i] for name in outputs}}
                            for i, p in enumerate(prompts[:8])]}
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log("")
    log(format_table(results, baseline="base"))
    log(f"\n(oracle score: graded correctness in [0, 1] on {len(prompts)} held-out prompts, sampling at temperature "
        f"1, ± its standard error; greedy: the same prompts decoded greedily; win rate: against the base model's "
        f"response per prompt by oracle score, ties 1/2; KL: mean log pi - log pi_base of the sampled responses, "
        f"nats; entropy: nats per token; length: tokens)")
    for g in gains:
        log(f"  {g['model']} vs {g['vs']}: oracle {g['gain']:+.3f} ± {g['se']:.3f} (paired standard error), "
            f"greedy {g['greedy_gain']:+.3f} ± {g['greedy_se']:.3f}")
    for ex in summary["examples"][:4]:
        log(f"  {ex['prompt']!r:26s} " + "  ".join(f"{name}: {ex[name][:40]!r}" for name in outputs))
    log(f"\ncheckpoints: {cfg.output_dir}/{{{','.join(cfg.stages)}}}/checkpoints  total time {total / 60:.1f} min "
        f"({_cpu_model()}, {torch.get_num_threads()} threads; {summary['cpu_seconds'] / 60:.1f} CPU-minutes, "
        f"load average {summary['load_average'][0]:.1f} at the start, {summary['load_average'][1]:.1f} at the end)")
    return summary


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
