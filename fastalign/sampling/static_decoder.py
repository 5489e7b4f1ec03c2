"""Batched decoding of a transformers Llama-family model with a preallocated (static) KV cache.

The decoder runs the model's own modules -- embedding, RMSNorms, q/k/v/o projections, rotary
embedding, MLP, final norm and LM head -- so every number but the attention is computed by the
very code `generate` runs; only the attention and the cache are its own:

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
the mask (compiled: one static shape, so no recompilation per step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama",)


def unsupported_reason(model) -> str | None:
    """None when StaticDecoder can run `model`, else why not (the fallback is transformers)."""
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
    def __init__(self, model, *, compile_step: bool = False):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FastSampler: cannot run this model: {reason}")
        self.model, self.core = model, model.model
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.compiled = compile_step
        self._step_fn = torch.compile(self._step_impl, dynamic=True) if compile_step else self._step_impl

    # ---- state ----------------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor, capacity: int) -> torch.Tensor:
        """Starts a batch: input_ids [B, P] left-padded, prompt_mask [B, P] bool. Returns the
        logits [B, V] of the next token of each row."""
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
        x = self._layers(self.core.embed_tokens(input_ids), positions, mask[:, None], slot=None)
        return self.model.lm_head(self.core.norm(x[:, -1]))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row [B]; returns the logits [B, V] of the next one."""
        if self.length >= self.capacity:
            raise RuntimeError("StaticDecoder: the cache is full (more steps than max_new_tokens)")
        slot = torch.tensor([self.length], device=tokens.device)  # a tensor: one compiled graph for all steps
        self.valid[:, self.length] = True
        positions = self.next_pos[:, None]
        self.next_pos = self.next_pos + 1
        self.length += 1
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
        return self.model.lm_head(self.core.norm(x[:, -1]))

    def _layers(self, x, positions, mask, *, slot, width=None):
        """All decoder layers over x [B, T, H]; slot None = the prefill (T = P, written at 0)."""
        cos, sin = self.core.rotary_emb(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        B, T, _ = x.shape
        for i, layer in enumerate(self.core.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            if slot is None:  # prefill: allocate this layer's cache in the dtype its keys come in
                shape = (B, self.kv_heads, self.capacity, self.head_dim)
                self.keys[i] = torch.zeros(shape, dtype=k.dtype, device=k.device)
                self.values[i] = torch.zeros(shape, dtype=v.dtype, device=v.device)
                self.keys[i][:, :, :T] = k
                self.values[i][:, :, :T] = v
                keys, values = k, v
            else:
                self.keys[i].index_copy_(2, slot, k.to(self.keys[i].dtype))
                self.values[i].index_copy_(2, slot, v.to(self.values[i].dtype))
                keys, values = self.keys[i][:, :, :width], self.values[i][:, :, :width]
            o = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                               scale=attn.scaling, enable_gqa=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x
