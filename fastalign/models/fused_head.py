"""Per-token log-probs of labels under a causal LM straight from its last hidden states: the
[tokens, V] logits are never built (fastalign.linear_gather_logprobs in place of the LM head).

    reason = fused_head_refusal(model)      # None: the fused head computes what the logits would
    logps, entropy = head_logps(model, inputs, targets, temperature=1.0, return_entropy=True)

`head_logps` runs the model's own forward, `model(**inputs)`, with its LM head's forward replaced
for that one call: instead of `logits = lm_head(hidden)` [.., V] the head returns
`linear_gather_logprobs(hidden, lm_head.weight, targets, bias=lm_head.bias)` [..] (stacked with
the entropy when asked), and the output's `logits` field carries that. Only the positions that
have a target go through the op (a DPO or RL batch's prompt positions have none). Going through
the model's forward, rather than calling its backbone and then the op, keeps every wrapper the
trainer puts around a model working unchanged:
  * DDP (fastalign.trainer.distributed.DDPModel): the call goes through DistributedDataParallel's
    forward, so the gradients are synchronised as for any forward;
  * FSDP2 (`fully_shard`): the root module's forward hooks all-gather its parameters (the head,
    tied to the embeddings or not, is in the root unit) before the head runs, so the head reads
    the full weight, and its post-forward hook registers the backward's unsharding on the output;
  * PEFT: the adapters act inside the backbone; AdapterFreeReference's disable_adapter / eval
    context applies; an adapted or replaced head (LoRA on lm_head, modules_to_save) is refused;
  * gradient checkpointing (it recomputes decoder layers only) and autocast: under autocast the
    eager head computes bf16/fp16 logits from operands cast to the autocast dtype; the fused head
    casts hidden, weight and bias the same way and runs the op with autocast off (its logits
    tiles are rounded to that dtype, as the eager GEMM's output is).

So the two paths differ only in how the head GEMM is blocked (per token tile vs all tokens at
once) and in the order of the log-sum-exp's sum (tests/test_fused_head.py states the bounds).

`fused_head_refusal(model)` is the one decision: None only for the transformers classes whose
forward was read to be exactly `logits = self.lm_head(hidden_states)` with nothing applied to
the logits afterwards (FUSABLE; the test checks their source), a plain `nn.Linear` head without
hooks, and no logit scaling or soft-capping in the config; anything else (Gemma 2's soft-cap,
Cohere's logit scale, a custom head, a subclass with its own forward, a scalar-head model) gets a
reason and the caller computes the full logits.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fastalign.models.adapters import AdapterFreeReference, is_peft_model
from fastalign.ops.linear_logprobs import linear_gather_logprobs

# transformers classes whose forward is `logits = self.lm_head(hidden_states)` and returns those
# logits untouched (read in transformers 5.25; tests/test_fused_head.py re-checks the source)
FUSABLE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel")
# config attributes that would change the logits after the head (Gemma 2/3, Cohere, Granite)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def causal_lm(model):
    """The transformers causal LM inside the trainer's wrappers: DDP views (an object whose
    `module` is the model), AdapterFreeReference (its policy), peft models (their base model)."""
    for _ in range(8):
        if isinstance(model, AdapterFreeReference):
            model = model.policy
        elif is_peft_model(model):
            model = model.get_base_model()
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
                not isinstance(model, nn.Module) and isinstance(getattr(model, "module", None), nn.Module)):
            model = model.module
        else:
            break
    return model


def _fusable_class(lm):
    """The FUSABLE transformers class `lm` is an instance of (by its MRO: nothing is imported)."""
    for cls in type(lm).__mro__:
        if cls.__name__ in FUSABLE and cls.__module__.startswith("transformers.models."):
            return cls
    return None


def fused_head_refusal(model) -> str | None:
    """None when `head_logps(model, ...)` computes exactly what `model(...).logits` followed by
    gather_logprobs does (up to summation order), else why not (then use the logits)."""
    lm = causal_lm(model)
    name = type(lm).__name__
    cls = _fusable_class(lm)
    if cls is None:
        return (f"{name} is not one of the causal LMs whose head is known to be a plain projection "
                f"({', '.join(FUSABLE)})")
    if type(lm).forward is not cls.forward:
        return f"{name} overrides {cls.__name__}.forward"
    config = getattr(lm, "config", None)
    for attr in _LOGIT_TRANSFORMS:
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"{name} transforms its logits (config.{attr} = {getattr(config, attr)!r})"
    head = lm.get_output_embeddings()
    if head is None or head is not getattr(lm, "lm_head", None):
        return f"{name}'s output embeddings are not its lm_head"
    if type(head) is not nn.Linear:
        return f"{name}'s lm_head is a {type(head).__name__}, not a plain nn.Linear (e.g. adapted by peft)"
    if "forward" in head.__dict__ or head._forward_hooks or head._forward_pre_hooks:
        return f"{name}'s lm_head has a replaced forward or forward hooks"
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        return "global module forward hooks are registered"
    if head.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{name}'s lm_head weight is {head.weight.dtype}"
    if not _plain(head.weight) and not _fsdp_root(lm):  # FSDP2's root forward all-gathers it (module docstring)
        return f"{name}'s lm_head weight is a {type(head.weight).__name__} outside an FSDP2-sharded model"
    return None


def _plain(weight) -> bool:
    return type(weight) in (torch.Tensor, nn.Parameter)


def _fsdp_root(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _scored_positions_only(hidden, weight, bias, targets, temperature, ignore_index, return_entropy) -> tuple:
    """linear_gather_logprobs on the positions that have a target only (a DPO or RL batch's
    prompt and padding positions have none: 3/4 of the e2e DPO batch), 0 elsewhere, as the op
    itself gives there; gradients reach the scored positions' hidden states only, as in the op."""
    n, size = targets.numel(), hidden.shape[-1]
    flat_t = targets.reshape(n)
    rows = hidden.reshape(n, size)
    scored = flat_t != ignore_index
    with torch.autocast(hidden.device.type, enabled=False):
        if bool(scored.all()):
            res = linear_gather_logprobs(rows, weight, flat_t, bias=bias, temperature=temperature,
                                         ignore_index=ignore_index, return_entropy=return_entropy)
            res = res if return_entropy else (res,)
        else:
            idx = scored.nonzero().squeeze(1)
            got = linear_gather_logprobs(rows.index_select(0, idx), weight, flat_t.index_select(0, idx), bias=bias,
                                         temperature=temperature, ignore_index=ignore_index,
                                         return_entropy=return_entropy)
            got = got if return_entropy else (got,)
            res = tuple(g.new_zeros(n).index_copy(0, idx, g) for g in got)  # out of place: differentiable
    return tuple(r.view(targets.shape) for r in res)


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward):
    module.forward = forward  # an instance attribute: nn.Module.__call__ looks up self.forward
    try:
        yield
    finally:
        del module.forward  # the class's forward again


