"""Results of the end-to-end benchmark: the issue's targets (PASS/FAIL), e2e.json, the markdown
tables (contenders per algorithm and precision, fastalign's variants, rollout throughput), the
TRL stock vs patched losses, and e2e.png."""

from __future__ import annotations

import json
import os

from fastalign.benchmarks._report import target

ISSUE = "19"


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def _find(records, group, contender, variant=None):
    for r in records:
        if r.get("group") == group and r.get("contender") == contender and r.get("variant") == variant:
            return r
    return None


def _measured(rec) -> bool:
    return rec is not None and rec.get("tokens_per_s") is not None


def note_of(rec) -> str:
    return rec.get("error") and f"failed: {rec['error']}" or rec.get("note") or ""


def one_line(rec) -> str:
    if rec["kind"] == "rollout":
        parts = [f"{n} {v['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in v else f"{n}: {v.get('note')}"
                 for n, v in (rec.get("rollout") or {}).items()]
        return f"{rec['id']}: " + ("; ".join(parts) or note_of(rec))
    if not _measured(rec):
        return f"{rec['id']}: {note_of(rec)}"
    return (f"{rec['id']}: {rec['median_step_s']:.2f} s/step, {rec['tokens_per_s']:.0f} tok/s, peak "
            f"{_mib(rec.get('peak_bytes'))} MiB, losses {[round(x, 5) for x in rec.get('losses', [])]}")


def _cells(r) -> str:
    """s/step | tokens/s | peak MiB | of a run (dashes when it was not measured)."""
    if not _measured(r):
        return "- | - | - | "
    return f"{r['median_step_s']:.2f} | {r['tokens_per_s']:.0f} | {_mib(r.get('peak_bytes'))} | "


def _ratio(a, b, key):
    if _measured(a) and _measured(b) and a.get(key) and b.get(key):
        return a[key] / b[key]
    return None


def targets(records, quick: bool) -> list[dict]:
    """The issue's targets, each in the same precision for all contenders: fastalign's DPO/GRPO
    >= TRL + patch_trl; vs TRL stock >= 4x tokens/s (bf16 autocast) / >= 1.25x (fp32) with <= 0.8x
    its peak memory; SFT >= 1.2x TRL stock; the sampler >= 2x generate at batch 64."""
    out = []
    groups = sorted({r["group"] for r in records if r["kind"] == "train" and not r.get("variant")})
    for g in groups:
        algo, prec = g.split()
        fa, stock, patched = (_find(records, g, c) for c in ("fastalign", "trl", "trl+patch"))
        if stock is None and patched is None:
            continue
        speed = _ratio(fa, stock, "tokens_per_s")
        if algo == "sft":
            out.append(target(ISSUE, f"SFT {prec}: fastalign tokens/s vs TRL stock", speed, ">= 1.2x",
                              speed is not None and speed >= 1.2, quick))
            continue
        need = 4.0 if prec == "bf16" else 1.25
        out.append(target(ISSUE, f"{algo.upper()} {prec}: fastalign tokens/s vs TRL stock", speed, f">= {need}x",
                          speed is not None and speed >= need, quick))
        mem = (fa["peak_bytes"] / stock["peak_bytes"]) if _measured(fa) and _measured(stock) and stock.get("peak_bytes") else None
        out.append(target(ISSUE, f"{algo.upper()} {prec}: fastalign peak memory vs TRL stock", mem, "<= 0.8x",
                          mem is not None and mem <= 0.8, quick))
        vs_patch = _ratio(fa, patched, "tokens_per_s")
        out.append(target(ISSUE, f"{algo.upper()} {prec}: fastalign tokens/s vs TRL + patch_trl", vs_patch, ">= 1x",
                          vs_patch is not None and vs_patch >= 1.0, quick))
    for r in records:
        if r["kind"] == "rollout" and r["id"].endswith(" 64"):
            ro = r.get("rollout") or {}
            s, g = ro.get("fastalign.FastSampler", {}), ro.get("transformers.generate", {})
            v = s["tokens_per_s"] / g["tokens_per_s"] if "tokens_per_s" in s and "tokens_per_s" in g else None
            out.append(target(ISSUE, f"sampler {_rollout_precision(r)}: tokens/s vs generate, batch 64", v, ">= 2x",
                              v is not None and v >= 2, quick, detail=None if v is not None else s.get("note")))
    return out


def _rollout_precision(rec) -> str:
    """fp32 | bf16 of a rollout record (its id: 'rollout <precision> batch N')."""
    return rec["id"].split()[1]


def loss_lines(records) -> list[str]:
    """TRL stock vs TRL + patch_trl: every step's loss (warm-up included) and the largest gap."""
    lines = []
    for g in sorted({r["group"] for r in records if r["kind"] == "train" and not r.get("variant")}):
        s, p = _find(records, g, "trl"), _find(records, g, "trl+patch")
        if s is None or p is None or not s.get("losses") or not p.get("losses"):
            continue
        gap = max(abs(a - b) for a, b in zip(s["losses"], p["losses"]))
        lines.append(f"- {g}: stock {[f'{x:.6g}' for x in s['losses']]}, patched {[f'{x:.6g}' for x in p['losses']]}, "
                     f"max |diff| {gap:.3g}")
    return lines


