"""The rollout-engine interface: what any sampler of responses must provide to fastalign.

An engine turns tokenized prompts into sampled responses. The trainer (and anyone else) holds an
engine, never a particular implementation, so a faster one plugs in without touching the
algorithms:

    class MyEngine(RolloutEngine):
        name = "my-engine"
        def sample(self, prompt_ids, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                   do_sample=True, seed=None) -> SampleOutput: ...

The contract of `sample` (every engine):
  * prompt_ids: list of token-id lists (no padding; lengths may differ);
  * returns one response per prompt, in order: its token ids, cut after the first end-of-sequence
    token, which is kept; a response that reached max_new_tokens without one counts in `truncated`;
  * temperature / top_k / top_p as transformers' sampling does (temperature first, then top-k,
    then top-p over what top-k left; top_k=0 and top_p=1 switch them off); do_sample=False is
    greedy decoding (argmax), and must give generate's tokens;
  * seed: a fixed seed gives the same responses on every call (None: the global torch RNG);
  * logprobs (optional: None when the engine cannot give them): per response an fp32 tensor
    of log_softmax(logits / temperature)[token] of each sampled token -- the temperature-scaled
    policy distribution *before* top-k / top-p, i.e. exactly what the trainer's
    gather_logprobs(logits, labels, temperature=T) computes for the same tokens. Top-k / top-p
    change which tokens can be drawn, not the log-probs reported (PPO's ratio is against the
    policy the trainer differentiates); `entropies` likewise (optional).

How vLLM or SGLang would plug in: a subclass holding the server/`LLM` object, which (1) loads the
trainer's current policy weights before sampling (vLLM: `llm.llm_engine.model_executor` weight
loading / `collective_rpc("load_weights")`; SGLang: `update_weights_from_tensor`), (2) maps the
arguments onto their SamplingParams (top_k=0 means "off" here, -1 there), and (3) asks for the
sampled token's log-prob of the *raw* temperature-scaled distribution (vLLM:
`logprobs=0` with `logprobs_mode="raw_logprobs"` applied after temperature; otherwise return
logprobs=None and let the trainer recompute them). `make_engine` in choose.py is where a new
engine name would be added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SampleOutput:
    token_ids: list                     # list[list[int]]: one response per prompt, EOS kept when emitted
    logprobs: list | None               # list of fp32 [len(response)] tensors (see the module docstring)
    truncated: int                      # responses that reached max_new_tokens without an EOS
    entropies: list | None = field(default=None)  # list of fp32 [len(response)]: entropy at each step


class RolloutEngine:
    """Base class of the rollout engines (see the module docstring for the contract)."""

    name = "engine"
    gives_logprobs = False  # whether sample() fills SampleOutput.logprobs

    def __init__(self, model, tokenizer, *, max_batch: int = 64, eos_token_id=None):
        """What the built-in engines share: prompts are sampled `max_batch` at a time, left-padded
        with the tokenizer's pad id (else the smallest EOS id), and stop at any id of eos_set."""
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"{type(self).__name__}: max_batch must be an int >= 1, got {max_batch!r}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.eos = eos_set(tokenizer, eos_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)

    def left_pad(self, prompts: list, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk of prompts as left-padded ids [B, width] and a bool mask of the real tokens."""
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
        return ids, mask

    def sample(self, prompt_ids: list, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, do_sample: bool = True, seed: int | None = None) -> SampleOutput:
        raise NotImplementedError


def check_sample_args(prompt_ids, vocab_size: int, *, max_new_tokens, temperature, top_k, top_p, do_sample,
                      seed) -> None:
    """The argument checks every engine shares: a ValueError naming the argument and what is expected."""
    if not isinstance(prompt_ids, (list, tuple)):
        raise ValueError(f"sample: prompt_ids must be a list of token-id lists, got {type(prompt_ids).__name__}")
    for i, p in enumerate(prompt_ids):
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise ValueError(f"sample: prompt_ids[{i}] must be a non-empty list of token ids, got {p!r}")
        bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"sample: prompt_ids[{i}] holds {bad[0]!r}, not a token id in [0, {vocab_size})")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"sample: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not (0 < float(temperature) < float("inf")):
        raise ValueError(f"sample: temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"sample: top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < float(top_p) <= 1:
        raise ValueError(f"sample: top_p must be in (0, 1] (1: off), got {top_p!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"sample: do_sample must be a bool, got {do_sample!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"sample: seed must be an int or None, got {seed!r}")


def cut_at_eos(rows: list, eos_ids: set) -> tuple[list, list]:
    """Each row cut after its first token in eos_ids (kept); returns (rows, whether each ended)."""
    out, ended = [], []
    for row in rows:
        stop = next((j for j, t in enumerate(row) if t in eos_ids), None)
        out.append(row if stop is None else row[: stop + 1])
        ended.append(stop is not None)
    return out, ended


def eos_set(tokenizer, eos_token_id=None) -> set:
    """The end-of-sequence ids: eos_token_id (an int or a list) when given, else the tokenizer's."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise ValueError("sampler: the tokenizer has no eos_token_id; pass eos_token_id=")
    return set(eos) if isinstance(eos, (list, tuple, set)) else {int(eos)}


def as_generator(seed, device) -> torch.Generator | None:
    """A private generator seeded with `seed` (None: use the global RNG)."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)