def head_logps(model, inputs: dict, targets: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
               return_entropy: bool = False) -> tuple:
    """(log-probs,) or (log-probs, entropy), fp32 of targets' shape, of `targets` [B, T] (the
    token each position predicts; ignore_index: 0 and no gradient) under `model(**inputs)`,
    whose hidden states must be [B, T, H]; the logits are never built. Only for models that
    fused_head_refusal accepts."""
    head = causal_lm(model).get_output_embeddings()
    called = []

    def fused(hidden):
        called.append(True)
        weight, bias = head.weight, head.bias
        dev = hidden.device.type
        if not _plain(weight):  # fused_head_refusal lets a DTensor through only for FSDP2, which unshards it
            raise RuntimeError(f"the fused head got a {type(weight).__name__} weight, not the full one; "
                               "set model.fused_head=false")
        if torch.is_autocast_enabled(dev):  # the operands the eager head's GEMM would get
            dtype = torch.get_autocast_dtype(dev)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        res = _scored_positions_only(hidden, weight, bias, targets, temperature, ignore_index, return_entropy)
        # one output tensor (FSDP2 hooks the backward's unsharding onto the forward's outputs)
        return torch.stack(res, -1) if return_entropy else res[0]

    with _forward_replaced(head, fused):
        out = model(**inputs).logits
    if not called:
        raise RuntimeError(f"{type(causal_lm(model)).__name__}'s forward did not call its lm_head")
    # contiguous: a strided view would make later reductions (e.g. a row sum) round differently
    # from the same values computed without the entropy
    return tuple(o.contiguous() for o in out.unbind(-1)) if return_entropy else (out,)
