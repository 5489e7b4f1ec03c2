"""What each `fastalign` subcommand does (the parser and the error handling are in cli.py)."""

from __future__ import annotations

import platform
import sys


def info(_args) -> int:
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


def list_algorithms(_args) -> int:
    from fastalign.algorithms import get_algorithm, list_algorithms as registered

    for name, doc in registered().items():
        cls = get_algorithm(name)
        print(f"{name:10s} {doc}")
        print(f"{'':10s} data: {cls.data_kind}; models: {', '.join(cls.models)}; origin: {cls.__module__}")
    return 0


def list_configs(_args) -> int:
    from fastalign import configs

    for name, path in configs.packaged().items():
        about, usage = configs.describe(path)
        print(f"{name:18s} {about}")
        for line in usage:
            print(f"{'':18s}   {line}")
    print(f"\n(in {configs.CONFIG_DIR}; data named bundled:NAME is in {configs.BUNDLED_DIR})")
    return 0


def train(args) -> int:
    """Also the entry point of each process under `torchrun --nproc_per_node N -m fastalign train
    ...` (DDP by default, trainer.distributed=fsdp for FSDP2); rank 0 prints."""
    from fastalign.trainer import distributed
    from fastalign.trainer.run import format_config, load_config, run_training

    cfg = load_config(args.config, args.overrides, algorithm=args.algorithm)
    if args.print_config:
        print(format_config(args.algorithm, cfg), end="")
        return 0
    if cfg.get("algorithm") not in (None, args.algorithm) and distributed.is_main():
        print(f"note: the config says algorithm {cfg['algorithm']!r}; training {args.algorithm!r} as asked")
    try:
        summary = run_training(args.algorithm, cfg)
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


def demo(args) -> int:
    import dataclasses

    import yaml

    from fastalign.errors import ConfigError
    from fastalign.models.loading import check_model_name
    from fastalign.options import build_config
    from fastalign.recipes import demo as tiny_demo
    from fastalign.recipes import pretrained_demo

    if args.model == "tiny":
        config_class, run = tiny_demo.DemoConfig, tiny_demo.run_demo
    else:  # a pretrained chat model: its own recipe and defaults
        check_model_name(args.model, "demo --model")
        config_class, run = pretrained_demo.PretrainedDemoConfig, pretrained_demo.run_pretrained_demo
    known = {f.name for f in dataclasses.fields(config_class)} - {"model"}
    values = dict(seed=args.seed, device=args.device)
    if args.model != "tiny":
        values["model"] = args.model
    if args.output_dir is not None:
        values["output_dir"] = args.output_dir
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"demo --set takes KEY=VALUE with KEY one of {sorted(known)}; got {item!r}")
        values[key] = yaml.safe_load(value)
        if key == "stages" and not isinstance(values[key], list):
            values[key] = [values[key]]
    run(build_config(config_class, values))
    return 0
