"""The light trainer: one loop for every registered algorithm.

    trainer = Trainer(get_algorithm("dpo")(cfg), models, tokenizer, train_examples, eval_examples,
                      TrainerConfig(...))
    summary = trainer.fit()

Before the first step: `algorithm.setup(context)`, then the algorithm's declared precomputation
(`precompute_roles` / `precompute`: e.g. DPO's reference log-probs written into the examples,
after which the trainer frees those models). Per trainer step: take `grad_accum` micro-batches of
`batch_size` examples from a seeded, resumable epoch permutation; hand them to
`algorithm.train_step(context, micro_batches)`, which (by default) calls `context.optimize`: one
globally normalised optimizer step (trainer/optimization.py). Metrics go to metrics.jsonl (+
metrics.png), checkpoints are atomic and resume exactly; Ctrl-C checkpoints at the next step
boundary and returns cleanly. Algorithms see the run only through the TrainingContext
(fastalign/algorithms/context.py), never this class.

Under torchrun (`distributed`: auto/ddp/fsdp, see trainer/distributed.py) every rank draws the
same global batch of `batch_size * grad_accum * world_size` examples from the same permutation
and takes its own contiguous slice; loss units are summed over ranks before any forward, so the
update is the single-process update of that global batch. Rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time

import torch

from fastalign.algorithms.context import TrainingDivergedError, derive_seed
from fastalign.errors import ConfigError, ResumeError
from fastalign.models import adapters
from fastalign.options import build_config
from fastalign.sampling.choose import fastalign_refusal
from fastalign.trainer import checkpoint as ckpt
from fastalign.trainer import distributed as D
from fastalign.trainer import evaluation, optimization
from fastalign.trainer.config import TrainerConfig
from fastalign.trainer.context import TrainerContext
from fastalign.trainer.devices import autocast_dtype, check_bf16_weights, resolve_device
from fastalign.trainer.master_weights import MasterWeights
from fastalign.trainer.metrics import MetricsLog, plot_metrics
from fastalign.trainer.reporting import check_report_to, open_reporters

__all__ = ["Trainer", "TrainingDivergedError", "resolve_device"]


def sampler_dtype(cfg, autocast, old_logps) -> str:
    """trainer.sampler_dtype resolved against the trainer's compute dtype (bf16 under bf16 autocast
    or bf16-weights, else fp32): auto takes it. FastSampler's log-probs are of the forward in its
    dtype, so algo.old_logps: sampler is refused when the two differ (the trainer would take a
    bf16 forward's log-probs for an fp32 one's, or the reverse: the rollout/training mismatch)."""
    trainer = "bf16" if autocast == torch.bfloat16 or cfg.precision == "bf16-weights" else "fp32"
    chosen = trainer if cfg.sampler_dtype == "auto" else cfg.sampler_dtype
    if chosen == "fp32" and cfg.precision == "bf16-weights":
        raise ConfigError("trainer.sampler_dtype: 'fp32' with trainer.precision bf16-weights: the policy's weights are "
                          "bf16; use auto or bf16")
    if old_logps == "sampler" and cfg.sampler != "transformers" and chosen != trainer:
        raise ConfigError(f"algo.old_logps: 'sampler' needs FastSampler to compute in the trainer's dtype, but "
                          f"trainer.sampler_dtype is {chosen} and trainer.precision {cfg.precision} computes in "
                          f"{trainer}: its log-probs would not be the trainer's; use algo.old_logps: recompute or "
                          "trainer.sampler_dtype: auto")
    return chosen


def _checkpoint_activations(role: str, model) -> None:
    """Gradient checkpointing of a transformers model (or a scalar head's language model): each
    decoder layer's activations are recomputed in the backward. Non-reentrant, so it works when
    the layer inputs need no gradient; generation runs in eval mode, where it is off."""
    lm = getattr(model, "lm", model)
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(lm, "gradient_checkpointing_enable"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(f"trainer.gradient_checkpointing: the {role} model ({type(lm).__name__}) does not support it")


def _check_precision_and_adapters(cfg: TrainerConfig, mode: str, models: dict) -> None:
    """What the distributed modes do not support yet, refused before any process group is joined."""
    if cfg.precision == "bf16-weights" and mode == "fsdp":
        raise ConfigError("trainer.precision=bf16-weights with trainer.distributed=fsdp is not supported yet; use "
                          "trainer.distributed=ddp, or precision bf16 (autocast) or fp32 with fsdp")
    if mode == "fsdp" and any(adapters.has_adapters(m) for m in models.values()):
        raise ConfigError("trainer.distributed=fsdp does not support LoRA adapters (model.peft) yet; use "
                          "trainer.distributed=ddp (the adapters are small, so replicating them costs little)")


class Trainer:
    def __init__(self, algorithm, models: dict, tokenizer, train_data: list, eval_data: list | None = None,
                 config: TrainerConfig | dict | None = None, callbacks=(), *, merge_adapters: bool = False):
        """merge_adapters: each checkpoint also holds merged/<role>, the trained models with their
        LoRA adapters merged (model.merge_adapters)."""
        self.config = cfg = build_config(TrainerConfig, config)
        if cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {cfg.batch_size}, {cfg.grad_accum}")
        if not train_data:
            raise ValueError("Trainer: the training data is empty")
        needed = tuple(algorithm.required_models(train_data))
        missing = [r for r in needed if r not in models]
        if missing:
            raise ValueError(f"algorithm {algorithm.name!r} needs models {list(needed)}; missing {missing}")
        self.algorithm, self.tokenizer = algorithm, tokenizer
        self.train_data, self.eval_data = train_data, eval_data
        self.callbacks = list(callbacks)
        self.dist_mode = D.resolve_mode(cfg.distributed)
        _check_precision_and_adapters(cfg, self.dist_mode, models)
        self.merge_adapters = merge_adapters
        if self.dist_mode == "none":
            self.device = resolve_device(cfg.device)
            self.rank, self.world = 0, 1
        else:
            self.device = D.resolve_device(cfg.device)
            D.init(self.device)
            self.rank, self.world = D.rank(), D.world_size()
        self.is_main = self.rank == 0
        self.dtype = autocast_dtype(cfg.precision, self.device)
        self.models = {k: m.to(self.device) for k, m in models.items()}
        if cfg.precision == "bf16-weights":
            check_bf16_weights(self.device)
            self.models = {k: m.to(torch.bfloat16) for k, m in self.models.items()}
        if cfg.gradient_checkpointing:
            for role in algorithm.trainable:
                if role in self.models:
                    _checkpoint_activations(role, self.models[role])
        for role, m in self.models.items():
            if role in algorithm.trainable:
                m.train()
            else:
                m.eval()
                m.requires_grad_(False)
        # DDP views of the trainable models (see train_models); FSDP2 shards self.models in place.
        # bf16-weights under DDP: no DDP -- its reducer reads p.grad, which MasterWeights moves into
        # the fp32 masters as each backward accumulates it -- but every rank starts from rank 0's
        # weights and the masters' gradients are all-reduced once per step (MasterWeights.all_reduce_grads)
        if cfg.precision == "bf16-weights" and self.dist_mode == "ddp":
            for m in self.models.values():
                D.broadcast_module_(m)
            self._views = {}
        else:
            self._views = D.wrap_models(self.models, algorithm.trainable, self.dist_mode, self.device)
        self.trainable = {r: self.models[r] for r in algorithm.trainable if r in self.models}
        if cfg.sampler == "fastalign" and "policy" in self.models:
            why = fastalign_refusal(self.models["policy"], sharded=D.is_sharded(self.models["policy"]))
            if why is not None:
                raise ConfigError(f"trainer.sampler: 'fastalign' cannot sample from this policy: {why}; use auto "
                                  "(falls back to transformers' generate) or transformers")
        self.sampler_dtype = sampler_dtype(cfg, self.dtype, getattr(algorithm.config, "old_logps", None))
        self.params = list({id(p): p for m in self.trainable.values() for p in m.parameters() if p.requires_grad}.values())
        # bf16-weights: the optimizer holds (and clipping reads) the fp32 masters (master_weights.py)
        self.master_weights = MasterWeights(self.params) if cfg.precision == "bf16-weights" else None
        if self.master_weights is not None:
            self.params = self.master_weights.masters
        self.optimizer = optimization.build_optimizer(self.params, cfg)
        if self.world > 1:  # every rank must hold the same data (it draws the same permutation)
            hi, neg_lo = D.all_reduce([len(train_data), -len(train_data)], "max")
            if hi != -neg_lo:
                raise ValueError(f"the ranks hold different amounts of training data ({-neg_lo:.0f} to {hi:.0f} "
                                 "examples); every rank must load the same data in the same order")
        self.local_batch = cfg.batch_size * cfg.grad_accum  # examples per step on this rank
        self.global_batch = self.local_batch * self.world
        self.max_steps = cfg.max_steps if cfg.max_steps > 0 else max(
            1, math.ceil(cfg.num_epochs * len(train_data) / self.global_batch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, optimization.lr_lambda(cfg, self.max_steps))
        self.step, self.epoch, self.pos = 0, 0, 0
        self._perm = None
        report_to = check_report_to(cfg.report_to)  # a bad name fails here, before any training
        self.log = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"))
        self._report_to = report_to if self.is_main else ()
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self.last_checkpoint: str | None = None
        self.last_metrics: dict = {}
        self._stop_requested = False
        self.context = TrainerContext(self)  # all the algorithm sees of this run

    @property
    def train_models(self) -> dict:
        """The models the loss functions get: self.models, with DDP's views of the trainable ones
        under DDP (their calls synchronise gradients). Follows self.models (e.g. a reference
        model freed after precomputing its log-probs)."""
        if not self._views:
            return self.models
        return {r: self._views.get(r, m) for r, m in self.models.items()}

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def to_device(self, batch):
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---- data ---------------------------------------------------------------------------------

    def _permutation(self, epoch):
        g = torch.Generator().manual_seed(derive_seed(self.config.seed, epoch))
        return torch.randperm(len(self.train_data), generator=g).tolist()

    def next_indices(self, n: int) -> list[int]:
        """The next n example indices of the seeded epoch permutations (resumable cursor)."""
        out = []
        while len(out) < n:
            if self._perm is None:
                self._perm = self._permutation(self.epoch)
            take = self._perm[self.pos: self.pos + n - len(out)]
            out += take
            self.pos += len(take)
            if self.pos >= len(self._perm):
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return out

    def next_micro_batches(self) -> list[dict]:
        idx = self.next_indices(self.global_batch)  # the same on every rank
        idx = idx[self.rank * self.local_batch: (self.rank + 1) * self.local_batch]
        bs = self.config.batch_size
        return [self.to_device(self.algorithm.collate([self.train_data[i] for i in idx[j: j + bs]], self.tokenizer))
                for j in range(0, len(idx), bs)]

    def precompute(self) -> None:
        """Runs the algorithm's declared precomputation over the training and eval examples when
        the models it declares are all here, then frees those models."""
        roles = tuple(self.algorithm.precompute_roles())
        if not roles or any(r not in self.models for r in roles):
            return
        for data in (self.train_data, self.eval_data or []):
            self.algorithm.precompute(self.context, data)
        for r in roles:
            del self.models[r]

    # ---- one optimizer step, evaluation (trainer/optimization.py, trainer/evaluation.py) ------

    def accumulate(self, micro_batches: list[dict], *, loss_fn=None, units_fn=None) -> dict:
        """Backward over micro_batches, each summed loss divided by the loss units of all of them
        (and of every rank); see optimization.accumulate."""
        return optimization.accumulate(self, micro_batches, loss_fn=loss_fn, units_fn=units_fn)

    def optimize(self, micro_batches: list[dict], *, loss_fn=None, units_fn=None) -> dict:
        """`accumulate`, then clip and one optimizer step; `loss_fn(models, batch) -> (loss_sum,
        metrics)` and `units_fn(batch)` default to the algorithm's. Returns the step's metrics."""
        return optimization.optimize(self, micro_batches, loss_fn=loss_fn, units_fn=units_fn)

    def evaluate(self, data: list | None = None) -> dict:
        return evaluation.evaluate(self, self.eval_data if data is None else data)

    # ---- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "pos": self.pos, "algorithm": self.algorithm.name,
                "max_steps": self.max_steps, "algorithm_state": self.algorithm.state_dict()}

    def _masters_in_models(self):
        """bf16-weights: checkpoints write and read the fp32 master weights."""
        if self.master_weights is None:
            return contextlib.nullcontext()
        return self.master_weights.masters_in_models()

    def save_checkpoint(self) -> str:
        """Every rank calls it under distribution (FSDP2 gathers the full weights and optimizer
        state onto rank 0, which writes)."""
        with self._masters_in_models():
            return self._save_checkpoint()

    def _save_checkpoint(self) -> str:
        model_states = optimizer_state = None
        if self.dist_mode == "fsdp":
            model_states = {r: D.full_model_state(m) for r, m in self.trainable.items()}
            optimizer_state = D.full_optimizer_state(self.trainable, self.optimizer)
        self.last_checkpoint = ckpt.save_checkpoint(
            self.ckpt_root, self.step, models=self.trainable, optimizer=self.optimizer, scheduler=self.scheduler,
            state=self.state(), tokenizer=self.tokenizer, keep=self.config.save_total_limit,
            model_states=model_states, optimizer_state=optimizer_state, distributed=self.dist_mode != "none",
            merged=self.merge_adapters)
        return self.last_checkpoint

    def load_checkpoint(self, path: str) -> None:
        try:
            path = ckpt.resolve_checkpoint(path, self.config.output_dir)
        except FileNotFoundError as e:  # no checkpoint where the user pointed: their mistake, not a bug
            raise ResumeError(f"trainer.resume_from: {e}") from None
        with self._masters_in_models():
            st = ckpt.load_checkpoint(path, models=self.trainable, optimizer=self.optimizer, scheduler=self.scheduler,
                                      sharded=self.dist_mode == "fsdp")
        if st.get("algorithm") not in (None, self.algorithm.name):
            raise ValueError(f"checkpoint {path} is from algorithm {st['algorithm']!r}, not {self.algorithm.name!r}")
        self.step, self.epoch, self.pos = st["step"], st["epoch"], st["pos"]
        self.algorithm.load_state_dict(st.get("algorithm_state", {}))
        self._perm = None
        self.last_checkpoint = path
        if self.is_main:
            self.log.truncate_after(self.step)

    def model_dir(self, role: str = "policy") -> str:
        """The directory of `role` in the last checkpoint that loads as a model: merged/<role>
        when the adapters were merged, else <role> (with LoRA adapters and no merge: the adapters)."""
        if self.last_checkpoint is None:
            raise RuntimeError("no checkpoint has been written yet")
        merged = os.path.join(self.last_checkpoint, ckpt.MERGED_DIR, role)
        return merged if os.path.isdir(merged) else os.path.join(self.last_checkpoint, role)

    # ---- the loop ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop at the next step boundary, after writing a checkpoint (what Ctrl-C does)."""
        self._stop_requested = True

    def _on_sigint(self, signum, frame):
        if self._stop_requested:  # second Ctrl-C: the user insists
            raise KeyboardInterrupt
        print("\nfastalign: Ctrl-C -- saving a checkpoint at the end of this step (Ctrl-C again to abort)", flush=True)
        self._stop_requested = True

    def fit(self) -> dict:
        cfg = self.config
        os.makedirs(cfg.output_dir, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.algorithm.setup(self.context)
        self.precompute()
        if cfg.resume_from:
            self.load_checkpoint(cfg.resume_from)
        elif self.is_main and os.path.exists(self.log.path):
            self.log.truncate_after(0)
        old_handler = None
        if cfg.handle_sigint and threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        self.log.reporters = open_reporters(self._report_to, cfg.output_dir, dataclasses.asdict(cfg))
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc=self.algorithm.name, dynamic_ncols=True)
        interrupted = False
        t0 = time.time()
        try:
            while self.step < self.max_steps:
                metrics = self.algorithm.train_step(self.context, self.next_micro_batches())
                self.scheduler.step()  # the schedule is over trainer steps (see optimize)
                self.step += 1
                self.last_metrics = metrics
                if self.is_main and (self.step % max(cfg.log_every, 1) == 0 or self.step == self.max_steps):
                    self.log.write({"step": self.step, "split": "train", **metrics,
                                    "epoch": self.epoch + self.pos / len(self.train_data),
                                    "time": round(time.time() - t0, 3)})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                for cb in self.callbacks:
                    cb(self, metrics)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.max_steps:
                    self._log_eval()
                stop = self._stop_requested
                if self.world > 1:  # all ranks stop (and checkpoint) together
                    stop = D.any_rank(stop)
                if stop:
                    interrupted = True
                    self.save_checkpoint()
                    break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
            if not interrupted:
                eval_metrics = self._log_eval()
                if cfg.save_final:
                    self.save_checkpoint()
            else:
                eval_metrics = {}
        finally:
            if bar is not None:
                bar.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            self._stop_requested = False
            self.log.close()
        plot = None
        if cfg.plot and self.is_main and os.path.exists(self.log.path):
            plot = plot_metrics(self.log.path, title=f"{self.algorithm.name} ({cfg.output_dir})")
        return {"step": self.step, "interrupted": interrupted, "checkpoint": self.last_checkpoint,
                "train": self.last_metrics, "eval": eval_metrics, "plot": plot, "seconds": time.time() - t0}

    def _log_eval(self) -> dict:
        m = self.evaluate()
        if m and self.is_main:
            self.log.write({"step": self.step, "split": "eval", **m})
        return m