def markdown(meta, records, targets_) -> str:
    m, st = meta["machine"], meta["settings"]
    dev = m.get("gpu") or f"{m.get('host_cpu')}, {m['cpu_count']} cores, {m['torch_threads']} torch threads"
    lines = [f"# fastalign end-to-end benchmark ({'quick' if meta['quick'] else 'full'} run)", "",
             f"- date: {m['date']}; device: {m['device']} ({dev}); model: {meta['model']}",
             f"- torch {m['torch']}, trl {m['trl']}, fastalign {m.get('fastalign')}",
             f"- batch {st['batch']} x {st['seq_len']} tokens (GRPO: {st['batch']} completions of {st['new_tokens']} "
             f"new tokens to a prompt of <= {st['prompt_len']}); {st['warmup']} warm-up step(s), median of "
             f"{st['steps']} measured step(s); memory: "
             + ("max_memory_allocated" if m["device"].startswith("cuda") else "peak RSS of the contender's own process"),
             "- a GRPO step, every contender: sampling (`generate`, exactly the new tokens above), the same Python "
             "reward, one update; fastalign also runs a no-grad forward for the old log-probs (TRL, num_iterations=1, "
             "reuses the update's)",
             "- speed = fastalign tokens/s / the other's (same run); mem = fastalign peak / the other's", ""]
    if targets_:
        lines += ["## Targets", "", "| target | measured | need | status |", "|---|---|---|---|"]
        for t in targets_:
            v = "-" if t["value"] is None else f"{t['value']:.2f}x"
            lines.append(f"| {t['target']} | {v}{' (' + t['detail'] + ')' if t.get('detail') else ''} | {t['need']} "
                         f"| **{t['status']}** |")
        lines.append("")
    train = [r for r in records if r["kind"] == "train" and not r.get("variant")]
    if train:
        lines += ["## Training steps", "", "| algo | precision | contender | s/step | tokens/s | peak MiB | "
                  "fastalign speed vs this | fastalign mem / this | note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            fa = _find(records, r["group"], "fastalign")
            sp, mem = _ratio(fa, r, "tokens_per_s"), _ratio(fa, r, "peak_bytes")
            lines.append(f"| {r['algo']} | {r['precision']} | {r['contender']} | " + _cells(r)
                         + (f"{sp:.2f}x | {mem:.2f}" if sp and r is not fa else "- | -") + f" | {note_of(r)[:160]} |")
        lines.append("")
    variants = [r for r in records if r.get("variant")]
    if variants:
        lines += ["## fastalign's trainer with and without each variant", "",
                  "| algo | precision | variant | s/step | tokens/s | peak MiB | speed with / without | mem with / without "
                  "| note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in variants:
            plain = _find(records, r["group"].replace(" variants", ""), "fastalign")
            sp, mem = _ratio(r, plain, "tokens_per_s"), _ratio(r, plain, "peak_bytes")
            lines.append(f"| {r['algo']} | {r['precision']} | {r['variant']} | " + _cells(r)
                         + (f"{sp:.2f}x | {mem:.2f}" if sp else "- | -") + f" | {note_of(r)[:160]} |")
        lines.append("")
    ll = loss_lines(records)
    if ll:
        lines += ["## Losses, TRL stock vs TRL + patch_trl (every step, warm-up included)", ""] + ll + [""]
    ro = [r for r in records if r["kind"] == "rollout"]
    if ro:
        lines += ["## Rollout throughput (temperature 1; bf16: both engines on the model cast to bf16)", "",
                  "| precision | batch | sampler | tokens/s | tokens | vs generate | note |", "|---|---|---|---|---|---|---|"]
        for r in ro:
            res = r.get("rollout") or {}
            base = res.get("transformers.generate", {}).get("tokens_per_s")
            for name, v in res.items():
                tps = v.get("tokens_per_s")
                lines.append(f"| {_rollout_precision(r)} | {r['id'].split()[-1]} | {name} | "
                             + (f"{tps:.0f} | {v['tokens']} | {tps / base:.2f}x |" if tps and base else "- | - | - |")
                             + f" {v.get('note', '')} |")
            if not res:
                lines.append(f"| {_rollout_precision(r)} | {r['id'].split()[-1]} | - | - | - | - | {note_of(r)} |")
        lines.append("")
    return "\n".join(lines)


def write(out_dir, meta, records, targets_, partial=False) -> None:
    with open(os.path.join(out_dir, "e2e.json"), "w") as f:
        json.dump({"meta": meta, "runs": records, "targets": targets_, "partial": partial}, f, indent=1, default=str)
    with open(os.path.join(out_dir, "e2e.md"), "w") as f:
        f.write(markdown(meta, records, targets_) + ("\n(partial run)\n" if partial else ""))


def plot(out_dir, records) -> str | None:
    """e2e.png: tokens/s and peak memory per contender for each algorithm and precision, the
    variants, and the rollout throughput (bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in records if r["kind"] == "train" and _measured(r)]
    ro = [r for r in records if r["kind"] == "rollout" and r.get("rollout")]
    if not train and not ro:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    labels = [r["id"].replace(" + ", "\n+ ") for r in train]
    colors = ["tab:green" if r["contender"] == "fastalign" else "tab:blue" if r["contender"] == "trl" else "tab:orange"
              for r in train]
    for ax, key, scale, title in ((axes[0], "tokens_per_s", 1, "tokens/s per optimizer step"),
                                  (axes[1], "peak_bytes", 2**-20, "peak memory (MiB)")):
        ax.barh(range(len(train)), [(r.get(key) or 0) * scale for r in train], color=colors)
        ax.set_yticks(range(len(train)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        if key == "tokens_per_s":
            ax.set_xscale("log")  # GRPO's tokens/s (sampling included) is far below SFT's and DPO's
    names, vals = [], []
    for r in ro:
        for n, v in r["rollout"].items():
            if "tokens_per_s" in v:
                names.append(f"{n}\n{r['id']}")
                vals.append(v["tokens_per_s"])
    axes[2].bar(range(len(vals)), vals, color=["tab:green" if "fastalign" in n else "tab:blue" for n in names])
    axes[2].set_xticks(range(len(vals)))
    axes[2].set_xticklabels(names, fontsize=6)
    axes[2].set_title("rollout tokens/s", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "e2e.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
