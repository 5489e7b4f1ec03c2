"""The fallback rollout engine: transformers' `model.generate` (any causal LM, any sharding).

It pads each chunk of prompts on the left, as generate expects, seeds the global RNG for the call
(generate takes no generator) and cuts each response after its first EOS. It gives no log-probs
(`gives_logprobs = False`): the trainer then scores the responses with a forward of its own.
"""

from __future__ import annotations

import torch

from fastalign.sampling.engine import RolloutEngine, SampleOutput, check_sample_args, cut_at_eos


class TransformersEngine(RolloutEngine):
    name = "transformers"
    gives_logprobs = False

    def __init__(self, model, tokenizer, *, max_batch: int = 64, synced_gpus: bool = False, eos_token_id=None):
        super().__init__(model, tokenizer, max_batch=max_batch, eos_token_id=eos_token_id)
        self.synced_gpus = synced_gpus

    @torch.no_grad()
    def sample(self, prompt_ids, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, do_sample=True, seed=None):
        check_sample_args(prompt_ids, self.model.get_input_embeddings().num_embeddings, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample, seed=seed)
        device = next(self.model.parameters()).device
        kw = dict(do_sample=True, temperature=float(temperature), top_k=top_k, top_p=float(top_p)) if do_sample \
            else dict(do_sample=False)
        if self.synced_gpus:  # every step is a collective: ranks whose responses all ended keep stepping
            kw["synced_gpus"] = True
        was_training = self.model.training
        self.model.eval()
        rows = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for i in range(0, len(prompt_ids), self.max_batch):
                ids, mask = self.left_pad(prompt_ids[i: i + self.max_batch], device)
                out = self.model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=max_new_tokens,
                                          pad_token_id=self.pad_id, eos_token_id=sorted(self.eos), **kw)
                rows += out[:, ids.shape[1]:].tolist()
        if was_training:
            self.model.train()
        rows, ended = cut_at_eos(rows, self.eos)
        return SampleOutput(rows, None, sum(not e for e in ended))
