"""The `fastalign` command line: `fastalign info` (more subcommands join as they are built)."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(_args) -> int:
    import torch

    import fastalign
    from fastalign import _backends

    print(f"fastalign {fastalign.__version__}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except ImportError:
        print("triton    not installed")
    try:
        from fastalign import _build_info as info

        print(f"_C built  for torch {info.TORCH_VERSION}, CUDA kernels: {info.WITH_CUDA}"
              + (f" (CUDA {info.CUDA_VERSION}, arch {info.CUDA_ARCH_LIST or 'default'})" if info.WITH_CUDA else ""))
    except ImportError:
        print("_C built  no")
    ext = _backends.extension()
    if ext is not None:
        print(f"CPU ISA   {ext.cpu_capability()}")
    print("backends:")
    for name, rep in fastalign.backends().items():
        state = f"usable on {', '.join(rep['devices'])}" if rep["usable"] else "unusable"
        print(f"  {name:7s} {state}" + (f" -- {rep['reason']}" if rep["reason"] else ""))
    return 0


def _list(_args) -> int:
    from fastalign.algorithms import get_algorithm, list_algorithms

    for name, doc in list_algorithms().items():
        cls = get_algorithm(name)
        print(f"{name:10s} {doc}")
        print(f"{'':10s} data: {cls.data_kind}; models: {', '.join(cls.models)}; origin: {cls.__module__}")
    return 0


def _train(args) -> int:
    """Also the entry point of each process under `torchrun --nproc_per_node N -m fastalign train
    ...` (DDP by default, trainer.distributed=fsdp for FSDP2); rank 0 prints."""
    from fastalign.trainer import distributed
    from fastalign.trainer.checkpoint import CheckpointError
    from fastalign.trainer.run import load_config, run_training

    cfg = load_config(args.config, args.overrides)
    if cfg.get("algorithm") not in (None, args.algorithm) and distributed.is_main():
        print(f"note: the config says algorithm {cfg['algorithm']!r}; training {args.algorithm!r} as asked")
    try:
        summary = run_training(args.algorithm, cfg)
    except CheckpointError as e:  # a damaged or unsafe checkpoint: the message names the file
        raise SystemExit(f"fastalign train: trainer.resume_from: {e}") from None
    finally:
        distributed.shutdown()
    if not distributed.is_main():
        return 130 if summary["interrupted"] else 0
    state = "interrupted (Ctrl-C), checkpoint saved" if summary["interrupted"] else "done"
    print(f"{args.algorithm}: {state} at step {summary['step']}; checkpoint {summary['checkpoint']}")
    if summary["eval"]:
        print("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()))
    if summary["plot"]:
        print(f"plot: {summary['plot']}")
    return 130 if summary["interrupted"] else 0


def _demo(args) -> int:
    import dataclasses

    import yaml

    from fastalign.algorithms.base import build_config
    from fastalign.trainer.demo import DemoConfig, run_demo

    known = {f.name for f in dataclasses.fields(DemoConfig)}
    values = dict(output_dir=args.output_dir, seed=args.seed, device=args.device)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"fastalign demo: --set takes KEY=VALUE with KEY one of {sorted(known)}; got {item!r}")
        values[key] = yaml.safe_load(value)
        if key == "stages" and not isinstance(values[key], list):
            values[key] = [values[key]]
    try:
        config = build_config(DemoConfig, values)
    except ValueError as e:
        raise SystemExit(f"fastalign demo: --set: {e}") from None
    run_demo(config)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` goes to the benchmark runner as is
        from fastalign.bench import main as bench

        return bench(argv[1:])
    parser = argparse.ArgumentParser(prog="fastalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="run the benchmark suite (= python -m benchmarks; see fastalign bench --help)")
    sub.add_parser("info", help="versions, backends and why any is unusable").set_defaults(func=_info)
    sub.add_parser("list", help="the registered algorithms (built-in and plugins)").set_defaults(func=_list)
    p = sub.add_parser("train", help="train with a registered algorithm from a YAML/JSON config")
    p.add_argument("algorithm", help="a name from `fastalign list`")
    p.add_argument("--config", help="YAML/JSON file with sections model, data, algo, trainer")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. trainer.max_steps=20")
    p.set_defaults(func=_train)
    p = sub.add_parser("demo", help="SFT -> reward model -> DPO and PPO on the bundled task, judged by its oracle")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any DemoConfig field (fastalign/trainer/demo.py), e.g. --set ppo_kl_coef=0 "
                        "--set stages=[ppo]; repeatable")
    p.set_defaults(func=_demo)
    # overrides may come after options (train sft --config f.yaml trainer.lr=1e-4): collect them
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "train" or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args.func(args)
