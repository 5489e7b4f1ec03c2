"""`fastalign demo`: the whole SFT -> reward model -> DPO / PPO pipeline on the bundled synthetic
task, on a CPU in minutes, judged by the task's oracle (not by a falling loss).

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
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import torch


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
    # at beta 0.1 drifts (seed 0: oracle +0.05, KL 2.3 nats; at lr 5e-4 x 300 steps responses grow
    # 8 -> 14 tokens, KL 19.6 and the oracle score falls), the NLL anchor keeps KL ~0.3 and gives
    # oracle 0.449 -> 0.551, win rate 0.61.
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


def _stage_cfg(cfg: DemoConfig, name, **kw):
    return dict(output_dir=os.path.join(cfg.output_dir, name), seed=cfg.seed, device=cfg.device,
                progress=cfg.progress, save_total_limit=1, **kw)


def run_demo(cfg: DemoConfig | None = None, log=print) -> dict:
    from fastalign.algorithms import get_algorithm
    from fastalign.data.synthetic import Oracle, SyntheticTask
    from fastalign.models import ScalarHeadModel, load_model, tiny_model, tiny_tokenizer
    from fastalign.trainer.generation import generate, response_logps
    from fastalign.trainer.loop import Trainer, resolve_device
    from fastalign.trainer.metrics import plot_metrics

    cfg = cfg or DemoConfig()
    t_start = time.time()
    os.makedirs(cfg.output_dir, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tok = tiny_tokenizer()
    task = SyntheticTask()
    oracle = Oracle(noise=cfg.oracle_noise, length_bias=cfg.oracle_length_bias, style_bias=cfg.oracle_style_bias,
                    seed=cfg.seed)
    timings = {}
    unknown = set(cfg.stages) - {"dpo", "ppo"}
    if unknown or not cfg.stages:
        raise ValueError(f"demo: stages must be a non-empty subset of ('dpo', 'ppo'), got {cfg.stages}")
    n_stages = 3 + len(cfg.stages)

    # ---- 1. SFT ------------------------------------------------------------------------------
    t = time.time()
    sft = get_algorithm("sft")()
    stats = Counter()
    train = sft.encode(task.demonstrations(cfg.sft_examples, seed=cfg.seed + 1, error_rate=cfg.demo_error_rate),
                       tok, cfg.max_length, stats)
    evald = sft.encode(task.demonstrations(256, seed=cfg.seed + 2), tok, cfg.max_length, stats)
    policy = tiny_model(tok, seed=cfg.seed, **cfg.tiny)
    n_params = sum(p.numel() for p in policy.parameters())
    log(f"[1/{n_stages}] SFT: tiny Llama ({n_params / 1e6:.2f}M parameters, {len(tok)}-token character vocabulary) "
        f"on {len(train)} demonstrations, {cfg.sft_steps} steps")
    tr = Trainer(sft, {"policy": policy}, tok, train, evald, _stage_cfg(
        cfg, "sft", max_steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, warmup_steps=20,
        eval_every=max(cfg.sft_steps // 5, 1)))
    s = tr.fit()
    sft_dir = tr.model_dir("policy")
    timings["sft"] = time.time() - t
    log(f"      eval loss {s['eval']['loss']:.3f} per token  ({timings['sft']:.0f}s)")
    sft_model = policy.eval()

    # ---- 2. preference data from the SFT model, labelled by the oracle ----------------------------
    t = time.time()
    prompts = [r["prompt"] for r in task.sample(cfg.pref_prompts, seed=cfg.seed + 3)]
    k = cfg.samples_per_prompt
    samples, _, trunc = generate(sft_model, tok, [p for p in prompts for _ in range(k)], temperature=1.0,
                                 max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 4, device=device)
    pairs, ties = [], 0
    for i, p in enumerate(prompts):
        got, t_ = oracle.all_pairs(p, samples[i * k: (i + 1) * k])
        pairs += got
        ties += t_
    random.Random(cfg.seed).shuffle(pairs)
    n_eval_pairs = max(len(pairs) // 10, 1)
    eval_pairs, train_pairs = pairs[:n_eval_pairs], pairs[n_eval_pairs:]
    with open(os.path.join(cfg.output_dir, "preferences.jsonl"), "w") as f:
        for r in pairs:
            f.write(json.dumps(r) + "\n")
    timings["label"] = time.time() - t
    log(f"[2/{n_stages}] preferences: {k} SFT samples for each of {len(prompts)} prompts, oracle (noise {cfg.oracle_noise}, "
        f"length bias {cfg.oracle_length_bias}) compared them: {len(pairs)} pairs, {ties} ties left out "
        f"(equally good), {trunc} samples without EOS cut at {cfg.max_new_tokens} tokens "
        f"({timings['label']:.0f}s)")

    # ---- 3. reward model ------------------------------------------------------------------------
    t = time.time()
    rm_alg = get_algorithm("reward")()
    st = Counter()
    rm_train = rm_alg.encode(train_pairs, tok, cfg.max_length, st)
    rm_eval = rm_alg.encode(eval_pairs, tok, cfg.max_length, st)
    torch.manual_seed(cfg.seed)
    rm = ScalarHeadModel(load_model(sft_dir))
    log(f"[3/{n_stages}] reward model: scalar head on the SFT model, Bradley-Terry on {len(rm_train)} pairs, {cfg.rm_steps} steps")
    tr = Trainer(rm_alg, {"reward": rm}, tok, rm_train, rm_eval, _stage_cfg(
        cfg, "reward", max_steps=cfg.rm_steps, batch_size=32, lr=cfg.rm_lr, warmup_steps=10,
        eval_every=max(cfg.rm_steps // 4, 1)))
    s = tr.fit()
    rm_acc = s["eval"].get("accuracy", float("nan"))
    timings["reward"] = time.time() - t
    log(f"      held-out pair accuracy {rm_acc:.3f} ({len(rm_eval)} pairs; labels carry {cfg.oracle_noise:.0%} noise)  "
        f"({timings['reward']:.0f}s)")
    rm.eval()

    rm_dir = tr.model_dir("reward")
    trained = {}

    # ---- 4. DPO ------------------------------------------------------------------------------------
    if "dpo" in cfg.stages:
        trained["DPO"] = _dpo_stage(cfg, tok, train_pairs, eval_pairs, sft_dir, timings, log, f"[4/{n_stages}]")

    # ---- 5. PPO ------------------------------------------------------------------------------------
    if "ppo" in cfg.stages:
        trained["PPO"] = _ppo_stage(cfg, tok, task, sft_dir, rm_dir, rm, timings, log, f"[{n_stages}/{n_stages}]")

    # ---- evaluation by the oracle -------------------------------------------------------------------
    t = time.time()
    eval_prompts = [r["prompt"] for r in task.sample(cfg.eval_prompts, seed=cfg.seed + 5)]
    results, outputs = {}, {}
    for name, model in (("SFT", sft_model), *trained.items()):
        texts, ids, trunc = generate(model, tok, eval_prompts, temperature=1.0, max_new_tokens=cfg.max_new_tokens,
                                     seed=cfg.seed + 6, device=device)
        greedy, _, _ = generate(model, tok, eval_prompts, do_sample=False, max_new_tokens=cfg.max_new_tokens,
                                device=device)
        lp, ent = response_logps(model, tok, eval_prompts, ids, device=device, return_entropy=True)
        lp_ref = response_logps(sft_model, tok, eval_prompts, ids, device=device)
        with torch.no_grad():
            rm_scores = _rm_scores(rm, tok, eval_prompts, texts, device)
        scores = [oracle.score(p, r) for p, r in zip(eval_prompts, texts)]
        outputs[name] = (texts, scores)
        results[name] = {
            "oracle score": sum(scores) / len(scores),
            "oracle score (greedy)": sum(oracle.score(p, r) for p, r in zip(eval_prompts, greedy)) / len(greedy),
            "KL to ref": float((lp - lp_ref).mean()),
            "entropy": float(ent.mean()),
            "mean length": sum(len(x) for x in ids) / len(ids),
            "reward model": float(rm_scores.mean()),
            "no EOS": trunc,
        }
    sft_scores = outputs["SFT"][1]
    for name in results:
        sc = outputs[name][1]
        results[name]["win rate vs SFT"] = sum(1.0 if a > b else 0.5 if a == b else 0.0
                                               for a, b in zip(sc, sft_scores)) / len(sc)
    timings["eval"] = time.time() - t
    total = time.time() - t_start
    summary = {"results": results, "reward_model_accuracy": rm_acc, "pairs": len(pairs), "ties": ties,
               "seconds": total, "timings": timings, "config": dataclasses.asdict(cfg),
               "examples": [{"prompt": p, **{name: outputs[name][0][i] for name in outputs}}
                            for i, p in enumerate(eval_prompts[:8])]}
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    summary["plot"] = _plot(cfg.output_dir, results, plot_metrics)
    log("")
    log(format_table(results))
    log(f"\n(oracle score: graded correctness in [0, 1] on {len(eval_prompts)} held-out prompts, sampling at "
        f"temperature 1; win rate: the model's vs the SFT model's response per prompt by oracle score, ties 1/2; "
        f"KL: mean log pi - log pi_SFT of the sampled responses, nats; entropy: nats per token; length: tokens; "
        f"reward model: mean learned score of the same samples)")
    for ex in summary["examples"][:4]:
        log(f"  {ex['prompt']!r:28s} " + "  ".join(f"{name}: {ex[name]!r:14s}" for name in outputs))
    log(f"\nplots: {summary['plot']}" + (f", {cfg.output_dir}/ppo/monitors.png" if "PPO" in trained else "")
        + f"\ncheckpoints: {cfg.output_dir}/{{sft,reward,{','.join(cfg.stages)}}}/checkpoints  "
        f"total time {total / 60:.1f} min")
    return summary


def _dpo_stage(cfg, tok, train_pairs, eval_pairs, sft_dir, timings, log, tag):
    from fastalign.algorithms import get_algorithm
    from fastalign.models import load_model
    from fastalign.trainer.loop import Trainer

    t = time.time()
    st = Counter()
    dpo = get_algorithm("dpo")({"beta": cfg.dpo_beta, "loss_type": cfg.dpo_loss_type, "sft_weight": cfg.dpo_sft_weight})
    dpo_train = dpo.encode(train_pairs, tok, cfg.max_length, st)
    dpo_eval = dpo.encode(eval_pairs, tok, cfg.max_length, st)
    policy = load_model(sft_dir)
    reference = load_model(sft_dir)
    log(f"{tag} DPO ({cfg.dpo_loss_type}, beta {cfg.dpo_beta}, NLL-on-chosen weight {cfg.dpo_sft_weight}) from the SFT model on {len(dpo_train)} pairs, "
        f"{cfg.dpo_steps} steps")
    tr = Trainer(dpo, {"policy": policy, "reference": reference}, tok, dpo_train, dpo_eval, _stage_cfg(
        cfg, "dpo", max_steps=cfg.dpo_steps, batch_size=cfg.dpo_batch_size, lr=cfg.dpo_lr, warmup_steps=10,
        eval_every=max(cfg.dpo_steps // 4, 1)))
    s = tr.fit()
    timings["dpo"] = time.time() - t
    log(f"      held-out implicit-reward accuracy {s['eval'].get('rewards/accuracies', float('nan')):.3f}  "
        f"({timings['dpo']:.0f}s)")
    return policy.eval()


def _ppo_stage(cfg, tok, task, sft_dir, rm_dir, rm, timings, log, tag):
    """PPO from the SFT model against the learned reward model `rm` (frozen); the value model
    starts from the reward model. The oracle only feeds the monitors."""
    from fastalign.algorithms import get_algorithm
    from fastalign.data.synthetic import Oracle
    from fastalign.models import load_model
    from fastalign.trainer.loop import Trainer
    from fastalign.trainer.monitors import plot_monitors

    t = time.time()
    ppo = get_algorithm("ppo")({"kl_coef": cfg.ppo_kl_coef, "max_new_tokens": cfg.max_new_tokens,
                                "ppo_epochs": cfg.ppo_epochs, "mini_batches": cfg.ppo_mini_batches},
                               oracle_fn=Oracle.score)
    st = Counter()
    train = ppo.encode(task.sample(cfg.ppo_steps * cfg.ppo_prompts_per_step, seed=cfg.seed + 7), tok, cfg.max_length, st)
    evald = ppo.encode(task.sample(128, seed=cfg.seed + 8), tok, cfg.max_length, st)
    models = {"policy": load_model(sft_dir), "reference": load_model(sft_dir), "value": load_model(rm_dir),
              "reward": rm}
    log(f"{tag} PPO (KL coefficient {cfg.ppo_kl_coef}, {cfg.ppo_epochs} epochs x {cfg.ppo_mini_batches} mini-batches) "
        f"from the SFT model against the reward model, {cfg.ppo_steps} steps of {cfg.ppo_prompts_per_step} prompts")
    bs = min(32, cfg.ppo_prompts_per_step)
    tr = Trainer(ppo, models, tok, train, evald, _stage_cfg(
        cfg, "ppo", max_steps=cfg.ppo_steps, batch_size=bs, grad_accum=max(cfg.ppo_prompts_per_step // bs, 1),
        lr=cfg.ppo_lr, warmup_steps=0, eval_every=max(cfg.ppo_steps // 3, 1)))
    s = tr.fit()
    timings["ppo"] = time.time() - t
    plot_monitors(os.path.join(cfg.output_dir, "ppo", "metrics.jsonl"), os.path.join(cfg.output_dir, "ppo", "monitors.png"),
                  title=f"PPO monitors (KL coefficient {cfg.ppo_kl_coef})")
    flagged = ppo.monitor.flagged_steps
    log(f"      held-out reward-model score {s['eval'].get('score', float('nan')):.3f}, oracle "
        f"{s['eval'].get('oracle', float('nan')):.3f}; over-optimisation flagged at steps {flagged or 'none'}  "
        f"({timings['ppo']:.0f}s)")
    return models["policy"].eval()


def _rm_scores(rm, tok, prompts, responses, device):
    from fastalign.data import collate as C

    out = []
    for i in range(0, len(prompts), 128):
        exs = []
        for p, r in zip(prompts[i: i + 128], responses[i: i + 128]):
            ids = tok(C.prompt_text(tok, p) + C.completion_text(tok, p, r), add_special_tokens=False)["input_ids"]
            exs.append({"input_ids": ids, "labels": ids})
        b = C.collate_lm(exs, tok.pad_token_id)
        out.append(rm.score(b["input_ids"].to(device), b["attention_mask"].to(device)).cpu())
    return torch.cat(out)


def format_table(results: dict) -> str:
    cols = ["oracle score", "oracle score (greedy)", "win rate vs SFT", "KL to ref", "entropy", "mean length",
            "reward model"]
    head = f"{'model':6s} " + " ".join(f"{c:>22s}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:6s} " + " ".join(f"{r[c]:>22.3f}" for c in cols))
    return "\n".join(lines)


def _plot(out_dir, results, plot_metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastalign.trainer.metrics import read_jsonl

    panels = [("sft", "loss"), ("reward", "accuracy"), ("dpo", "rewards/margins"), ("ppo", "rollout/reward")]
    panels = [(st, k) for st, k in panels if os.path.exists(os.path.join(out_dir, st, "metrics.jsonl"))]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.4))
    for ax, (stage, key) in zip(axes[:-1], panels):
        rows = read_jsonl(os.path.join(out_dir, stage, "metrics.jsonl"))
        for split in ("train", "eval"):
            pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if split == "eval" else None, ms=3, label=split)
        ax.set_title(f"{stage}: {key}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    names = list(results)
    ax = axes[-1]
    ax.bar(names, [results[n]["oracle score"] for n in names], color=["#888", "#3a7", "#37a"][: len(names)])
    ax.set_ylim(0, 1)
    ax.set_title("oracle score (held-out, T=1)", fontsize=9)
    for i, n in enumerate(names):
        ax.text(i, results[n]["oracle score"] + 0.02, f"{results[n]['oracle score']:.3f}", ha="center", fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "demo.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
