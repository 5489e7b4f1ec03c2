"""The benchmark runner: `fastalign bench [--quick] [--out DIR] [--only FAMILY[,FAMILY]]`
(also `python -m benchmarks ...` in a clone). `fastalign bench --e2e` / `--e2e-quick` runs the
end-to-end training benchmark instead (fastalign/benchmarks/e2e.py, its own options).

Runs every suite (fastalign/benchmarks/bench_<family>.py), each case's contenders interleaved (CPU) or with
triton.testing.do_bench (CUDA), then the CPU peak-memory pass in a child process, and writes to
--out (default bench_out/): results.json, results.md (table of ratios fastalign ÷ alternative,
same run, same machine, medians; targets PASS/FAIL) and one <family>.png per suite (time and
memory against size). --quick: tiny shapes, few rounds, every contender's code path (CI smoke).

Exit status: 0, or 1 if a fastalign contender raised (a broken code path); missing peers and an
environment where torch.compile cannot work are skipped with a note, never an error. With
--strict, a FAIL target also gives 1.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from fastalign.benchmarks import _report
from fastalign.benchmarks._common import (
    Skip, build_contenders, case_record, cuda_extra_peak, fmt_time, summarize, time_cuda,
    time_interleaved, warm_up,
)

FAMILIES = ("logprobs", "rl", "preference", "linear_logprobs", "advantages", "unpaired", "ref_free")


def _measure_bandwidth(device: str, quick: bool) -> dict:
    """Streaming read bandwidth (a sum over 512 MiB) and copy bandwidth (read + write bytes)."""
    out = {}
    n = (2**26 if quick else 2**29 if device == "cpu" else 2**30) // 4
    try:
        x = torch.ones(n, device=device)
        y = torch.empty_like(x)
        if device == "cpu":
            def med(fn):
                ts = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                return sorted(ts)[len(ts) // 2]
            y.copy_(x)
            out["stream_read_bandwidth"] = x.numel() * 4 / med(lambda: x.sum())
            out["copy_bandwidth"] = 2 * x.numel() * 4 / med(lambda: y.copy_(x))
        else:
            t = time_cuda({"copy": lambda: y.copy_(x), "sum": lambda: x.sum()})
            out["copy_bandwidth"] = 2 * x.numel() * 4 / t["copy"][0]
            out["stream_read_bandwidth"] = x.numel() * 4 / t["sum"][0]
        del x, y
    except Exception as exc:  # out of memory on a crowded machine: report, do not stop
        out["bandwidth_error"] = str(exc)[:200]
    return out


def _memory_pass(family: str, quick: bool, match=None, skip=()) -> dict:
    """CPU extra peak memory of every case of `family`, measured in a child process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_TOP_PAD_="0")
    # the directory holding this fastalign (a clone or site-packages): the child imports the same one
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        cmd = [sys.executable, "-m", "fastalign.benchmarks._memory", "--family", family, "--out", path] + (["--quick"] if quick else [])
        for m in match or ():
            cmd += ["-k", m]
        for n in skip:
            cmd += ["--skip", n]
        proc = subprocess.run(cmd, env=env, cwd=root)
        if proc.returncode != 0:
            return {"error": f"memory child exited with {proc.returncode}"}
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def run_family(family: str, args, device: str, ctx: dict, notes: list, checkpoint=None):
    mod = importlib.import_module(f"fastalign.benchmarks.bench_{family}")
    try:
        cases = mod.cases(args.quick, device)
    except Skip as exc:
        notes.append(f"{family}: skipped: {exc}")
        print(f"== {family}: skipped: {exc}", flush=True)
        return [], None
    if args.match:
        cases = [c for c in cases if all(m in c.id for m in args.match)]
    rounds = args.rounds or (3 if args.quick else 5)
    min_time = 0.002 if args.quick else 0.05
    records = []
    print(f"== {family}: {len(cases)} cases on {device}", flush=True)
    for case in cases:
        rec = case_record(case)
        if args.no_timing:  # peak memory only (filled in by the memory pass)
            rec["contenders"] = {n: {} for n in case.contenders if n not in args.skip}
            records.append(rec)
            continue
        t0 = time.time()
        inputs = case.make_inputs(device)
        fns, cnotes = build_contenders(case, inputs, only=[n for n in case.contenders if n not in args.skip])
        for name in args.skip:
            cnotes.setdefault(name, "skipped: --skip on the command line")
        first = warm_up(fns, cnotes, device)
        if device == "cpu":
            times = time_interleaved(fns, device, case.rounds or rounds, min_time, first, rewarm=not args.cold)
        else:
            times = time_cuda(fns, rep_ms=40 if args.quick else 100)
        for name in case.contenders:
            if name in times:
                rec["contenders"][name] = summarize(times[name])
                if device != "cpu" and not args.no_memory:
                    rec["contenders"][name]["extra_peak_bytes"] = cuda_extra_peak(fns[name])
            else:
                rec["contenders"][name] = {"note": cnotes.get(name, "not run")}
        del inputs, fns
        gc.collect()
        if device != "cpu":
            torch.cuda.empty_cache()
        records.append(rec)
        if checkpoint is not None:
            checkpoint(records)
        print(f"  {case.id}  ({time.time() - t0:.1f}s)", flush=True)
        for name, c in rec["contenders"].items():
            print(f"    {name:20s} " + (fmt_time(c["median_s"]) if "median_s" in c else c["note"]), flush=True)
    return records, mod


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--e2e" in argv or "--e2e-quick" in argv:  # the end-to-end benchmark has its own options
        from fastalign.benchmarks.e2e import main as e2e

        return e2e(argv)
    p = argparse.ArgumentParser(prog="fastalign bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few rounds: the CI smoke run (its time: benchmarks/RESULTS.md)")
    p.add_argument("--out", default="bench_out", help="output directory (default bench_out/)")
    p.add_argument("--only", action="append", help=f"families to run, comma separated: {', '.join(FAMILIES)}")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when a GPU is visible)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds per case (default 3 quick, 5 full)")
    p.add_argument("-k", dest="match", action="append", help="only cases whose id contains all of these substrings")
    p.add_argument("--cold", action="store_true",
                   help="CPU: no untimed call right before each timed one (memory re-faulted after the other contenders ran)")
    p.add_argument("--skip", action="append", default=[], help="contender names not to run (repeatable), e.g. torch.compile")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run (CPU)")
    p.add_argument("--no-timing", action="store_true", help="peak memory only (CPU: the child-process pass)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    p.add_argument("--e2e", action="store_true", help="run the end-to-end training benchmark instead (fastalign vs "
                                                      "TRL on SmolLM2-135M; see fastalign bench --e2e --help)")
    p.add_argument("--e2e-quick", action="store_true", help="its smoke run (a few minutes)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the memory child inherits it
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    families = FAMILIES
    if args.only:
        families = [f.strip() for o in args.only for f in o.split(",") if f.strip()]
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            p.error(f"unknown family {unknown}; valid: {', '.join(FAMILIES)}")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    ctx = _measure_bandwidth(device, args.quick)
    meta = {
        "quick": args.quick, "families": list(families), "argv": sys.argv[1:], "machine": _report.machine_info(device),
        **ctx,
        "timing": ("CPU: contenders interleaved in shuffled rounds, median per call, "
                   + ("cold (no untimed call before each timed call)" if args.cold else
                      "warm (each timed call right after an untimed call of the same contender)")
                   if device == "cpu" else "CUDA: triton.testing.do_bench median"),
        "memory": ("CPU: extra peak RSS (VmHWM - VmRSS, child process, glibc mmap threshold 64 KiB)"
                   if device == "cpu" else "CUDA: max_memory_allocated - memory_allocated before the call"),
    }
    records, targets, notes, mods = [], [], [], {}

    def checkpoint(recs_so_far):
        """results.json/.md after every case, so a run cut short (a timeout) still leaves them"""
        done = records + recs_so_far
        _report.write_json(os.path.join(args.out, "results.json"), meta, done, [], notes + ["partial run"])
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(_report.markdown(meta, done, [], notes + ["partial run (cut short?)"]))

    for fam in families:
        recs, mod = run_family(fam, args, device, ctx, notes, checkpoint)
        records += recs
        if mod is not None:
            mods[fam] = (mod, recs)
    if device == "cpu" and not args.no_memory and records:
        # one child process for all families: one torch import, compile caches warm
        print("== peak memory pass (child process)", flush=True)
        mem = _memory_pass(",".join(mods), args.quick, args.match, args.skip)
        if "error" in mem:
            notes.append(f"CPU peak memory not measured: {mem['error']}")
        for rec in records:
            for name, b in mem.get(rec["id"], {}).items():
                if name in rec["contenders"] and ("median_s" in rec["contenders"][name] or args.no_timing):
                    rec["contenders"][name]["extra_peak_bytes"] = b
    for fam, (mod, recs) in mods.items():
        targets += mod.targets(recs, args.quick, device, ctx)
    meta["wall_s"] = time.time() - t_start
    _report.write_json(os.path.join(args.out, "results.json"), meta, records, targets, notes)
    md = _report.markdown(meta, records, targets, notes)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    pngs = _report.plots(args.out, records)
    print("\n== targets")
    for t in targets:
        v = t["value"]
        vs = "-" if v is None else f"{v:.3g}{t['unit'] if t['unit'] == 'x' else ' ' + t['unit']}"
        print(f"  [{t['status']}] {t['issue']}: {t['target']}: {vs} (need {t['need']})"
              + (f" -- {t['detail']}" if t.get("detail") else ""))
    broken = [f"{r['id']} {n}: {c['note']}" for r in records for n, c in r["contenders"].items()
              if n in r["fastalign"] and c.get("note", "").startswith("failed")]
    for b in broken:
        print(f"  BROKEN fastalign contender: {b}")
    print(f"\nwrote {args.out}/results.json, results.md" + (", " + ", ".join(os.path.basename(x) for x in pngs) if pngs else "")
          + f" in {time.time() - t_start:.0f}s")
    if broken:
        return 1
    if args.strict and any(t["status"] == "FAIL" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
