"""Tokenisation and collation: canonical records -> token ids -> padded batches.

Prompts are rendered with the tokenizer's chat template when it has one, else with a simple
default ("### User:" / "### Assistant:" blocks ending in the EOS token). The completion is what
the full conversation adds after the prompt rendered with the generation prompt, so templates
that close an assistant turn with their own end token train on it.

Label convention: `labels[t]` is the token at position t, -100 where no loss is taken (prompt,
padding); the loss of position t predicts labels[t + 1] from logits[t] (the caller shifts).
"""

from __future__ import annotations

from collections import Counter

import torch

IGNORE = -100
_DEFAULT_HEADERS = {"user": "### User:\n", "assistant": "### Assistant:\n", "system": "### System:\n"}


def as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _default_render(tokenizer, messages, add_generation_prompt):
    eos = tokenizer.eos_token or ""
    text = tokenizer.bos_token or ""
    for m in messages:
        text += _DEFAULT_HEADERS[m["role"]] + m["content"] + (eos if m["role"] == "assistant" else "\n\n")
    if add_generation_prompt:
        text += _DEFAULT_HEADERS["assistant"]
    return text


def render(tokenizer, messages, add_generation_prompt=False) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return _default_render(tokenizer, messages, add_generation_prompt)


def prompt_text(tokenizer, prompt) -> str:
    """The prompt rendered up to where the assistant's answer starts."""
    return render(tokenizer, as_messages(prompt), add_generation_prompt=True)


def completion_text(tokenizer, prompt, response: str) -> str:
    """What follows prompt_text for this response (including the template's end-of-turn token)."""
    msgs = as_messages(prompt)
    p = render(tokenizer, msgs, add_generation_prompt=True)
    full = render(tokenizer, msgs + [{"role": "assistant", "content": response}])
    if full.startswith(p):
        return full[len(p):]
    return response + (tokenizer.eos_token or "")


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt_completion(tokenizer, prompt, response, max_length, stats: Counter):
    """(prompt_ids, completion_ids) within max_length tokens, or None if the prompt alone does
    not fit (counted in stats); an over-long completion is cut and counted."""
    p = _ids(tokenizer, prompt_text(tokenizer, prompt))
    c = _ids(tokenizer, completion_text(tokenizer, prompt, response))
    if len(p) >= max_length:
        stats["skipped: prompt longer than max_length"] += 1
        return None
    if len(p) + len(c) > max_length:
        stats["truncated: completion cut at max_length"] += 1
        c = c[: max_length - len(p)]
    return p, c


def encode_demonstrations(records, tokenizer, max_length, stats: Counter | None = None):
    """Demonstration records -> [{"input_ids", "labels"}] with the loss on the last assistant
    turn only (the history is prompt)."""
    stats = stats if stats is not None else Counter()
    out = []
    for r in records:
        msgs = r["messages"]
        enc = encode_prompt_completion(tokenizer, msgs[:-1], msgs[-1]["content"], max_length, stats)
        if enc is None:
            continue
        p, c = enc
        out.append({"input_ids": p + c, "labels": [IGNORE] * len(p) + c})
    return out


def encode_text(records, tokenizer, max_length, stats: Counter | None = None):
    """Plain-text records -> [{"input_ids", "labels"}] with the loss on every token, split into
    windows of max_length (pretraining-style data for mixing)."""
    stats = stats if stats is not None else Counter()
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for r in records:
        ids = _ids(tokenizer, r["text"]) + eos
        for i in range(0, len(ids), max_length):
            chunk = ids[i: i + max_length]
            if len(chunk) >= 2:
                out.append({"input_ids": chunk, "labels": list(chunk)})
    return out


def encode_preferences(records, tokenizer, max_length, stats: Counter | None = None):
    """Preference records -> [{"prompt_ids", "chosen_ids", "rejected_ids"}] (+ any
    precomputed "ref_chosen_logps"/"ref_rejected_logps" and a per-pair "margin" passed through)."""
    stats = stats if stats is not None else Counter()
    out = []
    for r in records:
        c = encode_prompt_completion(tokenizer, r["prompt"], r["chosen"], max_length, stats)
        j = encode_prompt_completion(tokenizer, r["prompt"], r["rejected"], max_length, stats)
        if c is None or j is None:
            continue
        ex = {"prompt_ids": c[0], "chosen_ids": c[1], "rejected_ids": j[1]}
        for k in ("ref_chosen_logps", "ref_rejected_logps", "margin"):
            if k in r:
                ex[k] = float(r[k])
        out.append(ex)
    return out


def encode_unpaired(records, tokenizer, max_length, stats: Counter | None = None):
    """Unpaired records {"prompt", "completion", "label"} -> [{"prompt_ids", "completion_ids",
    "label"}] (label a bool, True = desirable)."""
    stats = stats if stats is not None else Counter()
    out = []
    for r in records:
        enc = encode_prompt_completion(tokenizer, r["prompt"], r["completion"], max_length, stats)
        if enc is None:
            continue
        out.append({"prompt_ids": enc[0], "completion_ids": enc[1], "label": bool(r["label"])})
    return out


def encode_prompts(records, tokenizer, max_length, stats: Counter | None = None):
    stats = stats if stats is not None else Counter()
    out = []
    for r in records:
        p = _ids(tokenizer, prompt_text(tokenizer, r["prompt"]))
        if len(p) >= max_length:
            stats["skipped: prompt longer than max_length"] += 1
            continue
        out.append({"prompt_ids": p, **{k: v for k, v in r.items() if k != "prompt"}, "prompt": r["prompt"]})
    return out


