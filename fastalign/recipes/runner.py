"""Stages as data, and the runner that executes them in order (docs/recipes.md).

A recipe is a list of `Stage`s. Stages talk to each other only through named *artifacts*: a
stage declares the names it reads (`inputs`, produced by an earlier stage) and the names it
adds (`outputs`); the runner checks both, so a mis-ordered or mis-wired stage list fails before
anything trains, with the stage and the name in the message.

A stage is one of two kinds:

- a **training stage** (`algorithm` set): the runner builds the registered algorithm from
  `config`, encodes the records `data(ctx)` returns, builds `models(ctx)`, and trains them with
  the Trainer in `<output_dir>/<stage name>`. Its outputs are named after what it trained:
  `"<stage>.<role>"` (the trained model, in eval mode), `"<stage>.<role>_dir"` (that model's
  directory in the last checkpoint, loadable with `fastalign.models.load_model`), and
  `"<stage>.summary"` / `"<stage>.algorithm"` (`Trainer.fit`'s summary, the algorithm object);
- a **step** (`run` set): any other work (sampling, labelling, evaluating); `run(ctx)` returns
  a dict holding its declared outputs (other keys are dropped).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from fastalign.algorithms import get_algorithm
from fastalign.trainer.loop import Trainer


@dataclass
class Stage:
    name: str  # also the output sub-directory of a training stage and the key of its timing
    inputs: tuple = ()  # artifact names read from earlier stages
    outputs: tuple = ()  # artifact names this stage adds
    # a step: run(ctx) -> {output name: value}
    run: Callable | None = None
    # a training stage
    algorithm: str | None = None  # a registered algorithm name (`fastalign list`)
    config: dict = field(default_factory=dict)  # its config
    algorithm_kwargs: dict = field(default_factory=dict)  # extra constructor arguments (e.g. oracle_fn)
    data: Callable | None = None  # data(ctx) -> (train records, eval records), before encoding
    models: Callable | None = None  # models(ctx) -> {role: module}
    trainer: dict = field(default_factory=dict)  # Trainer options over the run's defaults
    describe: Callable | None = None  # describe(ctx, TrainRun) -> the line logged before training
    report: Callable | None = None  # report(ctx, TrainRun) after training (log lines, extra files)
    numbered: bool = True  # counted in the "[i/n]" progress tags of the log

    def __post_init__(self):
        if (self.run is None) == (self.algorithm is None):
            raise ValueError(f"Stage {self.name!r}: give exactly one of run= (a step) or algorithm= (training)")
        if self.algorithm is not None and (self.data is None or self.models is None):
            raise ValueError(f"Stage {self.name!r}: a training stage needs data= and models=")


@dataclass
class TrainRun:
    """What a training stage built and produced; handed to its `describe` and `report`."""

    algorithm: object
    models: dict
    train: list  # encoded training examples
    eval: list  # encoded eval examples
    trainer: Trainer | None = None
    summary: dict | None = None  # Trainer.fit's result


@dataclass
class Context:
    """What the stages of one run share. `trainer_defaults` are Trainer options every training
    stage starts from (seed, device, ...); the runner adds `output_dir=<output_dir>/<stage>`."""

    output_dir: str
    tokenizer: object
    device: object
    max_length: int
    trainer_defaults: dict = field(default_factory=dict)
    log: Callable = print
    artifacts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # stage name -> seconds
    tag: str = field(default="", init=False)  # "[i/n]" of the stage running now ("" if unnumbered)
    _started: float = field(default=0.0, init=False, repr=False)

    def __getitem__(self, name: str):
        return self.artifacts[name]

    def announce(self, text: str) -> None:
        """Log `text` after the running stage's "[i/n]" tag."""
        self.log(f"{self.tag} {text}" if self.tag else text)

    def elapsed(self) -> float:
        """Seconds since the running stage started."""
        return time.time() - self._started


def run_stages(stages: list[Stage], ctx: Context) -> dict:
    """Runs `stages` in order; returns the artifacts (ctx.artifacts), ctx.timings holds each
    stage's seconds."""
    _check_wiring(stages, ctx)
    numbered = [s.name for s in stages if s.numbered]
    for stage in stages:
        ctx.tag = f"[{numbered.index(stage.name) + 1}/{len(numbered)}]" if stage.numbered else ""
        ctx._started = time.time()
        if stage.algorithm is not None:
            _train(stage, ctx)
        else:
            produced = stage.run(ctx) or {}
            missing = [n for n in stage.outputs if n not in produced]
            if missing:
                raise RuntimeError(f"recipe stage {stage.name!r} did not produce {missing}")
            ctx.artifacts.update({n: produced[n] for n in stage.outputs})  # only what it declares
            ctx.timings[stage.name] = ctx.elapsed()
    return ctx.artifacts


def _check_wiring(stages, ctx) -> None:
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"recipe: stage names must be unique, got {names}")
    available = set(ctx.artifacts)
    for s in stages:
        missing = [n for n in s.inputs if n not in available]
        if missing:
            raise ValueError(f"recipe stage {s.name!r} reads {missing}, which no earlier stage produces")
        if s.algorithm is not None:
            bad = [n for n in s.outputs if not n.startswith(s.name + ".")]
            if bad:
                raise ValueError(f"recipe stage {s.name!r}: a training stage's outputs are named {s.name}.<role>, "
                                 f"{s.name}.<role>_dir, {s.name}.summary or {s.name}.algorithm; got {bad}")
        available.update(s.outputs)


def _train(stage: Stage, ctx: Context) -> None:
    # order as a hand-written script would do it (algorithm, data, models, Trainer): the models'
    # initialisation may draw from the global RNG that a stage's `models` seeds
    alg = get_algorithm(stage.algorithm)(stage.config or None, **stage.algorithm_kwargs)
    stats = Counter()
    train_records, eval_records = stage.data(ctx)
    train = alg.encode(train_records, ctx.tokenizer, ctx.max_length, stats)
    evald = alg.encode(eval_records, ctx.tokenizer, ctx.max_length, stats)
    run = TrainRun(alg, stage.models(ctx), train, evald)
    if stage.describe is not None:
        ctx.announce(stage.describe(ctx, run))
    options = dict(output_dir=os.path.join(ctx.output_dir, stage.name), **ctx.trainer_defaults)
    options.update(stage.trainer)
    run.trainer = Trainer(alg, run.models, ctx.tokenizer, train, evald, options)
    run.summary = run.trainer.fit()
    ctx.timings[stage.name] = ctx.elapsed()
    if stage.report is not None:
        stage.report(ctx, run)
    ctx.artifacts.update({n: _train_output(stage, run, n) for n in stage.outputs})


def _train_output(stage: Stage, run: TrainRun, name: str):
    prefix, _, what = name.partition(".")
    if prefix == stage.name:
        if what == "summary":
            return run.summary
        if what == "algorithm":
            return run.algorithm
        if what in run.models:
            return run.models[what].eval()
        if what.endswith("_dir") and what[: -len("_dir")] in run.models:
            return run.trainer.model_dir(what[: -len("_dir")])
    raise ValueError(f"recipe stage {stage.name!r}: cannot produce {name!r}; a training stage's outputs are "
                     f"{stage.name}.<role>, {stage.name}.<role>_dir, {stage.name}.summary, {stage.name}.algorithm "
                     f"(roles: {sorted(run.models)})")
