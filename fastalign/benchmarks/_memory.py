"""Child process that measures CPU extra peak memory for one family's cases (see _common's
docstring for the method). Started by the runner with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_
set; writes {case id: {contender: bytes}} as JSON to --out."""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import sys

from fastalign.benchmarks._common import Skip, build_contenders, cpu_extra_peak, cpu_rss_tracking_ok, warm_up


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--family", required=True, help="comma-separated families")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("-k", dest="match", action="append")
    p.add_argument("--skip", action="append", default=[])
    args = p.parse_args(argv)
    reason = cpu_rss_tracking_ok()
    if reason is not None:
        json.dump({"error": reason}, open(args.out, "w"))
        return 0
    result = {}
    cases = []
    for family in args.family.split(","):
        mod = importlib.import_module(f"fastalign.benchmarks.bench_{family}")
        try:
            cases += mod.cases(args.quick, "cpu")
        except Skip:
            pass
    if args.match:
        cases = [c for c in cases if all(m in c.id for m in args.match)]
    for case in cases:
        inputs = case.make_inputs("cpu")
        # --quick (CI smoke): no second round of Inductor compilations in this child
        fns, notes = build_contenders(case, inputs, only=[n for n in case.contenders if n not in args.skip
                                                          and not (args.quick and n == "torch.compile")])
        row = {}
        for name, fn in fns.items():
            one = {name: fn}
            warm_up(one, notes, "cpu", calls=1)
            if name not in one:
                continue
            row[name] = min(cpu_extra_peak(fn) for _ in range(args.repeats))
            del one
            gc.collect()
        result[case.id] = row
        del inputs, fns
        gc.collect()
        print(f"  memory {case.id}: " + ", ".join(f"{n} {b / 2**20:.1f} MiB" for n, b in row.items()),
              file=sys.stderr, flush=True)
    json.dump(result, open(args.out, "w"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