def pack(examples, max_length):
    """Concatenates examples into rows of exactly max_length tokens (the last row may be
    shorter), without letting them see each other: each row carries `segment_ids` (which example
    a token belongs to) and `position_ids` (restarting at 0 with every example), from which
    collate_lm builds a block-diagonal causal attention mask. A packed row therefore computes
    exactly what its examples computed one by one (tests/test_data.py checks the logits). An
    example cut by a row boundary continues in the next row as its own segment, with its
    positions continuing; the first token of every row and of every example is never a target
    (nothing before it in its segment to predict it from)."""
    rows = []
    ids, labels, segs, pos = [], [], [], []

    def flush(n):
        nonlocal ids, labels, segs, pos
        rows.append({"input_ids": ids[:n], "labels": labels[:n], "segment_ids": segs[:n], "position_ids": pos[:n]})
        ids, labels, segs, pos = ids[n:], labels[n:], segs[n:], pos[n:]
        if labels:
            labels[0] = IGNORE

    for k, ex in enumerate(examples):
        e_ids, e_lab = list(ex["input_ids"]), list(ex["labels"])
        e_lab[0] = IGNORE  # not predicted from the previous example's tokens
        ids += e_ids
        labels += e_lab
        segs += [k] * len(e_ids)
        pos += list(range(len(e_ids)))
        while len(ids) >= max_length:
            flush(max_length)
    if len(ids) >= 2:
        flush(len(ids))
    return rows


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True where query t may attend to key s: s <= t within one segment.
    Padding carries segment -1, so a pad query attends to earlier pads only (never a row of all
    False, which would make softmax NaN) and no real token attends to a pad."""
    T = segment_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same)[:, None]


def pad(seqs, value, side="right"):
    T = max((len(s) for s in seqs), default=0)
    if side == "right":
        return torch.tensor([list(s) + [value] * (T - len(s)) for s in seqs], dtype=torch.long)
    return torch.tensor([[value] * (T - len(s)) + list(s) for s in seqs], dtype=torch.long)


def collate_lm(examples, pad_id):
    """{"input_ids", "attention_mask", "labels"} [B, T], right-padded. Packed rows (from `pack`)
    get a [B, 1, T, T] block-diagonal attention mask and "position_ids" instead of the [B, T]
    padding mask."""
    ids = pad([e["input_ids"] for e in examples], pad_id)
    labels = pad([e["labels"] for e in examples], IGNORE)
    if any("segment_ids" in e for e in examples):
        if not all("segment_ids" in e for e in examples):
            raise ValueError("collate_lm: a batch mixes packed and unpacked rows")
        segs = pad([e["segment_ids"] for e in examples], -1)
        return {"input_ids": ids, "attention_mask": packed_attention_mask(segs), "labels": labels,
                "position_ids": pad([e["position_ids"] for e in examples], 0)}
    mask = pad([[1] * len(e["input_ids"]) for e in examples], 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(examples, pad_id):
    """Chosen and rejected sequences in one right-padded batch [2B, T]: rows 0..B-1 chosen,
    B..2B-1 rejected (one forward pass for both); labels cover the completions only."""
    seqs = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + [e["prompt_ids"] + e["rejected_ids"] for e in examples]
    labels = [[IGNORE] * len(e["prompt_ids"]) + e["chosen_ids"] for e in examples] + [
        [IGNORE] * len(e["prompt_ids"]) + e["rejected_ids"] for e in examples
    ]
    batch = {
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "labels": pad(labels, IGNORE),
    }
    if all("ref_chosen_logps" in e for e in examples):
        batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples], dtype=torch.float32)
    if all("margin" in e for e in examples):  # the reward model's per-pair BT margin
        batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return batch


def _prompt_completion_rows(prompts, completions, pad_id):
    seqs = [p + c for p, c in zip(prompts, completions)]
    return {
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "labels": pad([[IGNORE] * len(p) + c for p, c in zip(prompts, completions)], IGNORE),
    }


def collate_unpaired(examples, pad_id, kl: bool = True):
    """Unpaired examples (KTO, BCO) as one right-padded batch [B, T] of prompt + completion, the
    loss on the completion ("input_ids", "attention_mask", "labels") and "label" [B] bool. With
    kl (KTO's KL estimate), also the KL batch "kl_input_ids", "kl_attention_mask", "kl_labels"
    [B, T']: the same completions under mismatched prompts, rotated by one within the batch as TRL
    does -- row i is prompt i with completion i-1 (row 0 takes the last one), so the KL pairs use
    the batch's own completions. The KL rows are not cut to max_length (a row is at most the
    longest prompt plus the longest completion of the batch)."""
    prompts = [e["prompt_ids"] for e in examples]
    completions = [e["completion_ids"] for e in examples]
    batch = _prompt_completion_rows(prompts, completions, pad_id)
    batch["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
    if kl:
        rotated = completions[-1:] + completions[:-1]
        batch.update({f"kl_{k}": v for k, v in _prompt_completion_rows(prompts, rotated, pad_id).items()})
    return batch


def collate_prompts(examples, pad_id):
    """Left-padded prompts for generation: {"input_ids", "attention_mask"} + the raw records."""
    ids = pad([e["prompt_ids"] for e in examples], pad_id, side="left")
    mask = pad([[1] * len(e["prompt_ids"]) for e in examples], 0, side="left")
    return {"input_ids": ids, "attention_mask": mask, "records": examples}
