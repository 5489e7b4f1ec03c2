"""`fastalign demo`: the whole SFT -> reward model -> DPO / PPO pipeline on the bundled synthetic
task, on a CPU in minutes, judged by the task's oracle (not by a falling loss). The recipe is
`demo_stages`; `run_demo` sets up the task and reports.

1. SFT: the tiny model learns the task from scratch on demonstrations, a fraction of which carry
   a mistake (imperfect demonstrators; `demo_error_rate`).
2. Preference data: the SFT model samples K responses per fresh prompt; the oracle, playing the
   labeller (noise and biases configurable), compares every pair it can tell apart.
3. Reward model: a scalar head on the SFT backbone, Bradley-Terry on those pairs; held-out
   pair accuracy is reported.
4. DPO: the SFT model is the start and the frozen reference.
5. PPO: from the SFT model against the learned reward model (KL-penalised, value model
   initialised from the reward model); the oracle is only watched (the RLHF monitors of
   fastalign.trainer.monitors, drawn in ppo/monitors.png), never optimised.
6. Evaluation on held-out prompts, sampling at temperature 1: oracle score, win rate against
   the SFT model, KL to the reference (mean over samples of log pi - log pi_ref, in nats per
   response), policy entropy (nats per token), mean response length (tokens), and the reward
   model's score of the same samples.

`ppo_kl_coef = 0` with a biased labeller (`oracle_length_bias > 0`) reproduces reward-model
over-optimisation: the learned reward keeps rising while the oracle score falls, and the
monitor flags it (README, "Monitors"; `fastalign demo --set ppo_kl_coef=0 ...`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import torch

from fastalign.data.synthetic import Oracle, SyntheticTask
from fastalign.models import ScalarHeadModel, load_model, tiny_model, tiny_tokenizer
from fastalign.recipes.plots import plot_demo
from fastalign.recipes.runner import Context, Stage, run_stages
from fastalign.recipes.steps import format_table, judge, label_preferences
from fastalign.trainer.loop import resolve_device
from fastalign.trainer.monitors import plot_monitors


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    # model
    tiny: dict = field(default_factory=lambda: dict(hidden_size=96, num_layers=3, num_heads=4, intermediate_size=192))
    max_length: int = 64
    # SFT
    sft_examples: int = 8000
    sft_steps: int = 250
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    demo_error_rate: float = 0.3   # fraction of demonstrations with one mistake (imperfect labellers)
    # preference data from the SFT model, labelled by the oracle
    pref_prompts: int = 1000
    samples_per_prompt: int = 4
    oracle_noise: float = 0.1
    oracle_length_bias: float = 0.0
    oracle_style_bias: float = 0.0
    max_new_tokens: int = 24
    # reward model
    rm_steps: int = 100
    rm_lr: float = 1e-3
    # DPO
    # DPO with an NLL term on the chosen responses (the RPO recipe): on this tiny model plain DPO
    # at beta 0.1 drifts (responses grow, KL to the reference climbs, the oracle score falls); the
    # NLL anchor keeps KL small (the measured figures: README, "Training").
    dpo_steps: int = 150
    dpo_batch_size: int = 32
    dpo_lr: float = 5e-4
    dpo_beta: float = 0.5
    dpo_loss_type: str = "sigmoid"
    dpo_sft_weight: float = 1.0
    # PPO against the learned reward model
    ppo_steps: int = 30
    ppo_prompts_per_step: int = 64
    ppo_lr: float = 2e-4
    ppo_kl_coef: float = 0.2
    ppo_epochs: int = 2
    ppo_mini_batches: int = 2
    # evaluation
    eval_prompts: int = 500
    stages: tuple = ("dpo", "ppo")  # which of the policy-optimisation stages to run


# ---- the recipe ----------------------------------------------------------------------------------


def demo_stages(cfg: DemoConfig, task: SyntheticTask, oracle: Oracle) -> list[Stage]:
    """SFT, preference labelling, reward model, the policy stages of `cfg.stages`, evaluation."""
    sft = Stage(
        "sft", algorithm="sft", outputs=("sft.policy", "sft.policy_dir"),
        data=lambda ctx: (task.demonstrations(cfg.sft_examples, seed=cfg.seed + 1, error_rate=cfg.demo_error_rate),
                          task.demonstrations(256, seed=cfg.seed + 2)),
        models=lambda ctx: {"policy": tiny_model(ctx.tokenizer, seed=cfg.seed, **cfg.tiny)},
        trainer=dict(max_steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, warmup_steps=20,
                     eval_every=max(cfg.sft_steps // 5, 1)),
        describe=lambda ctx, r: (
            f"SFT: tiny Llama ({_n_params(r.models['policy']) / 1e6:.2f}M parameters, {len(ctx.tokenizer)}-token "
            f"character vocabulary) on {len(r.train)} demonstrations, {cfg.sft_steps} steps"),
        report=lambda ctx, r: ctx.log(f"      eval loss {r.summary['eval']['loss']:.3f} per token  "
                                      f"({ctx.timings['sft']:.0f}s)"),
    )
    label = Stage(
        "label", inputs=("sft.policy",), outputs=("pairs", "train_pairs", "eval_pairs", "ties"),
        run=lambda ctx: label_preferences(
            ctx, ctx["sft.policy"], [r["prompt"] for r in task.sample(cfg.pref_prompts, seed=cfg.seed + 3)], oracle,
            cfg.samples_per_prompt, cfg.max_new_tokens, seed=cfg.seed + 4, shuffle_seed=cfg.seed),
    )
    reward = Stage(
        "reward", algorithm="reward", inputs=("sft.policy_dir", "train_pairs", "eval_pairs"),
        outputs=("reward.reward", "reward.reward_dir", "reward.summary"),
        data=lambda ctx: (ctx["train_pairs"], ctx["eval_pairs"]),
        models=lambda ctx: {"reward": _reward_model(ctx["sft.policy_dir"], cfg.seed)},
        trainer=dict(max_steps=cfg.rm_steps, batch_size=32, lr=cfg.rm_lr, warmup_steps=10,
                     eval_every=max(cfg.rm_steps // 4, 1)),
        describe=lambda ctx, r: (f"reward model: scalar head on the SFT model, Bradley-Terry on {len(r.train)} pairs, "
                                 f"{cfg.rm_steps} steps"),
        report=lambda ctx, r: ctx.log(
            f"      held-out pair accuracy {r.summary['eval'].get('accuracy', float('nan')):.3f} ({len(r.eval)} pairs; "
            f"labels carry {cfg.oracle_noise:.0%} noise)  ({ctx.timings['reward']:.0f}s)"),
    )
    dpo = Stage(
        "dpo", algorithm="dpo", inputs=("sft.policy_dir", "train_pairs", "eval_pairs"), outputs=("dpo.policy",),
        config={"beta": cfg.dpo_beta, "loss_type": cfg.dpo_loss_type, "sft_weight": cfg.dpo_sft_weight},
        data=lambda ctx: (ctx["train_pairs"], ctx["eval_pairs"]),
        models=lambda ctx: {"policy": load_model(ctx["sft.policy_dir"]),
                            "reference": load_model(ctx["sft.policy_dir"])},
        trainer=dict(max_steps=cfg.dpo_steps, batch_size=cfg.dpo_batch_size, lr=cfg.dpo_lr, warmup_steps=10,
                     eval_every=max(cfg.dpo_steps // 4, 1)),
        describe=lambda ctx, r: (f"DPO ({cfg.dpo_loss_type}, beta {cfg.dpo_beta}, NLL-on-chosen weight "
                                 f"{cfg.dpo_sft_weight}) from the SFT model on {len(r.train)} pairs, "
                                 f"{cfg.dpo_steps} steps"),
        report=lambda ctx, r: ctx.log(
            f"      held-out implicit-reward accuracy {r.summary['eval'].get('rewards/accuracies', float('nan')):.3f}  "
            f"({ctx.timings['dpo']:.0f}s)"),
    )
    bs = min(32, cfg.ppo_prompts_per_step)
    # PPO from the SFT model against the learned reward model (frozen); the value model starts
    # from the reward model; the oracle only feeds the monitors
    ppo = Stage(
        "ppo", algorithm="ppo", inputs=("sft.policy_dir", "reward.reward", "reward.reward_dir"),
        outputs=("ppo.policy",),
        config={"kl_coef": cfg.ppo_kl_coef, "max_new_tokens": cfg.max_new_tokens, "ppo_epochs": cfg.ppo_epochs,
                "mini_batches": cfg.ppo_mini_batches},
        algorithm_kwargs={"oracle_fn": Oracle.score},
        data=lambda ctx: (task.sample(cfg.ppo_steps * cfg.ppo_prompts_per_step, seed=cfg.seed + 7),
                          task.sample(128, seed=cfg.seed + 8)),
        models=lambda ctx: {"policy": load_model(ctx["sft.policy_dir"]),
                            "reference": load_model(ctx["sft.policy_dir"]),
                            "value": load_model(ctx["reward.reward_dir"]), "reward": ctx["reward.reward"]},
        trainer=dict(max_steps=cfg.ppo_steps, batch_size=bs, grad_accum=max(cfg.ppo_prompts_per_step // bs, 1),
                     lr=cfg.ppo_lr, warmup_steps=0, eval_every=max(cfg.ppo_steps // 3, 1)),
        describe=lambda ctx, r: (f"PPO (KL coefficient {cfg.ppo_kl_coef}, {cfg.ppo_epochs} epochs x "
                                 f"{cfg.ppo_mini_batches} mini-batches) from the SFT model against the reward model, "
                                 f"{cfg.ppo_steps} steps of {cfg.ppo_prompts_per_step} prompts"),
        report=lambda ctx, r: _ppo_report(ctx, r, cfg),
    )
    policies = {"SFT": "sft.policy", **{n.upper(): f"{n}.policy" for n in ("dpo", "ppo") if n in cfg.stages}}
    evaluate = Stage(
        "eval", numbered=False, inputs=("sft.policy", "reward.reward", *policies.values()),
        outputs=("eval_prompts", "results", "outputs"),
        run=lambda ctx: _evaluate(ctx, cfg, task, oracle, {name: ctx[a] for name, a in policies.items()}),
    )
    return [sft, label, reward, *(s for s in (dpo, ppo) if s.name in cfg.stages), evaluate]


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _reward_model(sft_dir, seed):
    torch.manual_seed(seed)  # the scalar head's initialisation
    return ScalarHeadModel(load_model(sft_dir))


def _ppo_report(ctx, r, cfg):
    out = os.path.join(ctx.output_dir, "ppo")
    plot_monitors(os.path.join(out, "metrics.jsonl"), os.path.join(out, "monitors.png"),
                  title=f"PPO monitors (KL coefficient {cfg.ppo_kl_coef})")
    ev = r.summary["eval"]
    ctx.log(f"      held-out reward-model score {ev.get('score', float('nan')):.3f}, oracle "
            f"{ev.get('oracle', float('nan')):.3f}; over-optimisation flagged at steps "
            f"{r.algorithm.monitor.flagged_steps or 'none'}  ({ctx.timings['ppo']:.0f}s)")


def _evaluate(ctx, cfg, task, oracle, policies):
    prompts = [r["prompt"] for r in task.sample(cfg.eval_prompts, seed=cfg.seed + 5)]
    results, outputs = judge(ctx, policies, ctx["sft.policy"], ctx["reward.reward"], prompts, oracle,
                             cfg.max_new_tokens, seed=cfg.seed + 6)
    return {"eval_prompts": prompts, "results": results, "outputs": outputs}


# ---- running it ----------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig | None = None, log=print) -> dict:
    cfg = cfg or DemoConfig()
    t_start = time.time()
    os.makedirs(cfg.output_dir, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tok = tiny_tokenizer()
    task = SyntheticTask()
    oracle = Oracle(noise=cfg.oracle_noise, length_bias=cfg.oracle_length_bias, style_bias=cfg.oracle_style_bias,
                    seed=cfg.seed)
    unknown = set(cfg.stages) - {"dpo", "ppo"}
    if unknown or not cfg.stages:
        raise ValueError(f"demo: stages must be a non-empty subset of ('dpo', 'ppo'), got {cfg.stages}")
    ctx = Context(cfg.output_dir, tok, device, cfg.max_length, log=log,
                  trainer_defaults=dict(seed=cfg.seed, device=cfg.device, progress=cfg.progress, save_total_limit=1))
    a = run_stages(demo_stages(cfg, task, oracle), ctx)

    results, outputs, eval_prompts = a["results"], a["outputs"], a["eval_prompts"]
    total = time.time() - t_start
    summary = {"results": results, "reward_model_accuracy": a["reward.summary"]["eval"].get("accuracy", float("nan")),
               "pairs": len(a["pairs"]), "ties": a["ties"], "seconds": total, "timings": ctx.timings,
               "config": dataclasses.asdict(cfg),
               "examples": [{"prompt": p, **{name: outputs[name][0][i] for name in outputs}}
                            for i, p in enumerate(eval_prompts[:8])]}
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    summary["plot"] = plot_demo(cfg.output_dir, results)
    log("")
    log(format_table(results))
    log(f"\n(oracle score: graded correctness in [0, 1] on {len(eval_prompts)} held-out prompts, sampling at "
        f"temperature 1; win rate: the model's vs the SFT model's response per prompt by oracle score, ties 1/2; "
        f"KL: mean log pi - log pi_SFT of the sampled responses, nats; entropy: nats per token; length: tokens; "
        f"reward model: mean learned score of the same samples)")
    for ex in summary["examples"][:4]:
        log(f"  {ex['prompt']!r:28s} " + "  ".join(f"{name}: {ex[name]!r:14s}" for name in outputs))
    log(f"\nplots: {summary['plot']}" + (f", {cfg.output_dir}/ppo/monitors.png" if "PPO" in results else "")
        + f"\ncheckpoints: {cfg.output_dir}/{{sft,reward,{','.join(cfg.stages)}}}/checkpoints  "
        f"total time {total / 60:.1f} min")
    return summary
