"""Rollout engines: sampling responses for RL and evaluation (docs/sampling.md).

engine.py               the interface (RolloutEngine, SampleOutput) every engine implements
fast_sampler.py         FastSampler: static KV cache, per-row stop, log-probs from the same pass
static_decoder.py       its decoder over a transformers Llama's own modules
token_choice.py         greedy / temperature / top-k / top-p choice without full fp32 copies
transformers_engine.py  the fallback: transformers' generate
choose.py               make_engine: trainer.sampler = auto | fastalign | transformers
"""

from fastalign.sampling.choose import SAMPLERS, make_engine
from fastalign.sampling.engine import RolloutEngine, SampleOutput
from fastalign.sampling.fast_sampler import FastSampler
from fastalign.sampling.transformers_engine import TransformersEngine

__all__ = ["FastSampler", "RolloutEngine", "SampleOutput", "TransformersEngine", "make_engine", "SAMPLERS"]
