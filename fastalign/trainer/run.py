"""One training run from a config file: what `fastalign train <algorithm> --config FILE.yaml` does.

Config layout (YAML or JSON; every section optional):

    model:   {policy: tiny, reference: null, tiny: {hidden_size: 96, ...}}
    data:    {format: alpaca | chat | oasst | flan | preference | prompts | synthetic,
              train: path, eval: path, max_length: 128, templates: null, limit: null,
              train_size: 2000, eval_size: 200}          # the last two for `synthetic`
    algo:    {...}                                       # the algorithm's config dataclass
    trainer: {...}                                       # TrainerConfig

Overrides `section.key=value` (value parsed as YAML) are applied on top, e.g.
`trainer.max_steps=20 algo.beta=0.2`.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter

from fastalign.trainer.distributed import is_main

SECTIONS = ("model", "data", "algo", "trainer")


def load_config(path: str | None, overrides=()) -> dict:
    import yaml

    cfg = {}
    if path:
        with open(path) as f:
            cfg = (json.load(f) if path.endswith(".json") else yaml.safe_load(f)) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the config must be a mapping with sections {SECTIONS}")
    cfg = copy.deepcopy(cfg)
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like section.key=value")
        key, value = ov.split("=", 1)
        parts = key.split(".")
        node = cfg
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {ov!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    unknown = set(cfg) - set(SECTIONS) - {"algorithm"}
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; known: {list(SECTIONS)}")
    return cfg


def _load_split(alg, data_cfg, split, tok, stats):
    from fastalign.data.formats import describe, kind_of, load_records
    from fastalign.data.synthetic import Oracle, SyntheticTask

    fmt = data_cfg.get("format", "synthetic")
    max_length = int(data_cfg.get("max_length", 128))
    if fmt == "synthetic":
        n = int(data_cfg.get("train_size" if split == "train" else "eval_size", 2000 if split == "train" else 200))
        seed = int(data_cfg.get("seed", 0)) + (0 if split == "train" else 1)
        task = SyntheticTask()
        if alg.data_kind == "demonstrations":
            records = task.demonstrations(n, seed)
        elif alg.data_kind == "preferences":
            records, ties = task.preference_pairs(n, Oracle(noise=float(data_cfg.get("noise", 0.0)), seed=seed), seed)
            stats[f"{split}: ties left out"] += ties
        else:
            records = [{"prompt": r["prompt"]} for r in task.sample(n, seed)]
    else:
        path = data_cfg.get(split)
        if not path:
            if split == "train":
                raise ValueError("data.train: path of the training data is required")
            return None
        if kind_of(fmt) != alg.data_kind:
            raise ValueError(f"algorithm {alg.name!r} needs {alg.data_kind}, but format {fmt!r} holds {kind_of(fmt)}")
        records, st = load_records(fmt, path, templates=data_cfg.get("templates"), limit=data_cfg.get("limit"))
        if is_main():
            print(f"{path}: {describe(st)}")
    st = Counter()
    examples = alg.encode(records, tok, max_length, st)
    if st and is_main():
        print(f"{split} data: {len(examples)} examples; " + ", ".join(f"{k}: {v}" for k, v in st.items()))
    return examples


def run_training(algorithm: str, cfg: dict) -> dict:
    from fastalign.algorithms import get_algorithm
    from fastalign.models import load_tokenizer
    from fastalign.trainer.loop import Trainer

    cls = get_algorithm(algorithm)
    alg = cls(cfg.get("algo"))
    mcfg = cfg.get("model", {}) or {}
    policy = mcfg.get("policy", "tiny")
    tok = load_tokenizer(mcfg.get("tokenizer") or policy)
    tcfg = dict(cfg.get("trainer", {}) or {})
    tcfg.setdefault("output_dir", os.path.join("runs", algorithm))
    stats = Counter()
    train = _load_split(alg, cfg.get("data", {}) or {}, "train", tok, stats)
    evald = _load_split(alg, cfg.get("data", {}) or {}, "eval", tok, stats)
    extra = {k: mcfg[k] for k in ("reward", "value") if mcfg.get(k)}  # the online algorithms' extra roles
    models = alg.build_models(policy, tok, reference=mcfg.get("reference"), seed=int(tcfg.get("seed", 0)),
                              tiny_kwargs=mcfg.get("tiny"), **extra)
    trainer = Trainer(alg, models, tok, train, evald, tcfg)
    if trainer.is_main:  # under torchrun every rank runs this; rank 0 writes
        os.makedirs(trainer.config.output_dir, exist_ok=True)
        with open(os.path.join(trainer.config.output_dir, "config.json"), "w") as f:
            json.dump({"algorithm": algorithm, **cfg}, f, indent=1)
    return trainer.fit()
