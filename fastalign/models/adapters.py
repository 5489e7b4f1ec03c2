"""LoRA adapters (the `peft` package) on the trained models, and the reference model that shares
their base weights.

`model.peft: {r, alpha, dropout, target_modules, ...}` (PeftOptions) wraps each trained model in
a peft LoRA model: the base weights are frozen, only the adapters (and, for a scalar-head model,
its score head, which is new and so trained in full) receive gradients. A ScalarHeadModel keeps
its class: its language model becomes the peft model, its head stays a plain trainable Linear.

The reference (DPO's anchor, the KL anchor of PPO and GRPO) is then the policy's base with the
adapters switched off: `AdapterFreeReference(policy)` runs the policy under `disable_adapter()`
and in eval mode, and holds no parameters of its own -- one copy of the base weights in memory.

Checkpoints hold the adapters in peft's format (adapter_config.json + adapter_model.safetensors,
no pickle); `merged_state_dict` gives the merged full weights W + scale * B A without touching
the model being trained (merging in place and unmerging would not give back W bit for bit, and
an exact resume needs W), so a checkpoint can also carry a plain model directory.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from fastalign.errors import ConfigError
from fastalign.models.heads import ScalarHeadModel
from fastalign.options import build_config, option

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class PeftOptions:
    r: int = option(8, "LoRA rank", ge=1)
    alpha: float = option(16.0, "LoRA scale numerator: the update is (alpha / r) * B A", gt=0)
    dropout: float = option(0.0, "dropout on the adapters' input", ge=0, lt=1)
    target_modules: list | str | None = option(None, "the Linear modules adapted: a list of names (q_proj, "
                                                     "v_proj, ...), a regex, or 'all-linear'; default: peft's "
                                                     "choice for the architecture (q_proj, v_proj for Llama)")
    bias: str = option("none", "which biases train: none | all | lora_only", choices=("none", "all", "lora_only"))
    use_rslora: bool = option(False, "rank-stabilised scale alpha / sqrt(r)")
    modules_to_save: list | None = option(None, "modules trained in full beside the adapters (e.g. [lm_head])")


def check_options(values, where: str = "model.peft") -> PeftOptions | None:
    """The validated options of `model.peft` (None: no adapters, full fine-tuning)."""
    if values is None:
        return None
    opts = build_config(PeftOptions, values, prefix=where)
    t = opts.target_modules
    if t is not None and not (isinstance(t, str) and t) and not (
            isinstance(t, list) and t and all(isinstance(x, str) and x for x in t)):
        raise ConfigError(f"{where}.target_modules must be a non-empty list of module names, a regex string or "
                          f"'all-linear', got {t!r}")
    m = opts.modules_to_save
    if m is not None and not (isinstance(m, list) and all(isinstance(x, str) and x for x in m)):
        raise ConfigError(f"{where}.modules_to_save must be a list of module names, got {m!r}")
    return opts


def is_peft_model(model) -> bool:
    """Whether `model` itself is a peft model (no import of peft when nothing imported it yet)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def has_adapters(model) -> bool:
    """A peft model, or a scalar-head model whose language model is one."""
    return is_peft_model(model) or (isinstance(model, ScalarHeadModel) and is_peft_model(model.lm))


def _lora_config(opts: PeftOptions, task_type):
    from peft import LoraConfig

    return LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=opts.target_modules,
                      bias=opts.bias, use_rslora=opts.use_rslora, modules_to_save=opts.modules_to_save,
                      task_type=task_type)


def add_adapters(model, opts: PeftOptions, *, seed: int = 0, where: str = "model.peft"):
    """`model` with LoRA adapters (a new peft model; a ScalarHeadModel gets them on its language
    model and keeps its head trainable). The adapters' initialisation draws from its own seeded
    generator, so a run does not depend on what ran before."""
    from peft import get_peft_model

    lm = model.lm if isinstance(model, ScalarHeadModel) else model
    if is_peft_model(lm):
        raise ConfigError(f"{where}: the model already has adapters")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(lm, _lora_config(opts, None if lm is not model else "CAUSAL_LM"))
        except ValueError as e:  # e.g. target modules that match nothing in this architecture
            raise ConfigError(f"{where}: {e}") from None
    if lm is model:
        return wrapped
    model.lm = wrapped  # the head stays a plain, trainable Linear
    return model


