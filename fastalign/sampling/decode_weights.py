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

Only a plain torch.nn.Linear (no hooks, no subclass: not a LoRA-wrapped projection) is copied; any
other projection module is called as it is, so wrapped models still decode, without these gains.

Staleness: the copies are of the weights when they were made. `sync()` compares every source
parameter's storage pointer and version counter (bumped by each in-place update: an optimizer
step, load_state_dict, copy_) with those at the last build and rebuilds when one differs; a
sampler kept across optimizer steps therefore samples from the current weights. The check is a
few microseconds per parameter; the rebuild one pass over the copied weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plain_linear(module) -> bool:
    """Whether `module` computes exactly F.linear(x, weight, bias)."""
    return type(module) is torch.nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


class Projection:
    """One or several Linear modules applied to the same input: returns their outputs as a tuple.
    Plain modules are one F.linear over their weights side by side (cast to `dtype`); anything
    else is each module called as it is."""

    def __init__(self, modules, dtype: torch.dtype):
        self.modules, self.sizes = list(modules), [m.out_features for m in modules]
        self.weight = self.bias = None
        if all(plain_linear(m) for m in self.modules):
            # a single module in its own dtype: its weight itself (detach is a view, .to a no-op)
            self.weight = torch.cat([m.weight.detach() for m in self.modules]).to(dtype) if len(self.modules) > 1 \
                else self.modules[0].weight.detach().to(dtype)
            if any(m.bias is not None for m in self.modules):
                self.bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                                       for m in self.modules]).to(dtype)

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
        return [(p.data_ptr(), p._version) for p in self.model.parameters()]

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
