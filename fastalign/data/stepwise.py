"""Step-labelled data for process reward models: tokenisation and collation of the `stepwise`
format (read by fastalign/data/formats.py; TRL's stepwise supervision, e.g. trl-lib/math_shepherd):
    {"prompt": str | messages, "completions": [step, ...], "labels": [bool, ...]}
one label per step: whether that step is correct. Canonical records keep these three keys.

Tokenisation (as TRL's PRMTrainer.tokenize_row, trl/experimental/prm/prm_trainer.py -- not in the
TRL 1.16 wheel -- except the prompt, which goes through the chat template like every fastalign
prompt): the prompt, then each step tokenised on
its own followed by the step separator's tokens; a step's label sits on the last separator
token, whose hidden state has read the whole step; every other position is IGNORE. The labels
are therefore not shifted (unlike a language model's): position t is classified from the
hidden state at t.
"""

from __future__ import annotations

from collections import Counter

import torch

from fastalign.data.collate import IGNORE, _ids, pad, prompt_text


def separator_ids(tokenizer, separator: str) -> list:
    ids = _ids(tokenizer, separator) if isinstance(separator, str) else []
    if not ids:
        raise ValueError(f"step_separator must be a string that encodes to at least one token, got {separator!r}")
    return ids


def encode_steps(records, tokenizer, max_length, stats: Counter | None = None, *, separator: str = "\n"):
    """Stepwise records -> [{"input_ids", "labels", "n_steps"}]: labels 1/0 at each step's last
    separator token, IGNORE elsewhere; n_steps: the record's step count. A response longer than
    max_length is cut (as TRL does) and keeps the labels of the steps that fit (counted); one
    whose prompt leaves no room for a whole step is skipped (counted)."""
    stats = stats if stats is not None else Counter()
    sep = separator_ids(tokenizer, separator)
    out = []
    for r in records:
        ids = _ids(tokenizer, prompt_text(tokenizer, r["prompt"]))
        labels = [IGNORE] * len(ids)
        for step, ok in zip(r["completions"], r["labels"], strict=True):
            s = _ids(tokenizer, step) + sep
            ids += s
            labels += [IGNORE] * (len(s) - 1) + [int(bool(ok))]
        kept = sum(lab != IGNORE for lab in labels[:max_length])
        if kept == 0:
            stats["skipped: no whole step fits in max_length"] += 1
            continue
        if kept < len(r["completions"]):
            stats["truncated: steps cut at max_length"] += len(r["completions"]) - kept
        out.append({"input_ids": ids[:max_length], "labels": labels[:max_length], "n_steps": len(r["completions"])})
    return out


def collate_steps(examples, pad_id) -> dict:
    """{"input_ids", "attention_mask", "labels"} [B, T] right-padded (labels IGNORE at the
    padding) and "n_steps" [B]."""
    return {
        "input_ids": pad([e["input_ids"] for e in examples], pad_id),
        "attention_mask": pad([[1] * len(e["input_ids"]) for e in examples], 0),
        "labels": pad([e["labels"] for e in examples], IGNORE),
        "n_steps": torch.tensor([e["n_steps"] for e in examples], dtype=torch.long),
    }
