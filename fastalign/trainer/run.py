"""One training run from a config file: what `fastalign train <algorithm> --config FILE.yaml` does.

Config layout (YAML or JSON; every section optional; `fastalign train ALGO --print-config` shows
every option with its default and help):

    model:   ModelConfig    (fastalign/trainer/config.py)   policy, reference, reward, value, tiny
    data:    DataConfig     format, train, eval, max_length, ...
    algo:    the algorithm's config_class
    trainer: TrainerConfig

Overrides `section.key=value` (value parsed as YAML) are applied on top, e.g.
`trainer.max_steps=20 algo.beta=0.2`. Everything is checked (types, ranges, model names) by
resolve_config before any model or data is loaded; file paths resolve as fastalign.configs says.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections import Counter

from fastalign import configs
from fastalign.algorithms import get_algorithm
from fastalign.data.formats import describe as describe_stats, kind_of, load_records
from fastalign.data.synthetic import STEP_TASKS, Oracle, SyntheticTask
from fastalign.errors import ConfigError
from fastalign.models import adapters, load_tokenizer
from fastalign.models.fused_head import fused_head_refusal
from fastalign.models.loading import check_model_name
from fastalign.options import build_config, describe
from fastalign.trainer.config import DataConfig, ModelConfig, TrainerConfig
from fastalign.trainer.distributed import is_main
from fastalign.trainer.loop import Trainer

SECTIONS = ("model", "data", "algo", "trainer")


def _section_classes(algorithm: str | None) -> dict:
    out = {"model": ModelConfig, "data": DataConfig, "trainer": TrainerConfig}
    if algorithm:
        out["algo"] = get_algorithm(algorithm).config_class
    return out


def _resolve_paths(cfg: dict, algorithm: str | None, base_dir: str | None) -> None:
    """File options (option(path=True)) in place: relative to base_dir, bundled:NAME -> packaged."""
    for section, cls in _section_classes(algorithm).items():
        values = cfg.get(section)
        if isinstance(values, dict):
            for f in dataclasses.fields(cls):
                if f.metadata.get("path") and f.name in values:
                    values[f.name] = configs.resolve_path(values[f.name], base_dir)


def load_config(path: str | None, overrides=(), algorithm: str | None = None) -> dict:
    """The config dict from `path` (a file or a packaged config's name) plus overrides. With
    `algorithm`, the algo section's file options are resolved too."""
    import yaml

    cfg = {}
    if path:
        path = configs.find(path)
        try:
            with open(path) as f:
                cfg = (json.load(f) if path.endswith(".json") else yaml.safe_load(f)) or {}
        except (ValueError, yaml.YAMLError) as e:  # json.JSONDecodeError is a ValueError
            raise ConfigError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: the config must be a mapping with sections {SECTIONS}")
        _check_sections(cfg, path)
        cfg = copy.deepcopy(cfg)
        _resolve_paths(cfg, algorithm, os.path.dirname(os.path.abspath(path)))
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.key=value")
        key, value = ov.split("=", 1)
        parts = key.split(".")
        one = leaf = {}
        for p in parts[:-1]:
            leaf = leaf.setdefault(p, {})
        try:
            leaf[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: the value is not valid YAML ({e})") from None
        _resolve_paths(one, algorithm, None)  # typed in a shell: relative to the working directory
        node = cfg
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {p!r} is not a section")
        node[parts[-1]] = leaf[parts[-1]]
    _check_sections(cfg, "the overrides")
    return cfg


def _check_sections(cfg: dict, where: str) -> None:
    unknown = set(cfg) - set(SECTIONS) - {"algorithm"}
    if unknown:
        raise ConfigError(f"{where}: unknown config section(s) {sorted(unknown)}; known: {list(SECTIONS)}")


def resolve_config(algorithm: str, cfg: dict) -> dict:
    """{section: config dataclass} for `cfg`, every option checked against its type and range and
    every model name against what can be loaded -- before anything is loaded."""
    out = {}
    for section, cls in _section_classes(algorithm).items():
        values = cfg.get(section) or {}
        if section == "trainer" and isinstance(values, dict):
            values = {"output_dir": os.path.join("runs", algorithm), **values}
        out[section] = build_config(cls, values, prefix=section)
    for role in ("policy", "reference", "reward", "value", "judge", "tokenizer"):
        check_model_name(getattr(out["model"], role), f"model.{role}")
    adapters.check_options(out["model"].peft)
    if out["model"].merge_adapters and out["model"].peft is None:
        raise ConfigError("model.merge_adapters=true needs LoRA adapters to merge (model.peft); without them every "
                          "checkpoint already holds the full model")
    return out


def _build_models(alg, m: ModelConfig, tok, seed: int, train: list) -> dict:
    """The algorithm's models by role; with model.peft, LoRA adapters on the trained ones and (no
    model.reference given) the reference as the policy with its adapters disabled -- not loaded."""
    # the online algorithms' extra roles
    extra = {k: getattr(m, k) for k in ("reward", "value", "judge") if getattr(m, k)}
    opts = adapters.check_options(m.peft)
    share = opts is not None and m.reference is None and "policy" in alg.trainable and "reference" in alg.models
    roles = alg.models
    if share:  # the reference comes from the policy below: do not load a second copy of the weights
        alg.models = tuple(r for r in roles if r != "reference")
    try:
        models = alg.build_models(m.policy, tok, reference=m.reference, seed=seed, tiny_kwargs=m.tiny or None, **extra)
    finally:
        alg.models = roles
    if opts is None:
        return models
    share = share and "reference" in alg.required_models(train)
    return adapters.attach(models, alg.trainable, opts, seed=seed, shared_reference=share)


def format_config(algorithm: str, cfg: dict) -> str:
    """The resolved config as YAML, every option with its value (default or given) and its help."""
    import yaml

    resolved = resolve_config(algorithm, cfg)
    lines = [f"# fastalign train {algorithm}: the resolved config (every option, with its default or the "
             "value given)", f"algorithm: {algorithm}"]
    for section in SECTIONS:
        lines.append(f"{section}:")
        obj = resolved[section]
        for name, _default, text in describe(type(obj)):
            value = getattr(obj, name)
            value = list(value) if isinstance(value, tuple) else value
            shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
            shown = shown[:-4].strip() if shown.endswith("\n...") or shown.endswith(" ...") else shown
            if isinstance(value, str) and "\n" in value:  # one line: a JSON string is a YAML double-quoted one
                shown = json.dumps(value)
            line = f"  {name}: {shown}"
            lines.append(f"{line:34s}  # {text}" if text else line)
    return "\n".join(lines) + "\n"


def _load_split(alg, d: DataConfig, split, tok, stats):
    if d.format == "synthetic":
        n = d.train_size if split == "train" else d.eval_size
        seed = d.seed + (0 if split == "train" else 1)
        task = SyntheticTask()
        if alg.data_kind == "demonstrations":
            records = task.demonstrations(n, seed)
        elif alg.data_kind == "preferences":
            records, ties = task.preference_pairs(n, Oracle(noise=d.noise, seed=seed), seed)
            stats[f"{split}: ties left out"] += ties
        elif alg.data_kind == "steps":  # the multi-step tasks' step-labelled responses
            records = SyntheticTask(tasks=STEP_TASKS).step_labelled(n, seed, error_rate=d.step_error_rate)
        elif alg.data_kind == "unpaired":  # desirable = oracle-correct (KTO, BCO)
            records = task.unpaired_examples(n, Oracle(noise=d.noise, seed=seed), seed)
        else:
            records = [{"prompt": r["prompt"]} for r in task.sample(n, seed)]
    else:
        path = getattr(d, split)
        if not path:
            if split == "train":
                raise ConfigError("data.train: path of the training data is required")
            return None
        if kind_of(d.format) != alg.data_kind:
            raise ConfigError(f"algorithm {alg.name!r} needs {alg.data_kind}, but data.format {d.format!r} holds "
                              f"{kind_of(d.format)}")
        records, st = load_records(d.format, path, templates=d.templates, limit=d.limit)
        if is_main():
            print(f"{path}: {describe_stats(st)}")
    st = Counter()
    examples = alg.encode(records, tok, d.max_length, st)
    if st and is_main():
        print(f"{split} data: {len(examples)} examples; " + ", ".join(f"{k}: {v}" for k, v in st.items()))
    return examples


def run_training(algorithm: str, cfg: dict) -> dict:
    resolved = resolve_config(algorithm, cfg)
    m, d, t = resolved["model"], resolved["data"], resolved["trainer"]
    alg = get_algorithm(algorithm)(resolved["algo"])
    if d.packing:
        if getattr(resolved["algo"], "packing", False):
            raise ConfigError("data.packing and algo.packing are two ways to pack: algo.packing fills rows of "
                              "data.max_length with a block-diagonal mask, data.packing runs each micro-batch "
                              "padding-free; set one of them to false")
        alg.packing = True
    alg.fused_head = m.fused_head
    tok = load_tokenizer(m.tokenizer or m.policy)
    stats = Counter()
    train = _load_split(alg, d, "train", tok, stats)
    evald = _load_split(alg, d, "eval", tok, stats)
    models = _build_models(alg, m, tok, t.seed, train)
    if alg.fused_head and is_main() and "policy" in models:
        reason = fused_head_refusal(models["policy"])
        if reason is not None:
            print(f"model.fused_head: the policy's log-probs go through its full logits: {reason}")
    trainer = Trainer(alg, models, tok, train, evald, t, merge_adapters=m.merge_adapters)
    if trainer.is_main:  # under torchrun every rank runs this; rank 0 writes
        os.makedirs(t.output_dir, exist_ok=True)
        with open(os.path.join(t.output_dir, "config.json"), "w") as f:  # the resolved config: every option
            json.dump({"algorithm": algorithm, **{k: dataclasses.asdict(v) for k, v in resolved.items()}}, f, indent=1)
    return trainer.fit()
