"""Step-labelled data for process reward models: the `stepwise` JSONL format, its tokenisation
and collation.

Format (TRL's stepwise supervision, e.g. trl-lib/math_shepherd):
    {"prompt": str | messages, "completions": [step, ...], "labels": [bool, ...]}
one label per step: whether that step is correct. Canonical records keep these three keys.

Tokenisation (as TRL 1.16's experimental PRMTrainer.tokenize_row, except the prompt, which goes
through the chat template like every fastalign prompt): the prompt, then each step tokenised on
its own followed by the step separator's tokens; a step's label sits on the last separator
token, whose hidden state has read the whole step; every other position is IGNORE. The labels
are therefore not shifted (unlike a language model's): position t is classified from the
hidden state at t.
"""

from __future__ import annotations

from collections import Counter

import torch

from fastalign.data.collate import IGNORE, _ids, pad, prompt_text
from fastalign.data.formats import DataFormatError, _messages


def parse_record(obj, where, stats, **_):
    """One stepwise JSONL object -> [canonical record] (or [] when it has no steps, counted)."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for k in ("prompt", "completions", "labels"):
        if k not in obj:
            raise DataFormatError(f"{where}: missing field {k!r} (fields present: {sorted(obj)})")
    p = obj["prompt"]
    prompt = p if isinstance(p, str) else _messages(p, where, "prompt")
    if isinstance(prompt, str) and not prompt.strip():
        raise DataFormatError(f"{where}: field 'prompt' is empty")
    steps, labels = obj["completions"], obj["labels"]
    if not isinstance(steps, list):
        raise DataFormatError(f"{where}: field 'completions' must be a list of steps (strings), got "
                              f"{type(steps).__name__}")
    if not isinstance(labels, list):
        raise DataFormatError(f"{where}: field 'labels' must be a list of booleans, got {type(labels).__name__}")
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            raise DataFormatError(f"{where}: completions[{i}] must be a string, got {type(s).__name__}")
        if not s.strip():
            raise DataFormatError(f"{where}: completions[{i}] is an empty step")
    for i, lab in enumerate(labels):
        if not isinstance(lab, bool):
            raise DataFormatError(f"{where}: labels[{i}] must be true or false, got {lab!r}")
    if len(labels) != len(steps):
        raise DataFormatError(f"{where}: {len(steps)} steps in 'completions' but {len(labels)} 'labels' (one per step)")
    if not steps:
        stats["skipped: no steps"] += 1
        return []
    return [{"prompt": prompt, "completions": list(steps), "labels": list(labels)}]


def separator_ids(tokenizer, separator: str) -> list:
    ids = _ids(tokenizer, separator)
    if not isinstance(separator, str) or not ids:
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
