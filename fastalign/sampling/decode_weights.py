"""The matrices FastSampler's decoder multiplies with: the model's own Linear weights, fused
side by side and/or cast to the sampling dtype, rebuilt whenever the model's weights change.

  * Fusion: q/k/v become one [q + k + v, hidden] matrix and gate/up one [2 * intermediate,
    hidden], so a decode step makes one GEMM where it made three (two), reading the activations
    once. Column j of the fused product is the same dot product as column j of the unfused one
    (same operands, same length): only a GEMM whose K-blocking depended on N could round it
    differently (bit-equal on the AVX-512 CPU measured; tests/test_sampling.py holds it to the
    derived matmul bound).
  * Casting: with a sampling dtype narrower than the model's (bf16 for an fp32 model) the decoder
    runs under torch.autocast in that dtype -- what the trainer's bf16 autocast forward does -- and
    the weights are cast once here instead of by autocast at every op (autocast caches casts only
    of leaf tensors that require grad, not of a frozen model's weights).

Copied are a plain torch.nn.Linear (no hooks, no subclass) and a LoRA-wrapped one (peft's
lora.Linear, plain LoRA: no DoRA or other variant, no LoRA bias) as its merged matrix
W + sum over active adapters of scale * B A (peft's own get_delta_weight; the base weight alone
while the adapters are disabled, as under `disable_adapter()`; W as it is once peft merged it) --
what the module computes in eval mode (FastSampler samples in eval mode: no LoRA dropout), each
output rounded once instead of twice (base and adapter products added). Any other projection
module is called as it is, so wrapped models still decode, without these gains.

Staleness: the copies are of the weights when they were made. `sync()` compares every source
parameter's storage pointer and version counter (bumped by each in-place update: an optimizer
step, load_state_dict, copy_) and every LoRA layer's adapter state (disabled, merged, active
adapters) with those at the last build and rebuilds when one differs; a sampler kept across
optimizer steps therefore samples from the current weights. The check is a few microseconds per
parameter; the rebuild one pass over the copied weights (plus the rank-r products of LoRA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plain_linear(module) -> bool:
    """Whether `module` computes exactly F.linear(x, weight, bias)."""
    return type(module) is torch.nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


def _no_hooks(module) -> bool:
    return not module._forward_hooks and not module._forward_pre_hooks


def lora_linear(module) -> bool:
    """Whether `module` is peft's lora.Linear around a plain Linear, with plain LoRA adapters only."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # peft is optional
        return False
    if type(module) is not LoraLinear or not _no_hooks(module) or not plain_linear(module.get_base_layer()):
        return False
    active = [a for a in module.active_adapters if a in module.lora_A]
    return not any(module.lora_variant.get(a) is not None or module.lora_bias.get(a, False) for a in active)


def adapter_state(module) -> tuple:
    """What selects a LoRA layer's effective weight besides its parameters."""
    return (module.disable_adapters, module.merged, tuple(module.active_adapters))


def effective_linear(module):
    """(weight, bias) with module(x) == F.linear(x, weight, bias) in eval mode, or None when
    `module` is neither a plain Linear nor a plain-LoRA Linear (then it is called as it is)."""
    if plain_linear(module):
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    if not lora_linear(module):
        return None
    base = module.get_base_layer()
    bias = None if base.bias is None else base.bias.detach()
    if module.merged:
        # merged adapters are inside base.weight; disabled ones peft unmerges at the next call
        return None if module.disable_adapters else (base.weight.detach(), bias)
    weight = base.weight.detach()
    if not module.disable_adapters:
        for a in module.active_adapters:
            if a in module.lora_A:
                weight = weight + module.get_delta_weight(a).detach().to(weight.dtype)
    return weight, bias


class Projection:
    """One or several Linear modules applied to the same input: returns their outputs as a tuple.
    Plain modules are one F.linear over their weights side by side (cast to `dtype`); anything
    else is each module called as it is."""

    def __init__(self, modules, dtype: torch.dtype):
        self.modules, self.sizes = list(modules), [m.out_features for m in modules]
        self.weight = self.bias = None
        linear = [effective_linear(m) for m in self.modules]
        if all(wb is not None for wb in linear):
            # a single plain module in its own dtype: its weight itself (detach is a view, .to a no-op)
            self.weight = torch.cat([w for w, _ in linear]).to(dtype) if len(linear) > 1 else linear[0][0].to(dtype)
            if any(b is not None for _, b in linear):
                self.bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in linear]).to(dtype)

    def __call__(self, x: torch.Tensor) -> tuple:
        if self.weight is None:
            return tuple(m(x) for m in self.modules)
        y = F.linear(x, self.weight, self.bias)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)


def _gated_mlp(mlp) -> bool:
    """Whether mlp is transformers' LlamaMLP: down(act(gate(x)) * up(x))."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    return type(mlp).forward is LlamaMLP.forward and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj",
                                                                                    "down_proj", "act_fn"))


class DecodeWeights:
    """Per layer: qkv (one Projection of q, k, v, or three), o, gate_up (None: call layer.mlp),
    down; and the LM head. `fuse=False` keeps one Projection per Linear."""

    def __init__(self, model, *, dtype: torch.dtype, fuse: bool = True):
        self.model, self.dtype, self.fuse = model, dtype, fuse
        self._stamp = None

    def _stamp_now(self) -> list:
        return [(p.data_ptr(), p._version) for p in self.model.parameters()] + \
            [adapter_state(m) for m in self.model.modules() if hasattr(m, "lora_A") and hasattr(m, "merged")]

    def sync(self) -> bool:
        """Rebuilds the copies if any parameter changed since the last build; True if it did."""
        stamp = self._stamp_now()
        if stamp == self._stamp:
            return False
        self._build()
        self._stamp = stamp
        return True

    def _build(self) -> None:
        dt, self.layers = self.dtype, []
        for layer in self.model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv = [a.q_proj, a.k_proj, a.v_proj]
            gated = _gated_mlp(mlp)
            self.layers.append({
                "qkv": [Projection(qkv, dt)] if self.fuse else [Projection([m], dt) for m in qkv],
                "o": Projection([a.o_proj], dt),
                "gate_up": None if not gated else [Projection([mlp.gate_proj, mlp.up_proj], dt)] if self.fuse
                else [Projection([mlp.gate_proj], dt), Projection([mlp.up_proj], dt)],
                "down": Projection([mlp.down_proj], dt) if gated else None,
            })
        self.head = Projection([self.model.lm_head], dt)


def run(projections: list, x: torch.Tensor) -> tuple:
    """The outputs of a list of Projections on x, in order, as one tuple."""
    return tuple(y for p in projections for y in p(x))
