"""Hugging Face causal LMs: the loss (and per-token log-probs) from hidden states, logits never built.

    from fastalign.integrations.transformers import patch_causal_lm
    patch_causal_lm(model)            # any *ForCausalLM with an `lm_head` (Llama, Qwen2, Mistral, GPT-2, ...)
    out = model(input_ids, attention_mask=mask, labels=labels)
    out.loss, out.token_logps         # logits is None

With `labels`, the patched forward runs the decoder, then `fastalign.linear_gather_logprobs` on the
last hidden states and `lm_head.weight` (+ bias) for the shifted labels: memory for the loss no
longer grows with tokens x vocabulary. The loss is transformers' causal-LM loss: the mean
negative log-likelihood over labels != -100 (or the sum / `num_items_in_batch` when that is
passed, as the HF Trainer does under gradient accumulation); `shift_labels=` is honoured.
`out.token_logps` `[B, T]` (fp32) holds log p(label) at each position of `labels` (0 at the
last position and where the label is -100), for DPO/PPO-style use. Without labels, or with
`return_logits=True`, the original forward runs unchanged.

Models whose logits are not `hidden @ lm_head.weight.T (+ bias)` are refused: final logit
soft-capping (Gemma 2/3) cannot be expressed; a `logit_scale` (Cohere) or `logits_scaling`
(Granite) is applied as a temperature.
"""

from __future__ import annotations

import functools

import torch

import fastalign

__all__ = ["patch_causal_lm", "unpatch_causal_lm"]


def _temperature(config) -> float:
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError("patch_causal_lm: models with final_logit_softcapping (e.g. Gemma 2/3) are not supported")
    t = 1.0
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if scale not in (None, 1, 1.0):
        t /= float(scale)
    scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if scaling not in (None, 1, 1.0):
        t *= float(scaling)
    return t


def patch_causal_lm(model, *, ignore_index: int = -100):
    """Patches `model.forward` in place (see the module docstring); returns the model."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"patch_causal_lm: {type(model).__name__} has no nn.Linear lm_head")
    if not hasattr(model, "get_decoder"):
        raise TypeError(f"patch_causal_lm: {type(model).__name__} has no get_decoder()")
    if getattr(model, "_fastalign_original_forward", None) is not None:
        return model
    temperature = _temperature(model.config)
    original = model.forward

    @functools.wraps(original)
    def forward(*args, labels=None, num_items_in_batch=None, shift_labels=None, return_logits=False, **kwargs):
        if return_logits or (labels is None and shift_labels is None):
            given = {"labels": labels, "num_items_in_batch": num_items_in_batch, "shift_labels": shift_labels}
            return original(*args, **{k: v for k, v in given.items() if v is not None}, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("logits_to_keep", None)
        kwargs["return_dict"] = True
        outputs = model.get_decoder()(*args, **kwargs)
        hidden = outputs[0]
        if shift_labels is None:
            # position t predicts labels[t + 1]; the last position has no target
            pad = torch.full_like(labels[..., :1], ignore_index)
            shift_labels = torch.cat([labels[..., 1:], pad], dim=-1)
        shift_labels = shift_labels.to(hidden.device)
        logps = fastalign.linear_gather_logprobs(hidden, head.weight, shift_labels, bias=head.bias,
                                                 temperature=temperature, ignore_index=ignore_index)
        total = -logps.sum()
        if num_items_in_batch is not None:
            denom = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
            loss = total / denom
        else:
            loss = total / (shift_labels != ignore_index).sum()  # NaN for no target, as cross_entropy "mean"
        fields = CausalLMOutputWithPast.__dataclass_fields__
        extra = {k: v for k, v in outputs.items() if k in fields and k not in ("last_hidden_state", "loss", "logits")}
        out = CausalLMOutputWithPast(loss=loss, logits=None, **extra)
        out["token_logps"] = logps
        return out

    model._fastalign_original_forward = original
    model.forward = forward
    return model


def unpatch_causal_lm(model):
    """Restores the forward that patch_causal_lm replaced; returns the model."""
    original = getattr(model, "_fastalign_original_forward", None)
    if original is not None:
        model.forward = original
        model._fastalign_original_forward = None
    return model
