"""Scalar heads on a causal LM: the reward model (one score per sequence, read at its last
token) and the value model of PPO (one value per token) are the same module.

`ScalarHeadModel(lm)` runs the LM's base transformer (not its vocabulary head) and applies a
Linear(hidden, 1) to the final hidden states. Saved as the backbone LM (save_pretrained, so any
transformers model works) plus `score_head.safetensors`.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from fastalign.data import packing as P

HEAD_FILE = "score_head.safetensors"
HEAD_META = "fastalign_head.json"


def _base(lm):
    if hasattr(lm, "get_base_model"):  # a peft model: its adapters live inside the base model's layers
        lm = lm.get_base_model()
    prefix = getattr(lm, "base_model_prefix", "")
    base = getattr(lm, prefix, None) if prefix else None
    return base if base is not None else lm


class ScalarHeadModel(nn.Module):
    def __init__(self, lm, *, init_std: float | None = None, seed: int | None = None):
        """`seed`: the head's initialisation comes from its own generator (reproducible whatever
        ran before); None draws from the global RNG."""
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        self.head = nn.Linear(hidden, 1)
        std = init_std if init_std is not None else 1.0 / (hidden + 1) ** 0.5
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * std)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, attention_mask=None, *, packed: bool = False):
        """Per-token scalars [B, T] in fp32. packed=True (data.packing): one padding-free forward
        of the real tokens of the right-padded batch (fastalign.data.packing); 0 at the padding."""
        if not packed:
            return self._scalars(input_ids=input_ids, attention_mask=attention_mask)
        rows = P.pack_rows(input_ids, attention_mask)

        def forward(ids, position_ids):  # no attention mask: the positions delimit the sequences
            return self._scalars(input_ids=ids, position_ids=position_ids, use_cache=False)

        P.check_no_leak(self, forward, vocab_size=self.config.vocab_size, device=rows.input_ids.device)
        return rows.scatter(forward(rows.input_ids, rows.position_ids)[0])

    def _scalars(self, **inputs):
        out = _base(self.lm)(**inputs)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()

    def score(self, input_ids, attention_mask, *, packed: bool = False):
        """One score per sequence: the scalar at the last non-padding token (right padding)."""
        values = self(input_ids, attention_mask, packed=packed)
        last = attention_mask.long().sum(-1).clamp(min=1) - 1
        return values.gather(1, last[:, None]).squeeze(1)

    def save_pretrained(self, path, **kw):
        self.lm.save_pretrained(path, **kw)
        save_scalar_head(self.head, path)

    @classmethod
    def from_pretrained(cls, path, **kw):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        model = cls(AutoModelForCausalLM.from_pretrained(path, **kw))
        model.head.load_state_dict(load_file(os.path.join(path, HEAD_FILE)))
        return model


def save_scalar_head(head: nn.Module, path: str) -> None:
    """The score head's weights and the marker that makes `path` load as a ScalarHeadModel."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, os.path.join(path, HEAD_FILE))
    with open(os.path.join(path, HEAD_META), "w") as f:
        json.dump({"class": "ScalarHeadModel"}, f)


def is_scalar_head_dir(path) -> bool:
    return os.path.exists(os.path.join(path, HEAD_META))
