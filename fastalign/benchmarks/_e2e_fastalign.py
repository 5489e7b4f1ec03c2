"""fastalign's contender in the end-to-end benchmark: `fastalign train ALGO` itself
(fastalign.trainer.run.run_training on a config dict plus the variant's overrides), with two
additions made from outside: a callback that records each step's end and loss, and, for GRPO,
the benchmark's reward function (a reward_fn instead of a reward model, as TRL's reward_funcs).

`check_overrides` tells whether the installed fastalign knows a variant's options (resolving
the config reads nothing heavy), so an option another branch adds shows as "not available"."""

from __future__ import annotations

from fastalign.benchmarks import _e2e_data
from fastalign.benchmarks._e2e_steps import StepLog


def config(spec: dict, data_path: str, data_format: str) -> tuple[dict, list[str]]:
    """(config dict, overrides) of this contender: the same batch, optimizer (AdamW, constant lr,
    no weight decay, clipping at 1.0 as TRL's default) and precision as the TRL contenders."""
    algo = spec["algo"]
    steps = spec["warmup"] + spec["steps"]
    precision = {"bf16": "bf16", "fp32": "fp32"}[spec["precision"]]
    trainer = {"output_dir": spec["workdir"] + "/fastalign_run", "max_steps": steps, "lr": spec["lr"],
               "weight_decay": 0.0, "betas": [0.9, 0.999], "adam_eps": 1e-8, "schedule": "constant",
               "warmup_steps": 0, "max_grad_norm": 1.0, "precision": precision, "device": spec["device"],
               "distributed": "none", "progress": False, "plot": False, "save_final": False,
               "handle_sigint": False, "log_every": 1, "eval_every": 0}
    data = {"format": data_format, "train": data_path, "max_length": spec["seq_len"]}
    algo_cfg = {}
    if algo == "grpo":
        # one prompt per step, group_size samples of it: batch = group_size sequences, updated as
        # one micro-batch (as TRL does); the old log-probs come from the sampler's pass, where it
        # gives them (TRL with num_iterations=1 reuses the update's detached log-probs: no forward)
        trainer["batch_size"] = 1
        data["max_length"] = spec["seq_len"] + spec["new_tokens"]
        algo_cfg = {"group_size": spec["batch"], "max_new_tokens": spec["new_tokens"], "beta": 0.0,
                    "temperature": 1.0, "ppo_epochs": 1, "mini_batches": 1,
                    "micro_batch_size": spec["batch"], "old_logps": "sampler"}
    else:
        trainer["batch_size"] = spec["batch"]
        if algo == "dpo":
            algo_cfg = {"beta": 0.1, "loss_type": "sigmoid", "precompute_ref_logps": False}
    cfg = {"model": {"policy": spec["model"]}, "data": data, "algo": algo_cfg, "trainer": trainer}
    return cfg, list(spec.get("overrides", ()))


def check_overrides(algo: str, overrides: list[str]) -> str | None:
    """None when the installed fastalign accepts `overrides` for `algo`, else the reason."""
    from fastalign.errors import ConfigError
    from fastalign.trainer.run import load_config, resolve_config

    try:
        resolve_config(algo, load_config(None, overrides, algorithm=algo))
    except (ConfigError, ValueError, TypeError) as e:
        return f"not available in this fastalign: {str(e).splitlines()[0][:200]}"
    return None


def run(spec: dict, data: dict, data_path: str) -> dict:
    from fastalign.trainer import run as run_mod

    log = StepLog(spec["device"])
    base_trainer, base_get = run_mod.Trainer, run_mod.get_algorithm

    class TimedTrainer(base_trainer):
        def __init__(self, *args, **kwargs):
            kwargs["callbacks"] = list(kwargs.get("callbacks", ())) + [lambda tr, m: log.step_end(m.get("loss"))]
            super().__init__(*args, **kwargs)
            if spec["algo"] == "grpo":
                log.force_new_tokens(self.models["policy"], spec["new_tokens"])

    def get_algorithm(name):
        cls = base_get(name)
        if spec["algo"] != "grpo":
            return cls

        class WithRewardFn(cls):  # the benchmark's reward function instead of a reward model
            def __init__(self, config=None, **kwargs):
                kwargs.setdefault("reward_fn", lambda prompt, response: _e2e_data.reward(response))
                super().__init__(config, **kwargs)
        return WithRewardFn

    cfg, overrides = config(spec, data_path, data["format"])
    merged = _merge(cfg, run_mod.load_config(None, overrides, algorithm=spec["algo"]))
    run_mod.Trainer, run_mod.get_algorithm = TimedTrainer, get_algorithm
    try:
        run_mod.run_training(spec["algo"], merged)
    finally:
        run_mod.Trainer, run_mod.get_algorithm = base_trainer, base_get
    return {"log": log}


def _merge(base: dict, over: dict) -> dict:
    """base with the sections of `over` (the parsed overrides) laid on top, key by key."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in over.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out
