"""The light trainer: one loop for every registered algorithm.

    trainer = Trainer(get_algorithm("dpo")(cfg), models, tokenizer, train_examples, eval_examples,
                      TrainerConfig(...))
    summary = trainer.fit()

Per optimizer step: take `grad_accum` micro-batches of `batch_size` examples from a seeded,
resumable epoch permutation; hand them to `algorithm.train_step`, which (by default) calls
`optimize`: count the loss units of all micro-batches first, then backward each micro-batch's
summed loss divided by that global count (token-level normalisation under accumulation), clip,
AdamW step, schedule step. Metrics go to metrics.jsonl (+ metrics.png), checkpoints are atomic
and resume exactly; Ctrl-C checkpoints at the next step boundary and returns cleanly.

Under torchrun (`distributed`: auto/ddp/fsdp, see trainer/distributed.py) every rank draws the
same global batch of `batch_size * grad_accum * world_size` examples from the same permutation
and takes its own contiguous slice; loss units are summed over ranks before any forward, so the
update is the single-process update of that global batch. Rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time

import torch

from fastalign.errors import ResumeError
from fastalign.options import build_config
from fastalign.trainer import checkpoint as ckpt
from fastalign.trainer import distributed as D
from fastalign.trainer.config import TrainerConfig
from fastalign.trainer.metrics import MetricsLog, plot_metrics


class TrainingDivergedError(FloatingPointError):
    """A loss or gradient became NaN/inf; the step was not applied."""


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available")
    return dev


def _lr_lambda(cfg: TrainerConfig, total: int):
    if cfg.schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule must be constant, linear or cosine, got {cfg.schedule!r}")

    def f(step):
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        decay = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    return f


class Trainer:
    def __init__(self, algorithm, models: dict, tokenizer, train_data: list, eval_data: list | None = None,
                 config: TrainerConfig | dict | None = None, callbacks=()):
        self.config = cfg = build_config(TrainerConfig, config)
        if cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {cfg.batch_size}, {cfg.grad_accum}")
        if not train_data:
            raise ValueError("Trainer: the training data is empty")
        missing = [r for r in algorithm.models if r not in models and not (r == "reference" and _ref_optional(algorithm, train_data))]
        if missing:
            raise ValueError(f"algorithm {algorithm.name!r} needs models {list(algorithm.models)}; missing {missing}")
        self.algorithm, self.tokenizer = algorithm, tokenizer
        self.train_data, self.eval_data = train_data, eval_data
        self.callbacks = list(callbacks)
        self.dist_mode = D.resolve_mode(cfg.distributed)
        if self.dist_mode == "none":
            self.device = resolve_device(cfg.device)
            self.rank, self.world = 0, 1
        else:
            self.device = D.resolve_device(cfg.device)
            D.init(self.device)
            self.rank, self.world = D.rank(), D.world_size()
        self.is_main = self.rank == 0
        self.dtype = self._autocast_dtype()
        self.models = {k: m.to(self.device) for k, m in models.items()}
        for role, m in self.models.items():
            if role in algorithm.trainable:
                m.train()
            else:
                m.eval()
                m.requires_grad_(False)
        # DDP views of the trainable models (see train_models); FSDP2 shards self.models in place
        self._views = D.wrap_models(self.models, algorithm.trainable, self.dist_mode, self.device)
        self.trainable = {r: self.models[r] for r in algorithm.trainable if r in self.models}
        self.params = [p for m in self.trainable.values() for p in m.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
        )
        if self.world > 1:  # every rank must hold the same data (it draws the same permutation)
            hi, neg_lo = D.all_reduce([len(train_data), -len(train_data)], "max")
            if hi != -neg_lo:
                raise ValueError(f"the ranks hold different amounts of training data ({-neg_lo:.0f} to {hi:.0f} "
                                 "examples); every rank must load the same data in the same order")
        self.local_batch = cfg.batch_size * cfg.grad_accum  # examples per step on this rank
        self.global_batch = self.local_batch * self.world
        self.max_steps = cfg.max_steps if cfg.max_steps > 0 else max(
            1, math.ceil(cfg.num_epochs * len(train_data) / self.global_batch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg, self.max_steps))
        self.step, self.epoch, self.pos = 0, 0, 0
        self._perm = None
        self.log = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"))
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self.last_checkpoint: str | None = None
        self.last_metrics: dict = {}
        self._stop_requested = False

    @property
    def train_models(self) -> dict:
        """The models the loss functions get: self.models, with DDP's views of the trainable ones
        under DDP (their calls synchronise gradients). Follows self.models (e.g. a reference
        model deleted after precomputing its log-probs)."""
        if not self._views:
            return self.models
        return {r: self._views.get(r, m) for r, m in self.models.items()}

    # ---- devices and precision --------------------------------------------------------------

    def _autocast_dtype(self):
        p = self.config.precision
        if p == "fp32":
            return None
        if p == "bf16":
            return torch.bfloat16
        if p != "auto":
            raise ValueError(f"precision must be auto, fp32 or bf16, got {p!r}")
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None  # CPU: fp32 (bf16 autocast on CPUs is slower than fp32 on most of them)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def to_device(self, batch):
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---- data ---------------------------------------------------------------------------------

    def _permutation(self, epoch):
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
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

    # ---- one optimizer step -------------------------------------------------------------------

    def accumulate(self, micro_batches: list[dict], *, loss_fn=None, units_fn=None) -> dict:
        """Backward over micro_batches with global normalisation: each micro-batch's summed loss
        is divided by the loss units of *all* of them (counted before any forward), so the
        accumulated gradient is exactly that of the full batch's mean. Gradients add to .grad;
        returns the metrics (unit-weighted means) and `loss` = total loss / total units.

        Under distribution "all of them" is every rank's micro-batches: the unit count is summed
        over ranks first, and each backward is scaled by the world size because DDP/FSDP2
        average gradients over ranks; the result is the single-process gradient of the global
        batch. Every rank must pass the same number of micro-batches."""
        loss_fn = loss_fn or self.algorithm.loss
        units_fn = units_fn or self.algorithm.loss_units
        units = [int(units_fn(mb)) for mb in micro_batches]
        multi = self.world > 1
        local = sum(units)
        total = local
        if multi:
            total = int(D.all_reduce([local])[0])
            hi, neg_lo = D.all_reduce([len(micro_batches), -len(micro_batches)], "max")
            if hi != -neg_lo:
                raise ValueError(f"step {self.step + 1}: ranks have {-neg_lo:.0f} to {hi:.0f} micro-batches; "
                                 "every rank must run the same number (DDP/FSDP synchronise per backward)")
        if total == 0:
            raise ValueError("the batch has no loss units (every label masked?); check max_length and the data")
        loss_total, sums, weights = 0.0, {}, {}
        last = len(micro_batches) - 1
        for i, (mb, u) in enumerate(zip(micro_batches, units)):
            # DDP: all-reduce the gradients once, with the last micro-batch's backward
            sync = contextlib.nullcontext() if i == last else D.no_sync(self.train_models.values())
            with sync:
                with self.autocast():
                    loss_sum, metrics = loss_fn(self.train_models, mb)
                value = float(loss_sum.detach())
                if not math.isfinite(value) and not multi:  # (multi: decided on the reduced loss below)
                    self.optimizer.zero_grad(set_to_none=True)
                    raise TrainingDivergedError(
                        f"step {self.step + 1}: loss is {value}; the step was not applied "
                        f"(last checkpoint: {self.last_checkpoint})")
                loss = loss_sum / total
                # x world: DDP/FSDP2 divide the summed gradients by the world size
                (loss * self.world if multi else loss).backward()
            loss_total += value
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * u
                weights[k] = weights.get(k, 0.0) + u
        if not multi:
            out = {k: v / total for k, v in sums.items()}
            out.update(loss=loss_total / total, units=total)
            return out
        sums["loss"], weights["loss"] = loss_total, local
        out = D.reduce_weighted(sums, weights)  # a NaN/inf loss on any rank makes the sum non-finite
        if not math.isfinite(out["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(f"step {self.step + 1}: loss is {out['loss']} (summed over ranks); the step "
                                        f"was not applied (last checkpoint: {self.last_checkpoint})")
        out["units"] = total
        return out

    def optimize(self, micro_batches: list[dict], *, loss_fn=None, units_fn=None) -> dict:
        """`accumulate`, then clip and one optimizer step. `loss_fn(models, batch) -> (loss_sum,
        metrics)` and `units_fn(batch)` default to the algorithm's (online algorithms pass their
        own, and may call this several times per trainer step: PPO's epochs x mini-batches). The
        learning-rate schedule advances once per trainer step, in fit(), however many optimizer
        steps a train_step takes. Returns the step's metrics."""
        out = self.accumulate(micro_batches, loss_fn=loss_fn, units_fn=units_fn)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(f"step {self.step + 1}: gradient norm is {float(grad_norm)}; the step was not applied")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out.update(grad_norm=float(grad_norm), lr=lr)
        return out

    # ---- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: list | None = None) -> dict:
        data = self.eval_data if data is None else data
        if not data:
            return {}
        for m in self.trainable.values():
            m.eval()
        loss_total, units_total, sums, weights = 0.0, 0, {}, {}
        bs = self.config.batch_size
        starts = list(range(0, len(data), bs))
        mine = starts[self.rank::self.world]  # distributed: batches round-robin over ranks
        # FSDP2 all-gathers in every forward: every rank must run as many forwards as the others
        rounds = math.ceil(len(starts) / self.world) if self.dist_mode == "fsdp" else len(mine)
        for j in range(rounds):
            i = mine[j] if j < len(mine) else starts[0]
            batch = self.to_device(self.algorithm.collate(data[i: i + bs], self.tokenizer))
            with self.autocast():
                loss_sum, units, metrics = self.algorithm.eval_step(self.models, batch)
            if j >= len(mine):
                continue  # a padding forward: its result is not counted
            loss_total += loss_sum
            units_total += units
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * units
                weights[k] = weights.get(k, 0.0) + units
        for m in self.trainable.values():
            m.train()
        if self.world > 1:
            sums["loss"], weights["loss"] = loss_total, units_total
            return D.reduce_weighted(sums, weights)
        out = {k: v / max(units_total, 1) for k, v in sums.items()}
        out["loss"] = loss_total / max(units_total, 1)
        return out

    # ---- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "pos": self.pos, "algorithm": self.algorithm.name,
                "max_steps": self.max_steps, "algorithm_state": self.algorithm.state_dict()}

    def save_checkpoint(self) -> str:
        """Every rank calls it under distribution (FSDP2 gathers the full weights and optimizer
        state onto rank 0, which writes)."""
        model_states = optimizer_state = None
        if self.dist_mode == "fsdp":
            model_states = {r: D.full_model_state(m) for r, m in self.trainable.items()}
            optimizer_state = D.full_optimizer_state(self.trainable, self.optimizer)
        self.last_checkpoint = ckpt.save_checkpoint(
            self.ckpt_root, self.step, models=self.trainable, optimizer=self.optimizer, scheduler=self.scheduler,
            state=self.state(), tokenizer=self.tokenizer, keep=self.config.save_total_limit,
            model_states=model_states, optimizer_state=optimizer_state, distributed=self.dist_mode != "none")
        return self.last_checkpoint

    def load_checkpoint(self, path: str) -> None:
        try:
            path = ckpt.resolve_checkpoint(path, self.config.output_dir)
        except FileNotFoundError as e:  # no checkpoint where the user pointed: their mistake, not a bug
            raise ResumeError(f"trainer.resume_from: {e}") from None
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
        """The directory of `role` in the last checkpoint (loadable with from_pretrained)."""
        if self.last_checkpoint is None:
            raise RuntimeError("no checkpoint has been written yet")
        return os.path.join(self.last_checkpoint, role)

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
        self.algorithm.setup(self)
        if cfg.resume_from:
            self.load_checkpoint(cfg.resume_from)
        elif self.is_main and os.path.exists(self.log.path):
            self.log.truncate_after(0)
        old_handler = None
        if cfg.handle_sigint and threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc=self.algorithm.name, dynamic_ncols=True)
        interrupted = False
        t0 = time.time()
        try:
            while self.step < self.max_steps:
                metrics = self.algorithm.train_step(self, self.next_micro_batches())
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


def _ref_optional(algorithm, data) -> bool:
    """No reference model is needed by reference-free variants, or when the data carries the
    reference log-probs."""
    return not getattr(algorithm, "needs_reference", True) or all("ref_chosen_logps" in e for e in data)
