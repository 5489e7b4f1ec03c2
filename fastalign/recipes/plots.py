"""The demo's summary figure: one training curve per stage that ran, and the oracle's score of
each policy."""

from __future__ import annotations

import os

from fastalign.trainer.metrics import read_jsonl

# (stage, metric) drawn when <output_dir>/<stage>/metrics.jsonl exists
PANELS = [("sft", "loss"), ("reward", "accuracy"), ("dpo", "rewards/margins"), ("ppo", "rollout/reward")]


def plot_demo(out_dir: str, results: dict) -> str:
    """Writes <out_dir>/demo.png and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(st, k) for st, k in PANELS if os.path.exists(os.path.join(out_dir, st, "metrics.jsonl"))]
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
