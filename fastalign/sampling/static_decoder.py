"""Batched decoding of a transformers Llama-family model with a preallocated (static) KV cache.

The decoder runs the model's own modules -- embedding, RMSNorms, rotary embedding, MLP
activation, final norm -- and its own weights: the projections and the LM head multiply by the
model's Linear weights, fused q/k/v and gate/up (decode_weights.py: the same dot products, one
GEMM instead of three and two). So every number but the attention is the one `generate`
computes, up to the GEMM's rounding; the attention and the cache are its own:

  * the cache is one [rows, kv_heads, capacity, head_dim] tensor per layer for keys and one for
    values, allocated at the prefill (capacity = longest prompt + max_new_tokens) and written in
    place: no torch.cat per step as transformers' DynamicCache does (which copies the whole cache
    every step);
  * prompts are left-padded; `valid` [rows, capacity] marks the key slots a row may attend to
    (its prompt tokens and what it generated), and each row's positions count its own tokens
    only (the first real token is position 0), as generate's position ids do;
  * only the last prompt position goes through the LM head at the prefill;
  * `keep(rows)` drops finished rows from the batch (their cache rows included), so rows that
    hit EOS stop costing compute.

The attention reads the cache up to the current length only (eager) or the whole capacity with
the mask (compiled: one static shape, so no recompilation per step). At a decode step (one query
per row) the G = heads / kv_heads query heads that share a KV head are laid out as G queries of
that KV head: one SDPA call of [rows, kv_heads, G, head_dim] against the cache as it is, the
same dot products as enable_gqa's (which is ~25 % slower on the CPU for one query).

The sampling dtype (`dtype`): the model's own (default), or bf16 (fp16) for an fp32 model: then
prefill and steps run under torch.autocast in that dtype -- the trainer's bf16 autocast forward,
with the weights cast once (decode_weights.py) -- and the cache is kept in that dtype (what SDPA
under autocast reads anyway). The logits come out in that dtype; FastSampler's log-probs are
still fp32 (gather_logprobs).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fastalign.sampling.decode_weights import DecodeWeights, run

SUPPORTED_MODEL_TYPES = ("llama",)


def causal_lm(model):
    """The transformers model inside a peft model (its LoRA layers in place), else `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def unsupported_reason(model) -> str | None:
    """None when StaticDecoder can run `model` (or the model inside a peft wrapper), else why not
    (the fallback is transformers)."""
    model = causal_lm(model)
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not one of {SUPPORTED_MODEL_TYPES}"
    core = getattr(model, "model", None)
    if core is None or not all(hasattr(core, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            or not hasattr(model, "lm_head"):
        return "not a plain LlamaForCausalLM (wrapped or modified modules)"
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return "its parameters are sharded (FSDP2)"
    return None


def _rotate(x, cos, sin):
    """Rotary embedding as transformers' apply_rotary_pos_emb: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class StaticDecoder:
    def __init__(self, model, *, compile_step: bool = False, dtype: torch.dtype | None = None, fuse: bool = True):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FastSampler: cannot run this model: {reason}")
        model = causal_lm(model)  # a peft model's LoRA layers are merged into the decode weights
        self.model, self.core = model, model.model
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        own = next(model.parameters()).dtype
        self.dtype = own if dtype is None else dtype
        if self.dtype != own and not (own == torch.float32 and self.dtype in (torch.bfloat16, torch.float16)):
            raise ValueError(f"FastSampler: dtype {self.dtype} on a {own} model: use the model's own dtype, or bf16 / "
                             "fp16 on an fp32 model (autocast)")
        self.autocast = self.dtype != own
        self.weights = DecodeWeights(model, dtype=self.dtype, fuse=fuse)
        self.compiled = compile_step
        self._step_fn = torch.compile(self._step_impl, dynamic=True) if compile_step else self._step_impl

    def _precision(self):
        dev = self.model.lm_head.weight.device.type
        return torch.autocast(dev, dtype=self.dtype) if self.autocast else contextlib.nullcontext()

    # ---- state ----------------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor, capacity: int) -> torch.Tensor:
        """Starts a batch: input_ids [B, P] left-padded, prompt_mask [B, P] bool. Returns the
        logits [B, V] of the next token of each row."""
        self.weights.sync()  # the model's current weights (rebuilt after an optimizer step)
        B, P = input_ids.shape
        dev = input_ids.device
        self.keys = [None] * len(self.core.layers)
        self.values = [None] * len(self.core.layers)
        self.valid = torch.zeros(B, capacity, dtype=torch.bool, device=dev)
        self.valid[:, :P] = prompt_mask
        self.capacity, self.length = capacity, P
        self.next_pos = prompt_mask.sum(1)  # [B]: the position of each row's next token
        positions = (prompt_mask.long().cumsum(1) - 1).clamp_(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril_()
        # a pad query attends to itself only (no row of the mask may be empty); its output is unused
        mask = (causal & prompt_mask[:, None, :]) | torch.eye(P, dtype=torch.bool, device=dev)
        with self._precision():
            x = self._layers(self.core.embed_tokens(input_ids), positions, mask[:, None], slot=None)
            return self.weights.head(self.core.norm(x[:, -1]))[0]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row [B]; returns the logits [B, V] of the next one."""
        if self.length >= self.capacity:
            raise RuntimeError("StaticDecoder: the cache is full (more steps than max_new_tokens)")
        slot = torch.tensor([self.length], device=tokens.device)  # a tensor: one compiled graph for all steps
        self.valid[:, self.length] = True
        positions = self.next_pos[:, None]
        self.next_pos = self.next_pos + 1
        self.length += 1
        with self._precision():
            return self._step_fn(tokens, positions, slot)

    def keep(self, rows: torch.Tensor) -> None:
        """Keeps only `rows` (indices into the current batch) of every per-row state."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.valid = self.valid.index_select(0, rows)
        self.next_pos = self.next_pos.index_select(0, rows)

    # ---- the computation ------------------------------------------------------------------------

    def _step_impl(self, tokens, positions, slot):
        width = self.capacity if self.compiled else self.length  # compiled: one static shape
        mask = self.valid[:, None, None, :width]
        x = self._layers(self.core.embed_tokens(tokens[:, None]), positions, mask, slot=slot, width=width)
        return self.weights.head(self.core.norm(x[:, -1]))[0]

    def _layers(self, x, positions, mask, *, slot, width=None):
        """All decoder layers over x [B, T, H]; slot None = the prefill (T = P, written at 0)."""
        cos, sin = self.core.rotary_emb(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        B, T, _ = x.shape
        for i, (layer, w) in enumerate(zip(self.core.layers, self.weights.layers)):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = (y.view(B, T, -1, self.head_dim).transpose(1, 2) for y in run(w["qkv"], h))
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            if slot is None:  # prefill: allocate this layer's cache (in the sampling dtype)
                shape = (B, self.kv_heads, self.capacity, self.head_dim)
                self.keys[i] = torch.zeros(shape, dtype=self.dtype, device=k.device)
                self.values[i] = torch.zeros(shape, dtype=self.dtype, device=v.device)
                self.keys[i][:, :, :T] = k
                self.values[i][:, :, :T] = v
                o = F.scaled_dot_product_attention(q, self._same(k, q), self._same(v, q), attn_mask=mask,
                                                   scale=attn.scaling, enable_gqa=True)
            else:  # one query per row: the G query heads of a KV head as G queries (module docstring)
                self.keys[i].index_copy_(2, slot, k.to(self.dtype))
                self.values[i].index_copy_(2, slot, v.to(self.dtype))
                keys, values = self.keys[i][:, :, :width], self.values[i][:, :, :width]
                qg = q.reshape(B, self.kv_heads, -1, self.head_dim)
                o = F.scaled_dot_product_attention(qg, self._same(keys, qg), self._same(values, qg), attn_mask=mask,
                                                   scale=attn.scaling).reshape(B, -1, 1, self.head_dim)
            x = x + w["o"](o.transpose(1, 2).reshape(B, T, -1))[0]
            h = layer.post_attention_layernorm(x)
            if w["gate_up"] is None:
                x = x + layer.mlp(h)
            else:
                gate, up = run(w["gate_up"], h)
                x = x + w["down"](layer.mlp.act_fn(gate) * up)[0]
        return x

    def _same(self, t, like):
        """t in like's dtype, except under autocast, where SDPA casts its operands itself."""
        return t if self.autocast else t.to(like.dtype)
