"""TRL's contenders in the end-to-end benchmark: TRL's own SFTTrainer / DPOTrainer / GRPOTrainer
(stock), and the same after fastalign.integrations.trl.patch_trl() ("trl+patch"). Only
TrainingArguments are set, to match fastalign's contender: AdamW (torch), constant lr, no weight
decay, clipping at 1.0 (TRL's default), no gradient checkpointing (TRL 1.16 defaults to it;
fastalign's trainer does not -- measured separately as a variant), bf16 autocast or fp32, no
dropout (TRL disables it; the pretrained model has none), the same fp32 model object."""

from __future__ import annotations

import os

from fastalign.benchmarks import _e2e_data
from fastalign.benchmarks._e2e_steps import StepLog


def model_dir(name: str, workdir: str) -> str:
    """A directory from_pretrained can read for `name` ('tiny' is saved into workdir first)."""
    from fastalign.models.converted import converted_dir, is_converted_name

    if name == "tiny":
        from fastalign.models import load_model, load_tokenizer

        path = os.path.join(workdir, "tiny_model")
        if not os.path.isdir(path):
            tok = load_tokenizer("tiny")
            load_model("tiny", tokenizer=tok, seed=0).save_pretrained(path)
            tok.save_pretrained(path)
        return path
    return converted_dir(name) if is_converted_name(name) else name


def _args(spec: dict):
    algo = spec["algo"]
    common = dict(
        output_dir=os.path.join(spec["workdir"], "trl_run"), max_steps=spec["warmup"] + spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        gradient_accumulation_steps=1, gradient_checkpointing=False, bf16=spec["precision"] == "bf16",
        use_cpu=spec["device"] == "cpu", report_to="none", logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    if algo == "sft":
        from trl import SFTConfig

        return SFTConfig(per_device_train_batch_size=spec["batch"], max_length=spec["seq_len"], packing=False, **common)
    if algo == "dpo":
        from trl import DPOConfig

        return DPOConfig(per_device_train_batch_size=spec["batch"], max_length=spec["seq_len"], beta=0.1,
                         loss_type=["sigmoid"], precompute_ref_log_probs=False, **common)
    from trl import GRPOConfig

    # batch = group: one prompt per step, `batch` completions of it, generated every step
    return GRPOConfig(per_device_train_batch_size=spec["batch"], num_generations=spec["batch"],
                      max_completion_length=spec["new_tokens"], temperature=1.0, beta=0.0, num_iterations=1,
                      **common)


def _callback(log: StepLog):
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and log.ends:
                log.losses.append(float(logs["loss"]))

        def on_step_end(self, args, state, control, **kwargs):
            log.step_end()

    return Record()


def _grpo_reward(completions, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [_e2e_data.reward(t) for t in texts]


def run(spec: dict, data: dict, patched: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from fastalign.models import load_tokenizer

    log = StepLog(spec["device"])
    path = model_dir(spec["model"], spec["workdir"])
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    args = _args(spec)
    dataset = _e2e_data.trl_dataset(spec["algo"], data["records"])
    if patched:
        from fastalign.integrations.trl import patch_trl

        patch_trl()
    if spec["algo"] == "sft":
        from trl import SFTTrainer

        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                             callbacks=[_callback(log)])
    elif spec["algo"] == "dpo":
        from trl import DPOTrainer

        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                             callbacks=[_callback(log)])
    else:
        from trl import GRPOTrainer

        _grpo_reward.__name__ = "vowel_share"
        trainer = GRPOTrainer(model=model, reward_funcs=_grpo_reward, args=args, train_dataset=dataset,
                              processing_class=tok, callbacks=[_callback(log)])
        log.force_new_tokens(trainer.model, spec["new_tokens"])
    trainer.train()
    out = {"log": log}
    if patched:
        from fastalign.integrations.trl import call_counts

        out["patch_calls"] = dict(call_counts())
    return out