class AdapterFreeReference(nn.Module):
    """The reference model that is `policy` with its adapters disabled: calling it runs the
    policy's forward under `disable_adapter()`, in eval mode (as a frozen copy would be). The
    policy is not registered as a submodule, so this module has no parameters: the trainer's
    `.eval()` / `.requires_grad_(False)` on the reference leave the policy alone, and no weight
    is held twice."""

    def __init__(self, policy):
        super().__init__()
        if not is_peft_model(policy):
            raise TypeError(f"AdapterFreeReference needs a peft model, got {type(policy).__name__}")
        self.__dict__["policy"] = policy  # (not a submodule: see the class docstring)

    @property
    def config(self):
        return self.policy.config

    def forward(self, *args, **kwargs):
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)


def attach(models: dict, trainable, opts: PeftOptions, *, seed: int = 0, shared_reference: bool = False) -> dict:
    """Adapters on every trained role of `models`; with shared_reference, models["reference"]
    becomes the policy with its adapters disabled."""
    out = dict(models)
    for role in trainable:
        if role in out:
            out[role] = add_adapters(out[role], opts, seed=seed, where="model.peft")
    if shared_reference:
        out["reference"] = AdapterFreeReference(out["policy"])
    return out


# ---- checkpoints: adapter weights in, merged weights out --------------------------------------


def adapter_tensors(model) -> dict:
    """{name as peft saves it: the live tensor} of a peft model's adapter (and modules_to_save)
    weights; the tensors share storage with the parameters."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_weights(model, path: str, read_tensors) -> None:
    """Copies the adapter weights saved in `path` (peft format) into peft model `model`, exactly;
    every adapter tensor must be there with its shape, and nothing else."""
    saved = read_tensors(os.path.join(path, ADAPTER_WEIGHTS))
    live = adapter_tensors(model)
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    bad = [k for k in live if k in saved and saved[k].shape != live[k].shape]
    if missing or unexpected or bad:
        raise RuntimeError(f"adapters in {path} do not match the model: missing {missing}, unexpected {unexpected}, "
                           f"shapes differ for {bad}")
    with torch.no_grad():
        for k, t in live.items():
            t.copy_(saved[k])


def merged_state_dict(model) -> dict:
    """The base model's state dict with every adapted weight replaced by W + scale * B A (the
    peft layer's own delta, added to W in fp32 and rounded once to W's dtype): what
    `merge_and_unload()` would hold, computed beside the model instead of in it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    names = {id(mod): name for name, mod in base.named_modules()}
    merged = {}
    for mod in base.modules():
        if isinstance(mod, BaseTunerLayer) and hasattr(mod, "get_delta_weight"):
            w = mod.get_base_layer().weight
            delta = sum(mod.get_delta_weight(a).float() for a in mod.active_adapters if a in getattr(mod, "r", {}))
            merged[names[id(mod)]] = (w.float() + delta).to(w.dtype)
    out = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or (".modules_to_save." in key and ".original_module." not in key):
            continue
        clean = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        owner = clean.rsplit(".", 1)[0]
        out[clean] = merged[owner] if clean.endswith(".weight") and owner in merged else value
    for name, mod in base.named_modules():  # modules_to_save: the trained copy, not the original
        trained = getattr(mod, "modules_to_save", None)
        if isinstance(trained, nn.ModuleDict):
            for adapter in mod.active_adapters:
                for k, v in trained[adapter].state_dict().items():
                    out[f"{name}.{k}"] = v
    return out


def save_merged(model, path: str) -> None:
    """A plain model directory (save_pretrained: config + safetensors; a ScalarHeadModel's score
    head beside it) of `model` with its adapters merged: loadable wherever a model is named."""
    from fastalign.models.heads import save_scalar_head

    lm = model.lm if isinstance(model, ScalarHeadModel) else model
    base = lm.get_base_model()
    state = {k: v.contiguous() for k, v in merged_state_dict(lm).items()}
    base.save_pretrained(path, state_dict=state)
    if isinstance(model, ScalarHeadModel):
        save_scalar_head(model.head, path)
