"""Trainer configuration (a dataclass; loadable from YAML/JSON via load_config)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainerConfig:
    output_dir: str = "runs/train"
    max_steps: int = 100           # optimizer steps; <= 0 -> derived from num_epochs
    num_epochs: float = 1.0        # used only when max_steps <= 0
    batch_size: int = 8            # examples per micro-batch and process (pairs for preference data)
    grad_accum: int = 1            # micro-batches per optimizer step (global batch: x world size)
    lr: float = 1e-4
    weight_decay: float = 0.0      # applied to matrices only (not biases, norms)
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    schedule: str = "cosine"       # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0      # floor of linear/cosine decay, as a fraction of lr
    max_grad_norm: float | None = 1.0
    precision: str = "auto"        # auto (bf16 autocast on CUDA with bf16, else fp32) | fp32 | bf16
    device: str = "auto"           # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    distributed: str = "auto"      # auto (ddp when WORLD_SIZE > 1) | ddp | fsdp | none; see trainer/distributed.py
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0            # 0: evaluate only at the end (if there is eval data)
    save_every: int = 0            # 0: checkpoint only at the end (and on Ctrl-C)
    save_total_limit: int = 2      # step checkpoints kept (oldest deleted first)
    save_final: bool = True
    resume_from: str | None = None  # a checkpoint dir, or "latest" (output_dir's newest)
    progress: bool = True          # tqdm progress bar
    plot: bool = True              # metrics.png next to metrics.jsonl
    handle_sigint: bool = True     # Ctrl-C: checkpoint at the step boundary, then stop cleanly
    extra: dict = field(default_factory=dict)  # free-form, for algorithms/callbacks
