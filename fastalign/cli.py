"""The `fastalign` command line: info, list, configs, train, demo, bench.

A mistake in what the user asked for -- an unknown option or value out of range, a missing or
malformed data file, an unknown model or algorithm name, nothing to resume from, a damaged
checkpoint -- prints `fastalign: error: <message>` on stderr and exits with status 2, as
argparse does for its own errors; FASTALIGN_DEBUG=1 lets the traceback through. These are the
exceptions derived from fastalign.errors.UserError (CheckpointError among them); anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from fastalign import commands
from fastalign.errors import UserError, message

USAGE_ERROR = 2  # argparse's status for a bad command line; a bad config is the same kind of mistake


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, UserError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastalign", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="run the benchmark suite (see fastalign bench --help)")
    sub.add_parser("info", help="versions, backends and why any is unusable").set_defaults(func=commands.info)
    sub.add_parser("list", help="the registered algorithms (built-in and plugins)").set_defaults(
        func=commands.list_algorithms)
    sub.add_parser("configs", help="the packaged training configs (names for train --config)").set_defaults(
        func=commands.list_configs)
    p = sub.add_parser("train", help="train with a registered algorithm from a YAML/JSON config",
                       epilog="--print-config shows every option of every section with its default and help.")
    p.add_argument("algorithm", help="a name from `fastalign list`")
    p.add_argument("--config", help="a YAML/JSON file, or the name of a packaged config (`fastalign configs`)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every option, default and help) and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. trainer.max_steps=20")
    p.set_defaults(func=commands.train)
    p = sub.add_parser("demo", help="SFT -> reward model -> DPO and PPO on the bundled task, judged by its oracle; "
                                    "--model NAME: SFT -> GRPO on a pretrained chat model")
    p.add_argument("--model", default="tiny",
                   help="tiny (the bundled 0.3M model, trained from scratch), or a pretrained chat model: "
                        "smollm2-135m-instruct, a local model directory or a .gguf file (the recipe of "
                        "fastalign/recipes/pretrained_demo.py)")
    p.add_argument("--output-dir", default=None, help="default: runs/demo (tiny), runs/demo_pretrained (--model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any DemoConfig field (fastalign/recipes/demo.py), e.g. --set ppo_kl_coef=0 "
                        "--set stages=[ppo], or with --model a PretrainedDemoConfig field "
                        "(fastalign/recipes/pretrained_demo.py), e.g. --set grpo_steps=10; repeatable")
    p.set_defaults(func=commands.demo)
    return parser


def _run(argv) -> int:
    if argv[:1] == ["bench"]:  # everything after `bench` goes to the benchmark runner as is
        from fastalign.bench import main as bench

        return bench(argv[1:])
    parser = _parser()
    # overrides may come after options (train sft --config f.yaml trainer.lr=1e-4): collect them
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "train" or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args.func(args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except Exception as e:
        if not is_user_error(e) or os.environ.get("FASTALIGN_DEBUG", "") == "1":
            raise
        print(f"fastalign: error: {message(e)}", file=sys.stderr)
        return USAGE_ERROR
