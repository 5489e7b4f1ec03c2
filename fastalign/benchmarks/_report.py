"""Results of a run: targets, results.json, the markdown table of ratios, PNG plots, machine info."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections import defaultdict

import torch

import fastalign
from fastalign import _backends
from fastalign.benchmarks._common import fmt_bytes, fmt_time


def target(issue, name, value, need, passed, quick, unit="x", detail=None) -> dict:
    """One checked target. In --quick mode shapes are tiny, so targets are reported as n/a."""
    if quick:
        status = "n/a (quick mode)"
    elif value is None:
        status = "n/a (not measured here)"
    else:
        status = "PASS" if passed else "FAIL"
    return {"issue": issue, "target": name, "value": value, "unit": unit, "need": need, "status": status,
            "detail": detail}


def find_record(records, op, mode, **params):
    """The record of `op` in `mode` whose params include `params`, or None."""
    for r in records:
        if r["op"] == op and r["mode"] == mode and all(r["params"].get(k) == v for k, v in params.items()):
            return r
    return None


def contender(rec, name) -> dict:
    """What was measured of contender `name` in record `rec` ({} for no record, not run)."""
    return rec["contenders"].get(name, {}) if rec else {}


def median(rec, name):
    """The median seconds of contender `name` in record `rec`, or None (no record, not measured)."""
    return contender(rec, name).get("median_s")


# ---- machine and versions --------------------------------------------------------------------------


def _version(mod):
    try:
        import importlib.metadata as md

        return md.version(mod)
    except Exception:
        return None


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cpu": None, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "triton": _version("triton"), "trl": _version("trl"), "liger_kernel": _version("liger-kernel"),
        "device": device,
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["host_cpu"] = line.split(":", 1)[1].strip()
    except Exception:
        pass
    info["fastalign"] = fastalign.__version__
    info["backends"] = {k: (v["usable"], v["reason"]) for k, v in fastalign.backends().items()}
    ext = _backends.extension()
    info["cpu_isa"] = ext.cpu_capability() if ext is not None else None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---- results.json, results.md -----------------------------------------------------------------------


def _ratio_rows(rec):
    """(fastalign name, alternative name, fa, alt) for each pair where both were measured."""
    rows = []
    conts = rec["contenders"]
    for fa in rec["fastalign"]:
        if "median_s" not in conts.get(fa, {}):
            continue
        for alt, c in conts.items():
            if alt in rec["fastalign"] or "median_s" not in c:
                continue
            rows.append((fa, alt, conts[fa], c))
    return rows


def ratios(records) -> list[dict]:
    out = []
    for rec in records:
        for fa, alt, f, a in _ratio_rows(rec):
            fm, am = f.get("extra_peak_bytes"), a.get("extra_peak_bytes")
            out.append({
                "case": rec["id"], "fastalign": fa, "alternative": alt,
                "time_ratio": f["median_s"] / a["median_s"], "speedup": a["median_s"] / f["median_s"],
                "mem_ratio": (fm / am) if fm is not None and am else None,
            })
    return out


def write_json(path, meta, records, targets_, notes):
    with open(path, "w") as f:
        json.dump({"meta": meta, "cases": records, "ratios": ratios(records), "targets": targets_, "notes": notes},
                  f, indent=1, default=str)


def markdown(meta, records, targets_, notes) -> str:
    lines = [f"# fastalign benchmark results ({'quick' if meta.get('quick') else 'full'} run)", ""]
    m = meta["machine"]
    lines.append(f"- date: {m['date']}; device: {m['device']}"
                 + (f" ({m.get('gpu')})" if m.get("gpu") else f" ({m.get('host_cpu')}, {m['cpu_count']} cores, "
                                                             f"{m['torch_threads']} torch threads)"))
    lines.append(f"- torch {m['torch']}, triton {m['triton']}, trl {m['trl']}, liger-kernel {m['liger_kernel']}, "
                 f"fastalign {m.get('fastalign')}" + (f", CPU ISA {m['cpu_isa']}" if m.get("cpu_isa") else ""))
    for k in ("stream_read_bandwidth", "copy_bandwidth"):
        if meta.get(k):
            lines.append(f"- measured {k.replace('_', ' ')}: {meta[k] / 1e9:.1f} GB/s")
    lines.append(f"- timing: {meta['timing']}")
    lines.append(f"- memory: {meta['memory']}")
    lines.append("- ratios: fastalign ÷ alternative of the medians in the same run (time < 1 and memory < 1 "
                 "favour fastalign); speedup = alternative ÷ fastalign time.")
    lines.append("")
    if targets_:
        lines += ["## Targets", "", "| issue | target | measured | need | status |", "|---|---|---|---|---|"]
        for t in targets_:
            v = t["value"]
            vs = "-" if v is None else (f"{v:.2f}{t['unit']}" if t["unit"] == "x" else f"{v:.3g} {t['unit']}")
            if t.get("detail"):
                vs += f" ({t['detail']})"
            lines.append(f"| {t['issue']} | {t['target']} | {vs} | {t['need']} | **{t['status']}** |")
        lines.append("")
    by_family = defaultdict(list)
    for r in records:
        by_family[r["family"]].append(r)
    for fam, recs in by_family.items():
        lines += [f"## {fam}", "",
                  "| op | mode | case | fastalign | alternative | fastalign time | alt time | time fa÷alt | speedup "
                  "| fa extra peak MiB | alt extra peak MiB | mem fa÷alt |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for rec in recs:
            for fa, alt, f, a in _ratio_rows(rec):
                fm, am = f.get("extra_peak_bytes"), a.get("extra_peak_bytes")
                mr = f"{fm / am:.3f}" if fm is not None and am else "-"
                lines.append(
                    f"| {rec['op']} | {rec['mode']} | {' '.join(f'{k}={v}' for k, v in rec['params'].items())} | {fa} "
                    f"| {alt} | {fmt_time(f['median_s'])} | {fmt_time(a['median_s'])} "
                    f"| {f['median_s'] / a['median_s']:.3f} | {a['median_s'] / f['median_s']:.2f}x "
                    f"| {fmt_bytes(fm)} | {fmt_bytes(am)} | {mr} |")
        skipped = sorted({f"{n}: {c['note']}" for rec in recs for n, c in rec["contenders"].items() if c.get("note")})
        if skipped:
            lines += ["", "Not measured:"] + [f"- {s}" for s in skipped]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------------------


def plots(out_dir, records) -> list[str]:
    """One PNG per family: for each plot group, time and extra peak memory against size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    by_family = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_family[r["family"]][r["group"]].append(r)
    for fam, groups in by_family.items():
        fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.2 * len(groups)), squeeze=False)
        for row, (group, recs) in enumerate(groups.items()):
            recs = sorted(recs, key=lambda r: r["size"])
            names = list(dict.fromkeys(n for r in recs for n in r["contenders"]))
            for col, key, ylabel, scale in ((0, "median_s", "time (ms)", 1e3), (1, "extra_peak_bytes", "extra peak (MiB)", 2**-20)):
                ax = axes[row][col]
                for n in names:
                    pts = [(r["size"], r["contenders"][n][key] * scale) for r in recs
                           if r["contenders"].get(n, {}).get(key) is not None]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, [max(y, 1e-3) for y in ys], marker="o", label=n,
                                linewidth=2.5 if n.startswith("fastalign") else 1.2)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel(recs[0]["size_name"])
                ax.set_ylabel(ylabel)
                ax.set_title(group, fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                if row == 0 and col == 0:
                    ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{fam}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
