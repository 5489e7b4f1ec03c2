"""Plots of the RLHF monitors (computed and logged by the online algorithms: see
fastalign/algorithms/monitors.py) from a run's metrics.jsonl."""

from __future__ import annotations

from fastalign.trainer.metrics import read_jsonl


def plot_monitors(jsonl_path: str, png_path: str, *, prefix: str = "rollout/", title: str | None = None) -> str:
    """The monitor panels of a run's metrics.jsonl: proxy reward vs oracle score (flagged
    over-optimisation steps shaded), KL to the reference, entropy and distinct-n, and the
    reward-length correlation. Returns png_path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(jsonl_path) if r.get("split", "train") == "train"]

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return tuple(zip(*pts)) if pts else ((), ())

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
    ax = axes[0]
    ax.plot(*series(prefix + "reward"), color="#c44", label="reward model (proxy)")
    ax.set_ylabel("proxy", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(*series(prefix + "oracle"), color="#37a", label="oracle (true)")
    ax2.set_ylabel("oracle", fontsize=8)
    for r in rows:
        if r.get("overoptimisation"):
            ax.axvspan(r["step"] - 0.5, r["step"] + 0.5, color="#fc6", alpha=0.4, lw=0)
    ax.set_title("proxy vs oracle (shaded: flagged)", fontsize=9)
    fig.legend(*[sum(x, []) for x in zip(ax.get_legend_handles_labels(), ax2.get_legend_handles_labels())],
               loc="upper left", fontsize=7)
    axes[1].plot(*series(prefix + "kl"))
    axes[1].set_title("KL to reference (nats / response)", fontsize=9)
    axes[2].plot(*series(prefix + "entropy"), label="entropy (nats/token)")
    axes[2].plot(*series(prefix + "distinct_2"), label="distinct-2")
    axes[2].set_title("mode collapse", fontsize=9)
    axes[2].legend(fontsize=7)
    axes[3].plot(*series(prefix + "length_corr"), label="corr(reward, length)")
    axes[3].plot(*series(prefix + "length"), label="mean length")
    axes[3].set_title("length bias", fontsize=9)
    axes[3].legend(fontsize=7)
    for a in axes:
        a.set_xlabel("step", fontsize=8)
        a.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path
