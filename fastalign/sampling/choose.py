"""Picking the rollout engine for a model: `trainer.sampler` = auto | fastalign | transformers.

auto takes FastSampler where it supports the model (a plain, unsharded Llama-family
transformers model: static_decoder.unsupported_reason) and transformers' generate otherwise (GPT-2
and other architectures, FSDP2-sharded models -- whose forwards are collectives that every rank
must run in step, which generate's synced_gpus does). "fastalign" insists, and refuses a model it
cannot run with the reason.
"""

from __future__ import annotations

from fastalign.sampling.engine import RolloutEngine
from fastalign.sampling.fast_sampler import FastSampler
from fastalign.sampling.static_decoder import unsupported_reason
from fastalign.sampling.transformers_engine import TransformersEngine

SAMPLERS = ("auto", "fastalign", "transformers")


def fastalign_refusal(model, *, sharded: bool = False) -> str | None:
    """Why FastSampler cannot run `model` (None: it can)."""
    return "the model is sharded (FSDP2)" if sharded else unsupported_reason(model)


def make_engine(kind: str, model, tokenizer, *, max_batch: int = 64, sharded: bool = False,
                dtype: str = "auto") -> RolloutEngine:
    """The engine `kind` names for `model` (sharded: its forwards are collectives); dtype is
    FastSampler's sampling dtype (auto | fp32 | bf16; generate runs the model as it is)."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {kind!r}")
    reason = fastalign_refusal(model, sharded=sharded)
    if kind == "fastalign" and reason is not None:
        raise ValueError(f"sampler 'fastalign' cannot run this model: {reason}; use 'auto' or 'transformers'")
    if kind == "transformers" or reason is not None:
        return TransformersEngine(model, tokenizer, max_batch=max_batch, synced_gpus=sharded)
    return FastSampler(model, tokenizer, max_batch=max_batch, dtype=dtype)
