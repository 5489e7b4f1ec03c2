"""The data every contender of the end-to-end benchmark trains on: the same records, written once
as JSONL for fastalign's trainer (formats chat / preference / prompts) and given to TRL's
trainers as conversational datasets (prompt+completion / prompt+chosen+rejected / prompt), so both sides
render the same text through the same chat template.

Texts are random common English words (seeded). SFT and DPO texts are longer than the sequence
length, so every contender truncates each sequence to exactly `seq_len` tokens; GRPO prompts are
trimmed until the chat-templated prompt (with the generation prompt) has at most `prompt_len`
tokens, and the prompt length actually reached is recorded (`tokens_per_step` uses it)."""

from __future__ import annotations

import json
import os
import random

WORDS = ("the of and to in is was for on that with as by at from his her they be this have not are "
         "but had one all were when we there can an your which their said if will each about how up out "
         "them then she many some so these would other into has more two time like could see him long "
         "make thing look write go number way find use may water first who people day call now get come "
         "made part over new sound take only little work know place year live me back give most very after "
         "our just name good sentence man think say great where help through much before line right too "
         "mean old any same tell boy follow came want show also around form three small set put end does "
         "another well large must big even such because turn here why ask went men read need land different "
         "home us move try kind hand picture again change off play spell air away animal house point page "
         "letter mother answer found study still learn should world high every near add food between own "
         "below country plant last school father keep tree never start city earth eye light thought head "
         "under story saw left few while along might close something seem next hard open example begin life "
         "always those both paper together got group often run important until children side feet car mile "
         "night walk white sea began grow took river four carry state once book hear stop without second "
         "later miss idea enough eat face watch far real almost let above girl sometimes mountain cut young "
         "talk soon list song being leave family").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    msgs = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _fit_prompt(tokenizer, rng: random.Random, prompt_len: int) -> tuple[str, int]:
    """A prompt whose templated token count is at most prompt_len (as close as whole words allow)."""
    words = [rng.choice(WORDS) for _ in range(prompt_len)]
    while True:
        text = " ".join(words).capitalize() + "."
        n = len(_prompt_ids(tokenizer, text))
        if n <= prompt_len or len(words) == 1:
            return text, n
        words = words[: max(1, min(len(words) - 1, len(words) * prompt_len // n))]


def build(algo: str, tokenizer, *, n_records: int, seq_len: int, prompt_len: int, seed: int = 0) -> dict:
    """{"records": canonical records, "format": fastalign data.format, "prompt_tokens": int|None}.
    SFT: chat demonstrations longer than seq_len; DPO: pairs whose prompt + response exceed seq_len;
    GRPO: prompts of <= prompt_len templated tokens (the shortest reached is recorded)."""
    rng = random.Random(seed)
    if algo == "sft":
        recs = [{"messages": [{"role": "user", "content": _text(rng, seq_len // 8)},
                              {"role": "assistant", "content": _text(rng, seq_len * 2)}]} for _ in range(n_records)]
        return {"records": recs, "format": "chat", "prompt_tokens": None}
    if algo == "dpo":
        recs = [{"prompt": [{"role": "user", "content": _text(rng, seq_len // 8)}],
                 "chosen": [{"role": "assistant", "content": _text(rng, seq_len * 2)}],
                 "rejected": [{"role": "assistant", "content": _text(rng, seq_len * 2)}]} for _ in range(n_records)]
        return {"records": recs, "format": "preference", "prompt_tokens": None}
    if algo == "grpo":
        recs, lengths = [], []
        for _ in range(n_records):
            text, n = _fit_prompt(tokenizer, rng, prompt_len)
            recs.append({"prompt": [{"role": "user", "content": text}]})
            lengths.append(n)
        return {"records": recs, "format": "prompts", "prompt_tokens": min(lengths)}
    raise ValueError(f"unknown algorithm {algo!r}; expected sft, dpo or grpo")


def write_jsonl(records: list[dict], directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def trl_dataset(algo: str, records: list[dict]):
    """The records as the `datasets.Dataset` TRL's trainer for `algo` reads (conversational)."""
    import datasets

    if algo == "sft":  # prompt / completion: TRL's loss on the completion only, as fastalign's SFT
        return datasets.Dataset.from_dict({"prompt": [r["messages"][:-1] for r in records],
                                           "completion": [r["messages"][-1:] for r in records]})
    if algo == "dpo":
        return datasets.Dataset.from_dict({k: [r[k] for r in records] for k in ("prompt", "chosen", "rejected")})
    return datasets.Dataset.from_dict({"prompt": [r["prompt"] for r in records]})


def reward(text: str) -> float:
    """The one reward function of every GRPO contender: deterministic, cheap, spread within a group
    (vowel share of the response minus a small length cost)."""
    return sum(text.count(c) for c in "aeiou") / max(1, len(text)) - 0.001 * len(text)
