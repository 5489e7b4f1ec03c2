"""FastSampler: batched sampling with a static KV cache, per-row stopping and the sampled tokens'
log-probs from the same pass.

    sampler = FastSampler(model, tokenizer, max_batch=64)
    out = sampler.sample(prompt_ids, max_new_tokens=128, temperature=0.7, top_p=0.9, seed=0)
    out.token_ids   # list[list[int]], cut after the first EOS (kept)
    out.logprobs    # list of fp32 [len] tensors: log_softmax(logits / T)[token] (no top-k/top-p renormalisation)
    out.entropies   # list of fp32 [len] tensors: the entropy of softmax(logits / T) at each step
    out.truncated   # responses that reached max_new_tokens without EOS

Prompts are taken `max_batch` at a time (left-padded to the chunk's longest). Each step: the
decoder (static_decoder.py) gives the next-token logits of the rows still running, the token is
chosen (token_choice.py), its log-prob and entropy come from fastalign.gather_logprobs on the same
logits -- the function the trainer scores responses with, so "old" log-probs from the sampler and
from a trainer forward differ only by the forward's rounding. A row that emits EOS stops: it
is dropped from the batch once enough rows have finished to pay for copying the cache (an
eighth of the batch), and the loop ends when every row has finished.

The log-probs use the temperature given, also for greedy decoding (do_sample=False).

dtype: the sampling dtype -- "auto" (the model's own: fp32 for an fp32 model, exactly today's
numbers), "fp32" or "bf16". "bf16" on an fp32 model decodes under bf16 autocast with the weights
cast once (static_decoder.py; ~2x the fp32 matmul rate on CPUs with AVX512-BF16/AMX and on GPUs);
its log-probs are then of the bf16-rounded forward, not of the fp32 model.
"""

from __future__ import annotations

import torch

from fastalign.ops.logprobs import gather_logprobs
from fastalign.sampling.engine import RolloutEngine, SampleOutput, as_generator, check_sample_args
from fastalign.sampling.static_decoder import StaticDecoder
from fastalign.sampling.token_choice import choose_tokens

# Finished rows are dropped from the batch once they are at least this fraction of it.
COMPACT_FRACTION = 1 / 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sampling_dtype(dtype, model) -> torch.dtype:
    """The torch dtype FastSampler samples `model` in for dtype "auto" | "fp32" | "bf16"."""
    if dtype == "auto":
        return next(model.parameters()).dtype
    if dtype not in DTYPES:
        raise ValueError(f"FastSampler: dtype must be 'auto', 'fp32' or 'bf16', got {dtype!r}")
    return DTYPES[dtype]


class FastSampler(RolloutEngine):
    name = "fastalign"
    gives_logprobs = True

    def __init__(self, model, tokenizer, *, max_batch: int = 64, compile: bool | str = "auto", eos_token_id=None,
                 dtype: str = "auto", fuse: bool = True):
        super().__init__(model, tokenizer, max_batch=max_batch, eos_token_id=eos_token_id)
        if compile not in ("auto", True, False):
            raise ValueError(f"FastSampler: compile must be 'auto', True or False, got {compile!r}")
        if not isinstance(fuse, bool):
            raise ValueError(f"FastSampler: fuse must be a bool, got {fuse!r}")
        device = next(model.parameters()).device
        # torch.compile is for CUDA (launch overhead); on the CPU it compiled for minutes and is not
        # measured to pay (benchmarks/RESULTS.md)
        compile_step = device.type == "cuda" if compile == "auto" else compile
        self.dtype = sampling_dtype(dtype, model)
        self.decoder = StaticDecoder(model, compile_step=compile_step, dtype=self.dtype, fuse=fuse)
        self.device = device

    @torch.no_grad()
    def sample(self, prompt_ids, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, do_sample=True, seed=None):
        check_sample_args(prompt_ids, self.model.get_input_embeddings().num_embeddings, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample, seed=seed)
        generator = as_generator(seed, self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            tokens, logps, ents, truncated = [], [], [], 0
            for i in range(0, len(prompt_ids), self.max_batch):
                out = self._chunk(prompt_ids[i: i + self.max_batch], max_new_tokens, float(temperature), top_k,
                                  float(top_p), do_sample, generator)
                tokens += out.token_ids
                logps += out.logprobs
                ents += out.entropies
                truncated += out.truncated
        finally:
            if was_training:
                self.model.train()
        return SampleOutput(tokens, logps, truncated, ents)

    def _chunk(self, prompts, max_new_tokens, temperature, top_k, top_p, do_sample, generator) -> SampleOutput:
        dev = self.device
        ids, mask = self.left_pad(prompts, dev)
        B, width = ids.shape
        eos = torch.tensor(sorted(self.eos), device=dev)
        out_tok = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
        out_lp = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=dev)
        out_ent = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=dev)
        length = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)  # until an EOS says otherwise
        rows = torch.arange(B, device=dev)         # batch row -> prompt index
        done = torch.zeros(B, dtype=torch.bool, device=dev)  # per batch row: emitted EOS already
        logits = self.decoder.prefill(ids, mask, width + max_new_tokens)
        for t in range(max_new_tokens):
            tok = choose_tokens(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator)
            lp, ent = gather_logprobs(logits, tok, temperature=temperature, return_entropy=True)
            out_tok[rows, t], out_lp[rows, t], out_ent[rows, t] = tok, lp, ent  # rows already done: cut below
            ended = torch.isin(tok, eos) & ~done
            length[rows[ended]] = t + 1
            done |= ended
            n_done = int(done.sum())
            if n_done == len(rows) or t == max_new_tokens - 1:
                break
            if n_done >= max(1, COMPACT_FRACTION * len(rows)):
                live = (~done).nonzero().squeeze(1)
                self.decoder.keep(live)
                rows, tok, done = rows[live], tok[live], done[live]
            logits = self.decoder.step(tok)
        n = length.tolist()
        toks = out_tok.tolist()
        return SampleOutput([toks[i][: n[i]] for i in range(B)], [out_lp[i, : n[i]] for i in range(B)],
                            sum(x == max_new_tokens and toks[i][x - 1] not in self.eos for i, x in enumerate(n)),
                            [out_ent[i, : n[i]] for i in range(B)])
