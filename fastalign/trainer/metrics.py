"""Metrics: one JSON object per line (metrics.jsonl) and a PNG plot of every numeric series."""

from __future__ import annotations

import json
import math
import os


class MetricsLog:
    """metrics.jsonl, plus the experiment trackers of `reporters` (reporting.py) for every record."""

    def __init__(self, path: str, reporters=()):
        self.path = path
        self.reporters = list(reporters)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop entries logged after `step` by the interrupted run."""
        if not os.path.exists(self.path):
            return
        keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
        for r in self.reporters:
            r.write(record)

    def close(self) -> None:
        for r in self.reporters:
            r.close()
        self.reporters = []


def _clean(r):
    out = {}
    for k, v in r.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)  # JSON has no NaN/inf; keep the fact visible
        out[k] = v
    return out


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(jsonl_path: str, png_path: str | None = None, *, title: str | None = None,
                 keys: list[str] | None = None) -> str:
    """One panel per numeric metric (train and eval series together); returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = png_path or os.path.splitext(jsonl_path)[0] + ".png"
    rows = read_jsonl(jsonl_path)
    skip = {"step", "split", "time", "epoch", "lr_scale"}
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for r in rows:
        split = r.get("split", "train")
        for k, v in r.items():
            if k in skip or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if keys is not None and k not in keys:
                continue
            xs, ys = series.setdefault(k, {}).setdefault(split, ([], []))
            xs.append(r.get("step", len(xs)))
            ys.append(v)
    names = sorted(series)
    n = max(1, len(names))
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 2.8 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for split, (xs, ys) in sorted(series[name].items()):
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=split)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(series[name]) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
