"""Supervised fine-tuning: next-token loss on the completion tokens only.

Options: `packing` (concatenate examples into full rows of max_length; see data.collate.pack) and
midtraining-style mixing of plain-text "pretraining" data at `pretrain_ratio` (the fraction of
training rows that are text, loss on every token), read from `pretrain_data` (a text file in the
`text` format) or given as records in `pretrain_records`.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from fastalign.algorithms.base import Algorithm, AlgorithmConfig, token_logps
from fastalign.algorithms.registry import register_algorithm
from fastalign.data import collate as C
from fastalign.data.formats import load_records
from fastalign.errors import ConfigError, DataError
from fastalign.ops.preference import sequence_logps
from fastalign.options import option


@dataclass
class SFTConfig(AlgorithmConfig):
    packing: bool = option(False, "pack several examples per row (block-diagonal attention: same result)")
    pretrain_data: str | None = option(None, "a text file of plain-text rows for midtraining (relative to the "
                                             "config file, or bundled:NAME)", path=True)
    pretrain_ratio: float = option(0.0, "fraction of rows that are plain text from pretrain_data", ge=0, lt=1)
    seed: int = option(0, "seed of the text/demonstration mixing")


@register_algorithm("sft")
class SFT(Algorithm):
    """Supervised fine-tuning on demonstrations (loss on completion tokens only)."""

    config_class = SFTConfig
    data_kind = "demonstrations"
    models = ("policy",)
    trainable = ("policy",)
    pretrain_records: list | None = None

    def encode(self, records, tokenizer, max_length, stats: Counter) -> list:
        cfg = self.config
        rows = C.encode_demonstrations(records, tokenizer, max_length, stats)
        if cfg.pretrain_ratio > 0:
            text = self.pretrain_records
            if text is None:
                if not cfg.pretrain_data:
                    raise ConfigError("sft: pretrain_ratio > 0 needs pretrain_data (a text file) or pretrain_records")
                text, tstats = load_records("text", cfg.pretrain_data)
                stats.update({f"pretrain {k}": v for k, v in tstats.items()})
            windows = C.encode_text(text, tokenizer, max_length, stats)
            if not windows:
                raise DataError("sft: the pretraining data has no text")
            # n_text / (n_text + n_demo) = ratio; sample windows with replacement if needed
            n_text = round(cfg.pretrain_ratio / (1 - cfg.pretrain_ratio) * len(rows))
            rng = random.Random(cfg.seed)
            picked = [windows[rng.randrange(len(windows))] for _ in range(n_text)]
            stats["pretrain rows mixed in"] += len(picked)
            rows = rows + picked
        if cfg.packing:
            n = len(rows)
            rng = random.Random(cfg.seed)
            rng.shuffle(rows)  # mix demonstrations and text before packing
            rows = C.pack(rows, max_length)
            stats["packed: examples -> rows"] = f"{n} -> {len(rows)}"
        return rows

    def loss_units(self, batch) -> int:
        return int((batch["labels"][:, 1:] != C.IGNORE).sum())

    def loss(self, models, batch):
        logps, mask = token_logps(models["policy"], batch, packed=self.packing, fused_head=self.fused_head)
        n = mask.sum().clamp(min=1)
        loss_sum = -logps.sum()  # masked positions are exactly 0
        seq_nll = sequence_logps(logps.detach(), mask, reduce="sum")
        return loss_sum, {"loss": float(loss_sum.detach() / n), "seq_nll": float(-seq_nll.mean())}
