"""Loaders for the data formats people use, into fastalign's canonical records.

Canonical records (what the algorithms consume):
    demonstrations  {"messages": [{"role", "content"}, ..., {"role": "assistant", ...}]}
    preferences     {"prompt": str | messages, "chosen": str, "rejected": str}
    prompts         {"prompt": str | messages}
    unpaired        {"prompt": str | messages, "completion": str, "label": bool (True = desirable)}
    text            {"text": str}

File formats (JSONL, or a JSON array; `.txt` for plain text):
    alpaca      {"instruction", "input" (optional), "output"}
    chat        {"messages": [{"role", "content"}, ...]} (ShareGPT {"conversations": [{"from",
                "value"}]} too); every conversation must end with an assistant turn
    oasst       OpenAssistant message trees {"prompt": {"text", "role": "prompter", "replies":
                [...]}} (or the root node itself), or the flat message table of oasst1/oasst2
                (one message per line: {"message_id", "parent_id", "text", "role", "deleted"?});
                one demonstration per assistant message, with the path from the root as its
                history; deleted messages are dropped with their replies (counted)
    flan        {"inputs", "targets"}, or {"task", <fields>} rendered with FLAN-style templates
                ({"task": [[input_template, target_template], ...]}, Python format strings)
    preference  {"prompt", "chosen", "rejected"}: plain strings or chat (prompt a message list,
                chosen/rejected a string or a list ending in the assistant message); optional
                "margin": a number per pair (TRL's margin column; the reward model's BT margin)
    prompts     {"prompt"}
    kto         {"prompt", "completion", "label"}: TRL's unpaired preference format, one completion
                per record with a binary label (true = desirable; JSON true/false or 1/0); prompt
                a string or chat messages, completion a string or a list ending in the assistant
                message (rendered with the chat template, as the other formats)
    text        {"text"} (JSONL) or a .txt file with documents separated by blank lines
    stepwise    {"prompt", "completions": [step, ...], "labels": [bool, ...]}: step-labelled
                responses for process reward models (fastalign/data/stepwise.py)

A malformed record raises DataFormatError naming the file and line. Nothing is dropped silently:
every loader returns (records, stats) and records that carry nothing to learn (e.g. an empty
response) are counted in stats and reported.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from fastalign.data.records_io import DataFormatError, read_records as _read_records, str_field as _str_field, \
    where_of as _where
from fastalign.errors import ConfigError, DataNotFoundError

KINDS = {
    "alpaca": "demonstrations",
    "chat": "demonstrations",
    "oasst": "demonstrations",
    "flan": "demonstrations",
    "preference": "preferences",
    "prompts": "prompts",
    "text": "text",
    "stepwise": "steps",
    "kto": "unpaired",
}
ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "system": "system"}


def _messages(value, where, field):
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{where}: {field!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataFormatError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in ROLES:
            raise DataFormatError(f"{where}: {field}[{i}] has role {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise DataFormatError(f"{where}: {field}[{i}] content must be a string, got {type(content).__name__}")
        out.append({"role": ROLES[role], "content": content})
    return out


# ---- per-format record parsers: (obj, where, stats, **options) -> list of canonical records ----


def _alpaca(obj, where, stats, **_):
    instruction = _str_field(obj, "instruction", where)
    inp = _str_field(obj, "input", where, required=False)
    output = _str_field(obj, "output", where, allow_empty=True)
    if not output.strip():
        stats["skipped: empty output"] += 1
        return []
    user = instruction + ("\n\n" + inp if inp.strip() else "")
    return [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}]


def _chat(obj, where, stats, **_):
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    key = "messages" if "messages" in obj else "conversations" if "conversations" in obj else None
    if key is None:
        raise DataFormatError(f"{where}: missing field 'messages' (fields present: {sorted(obj)})")
    msgs = _messages(obj[key], where, key)
    if msgs[-1]["role"] != "assistant":
        raise DataFormatError(f"{where}: the conversation must end with an assistant message, ends with {msgs[-1]['role']!r}")
    if not msgs[-1]["content"].strip():
        stats["skipped: empty assistant message"] += 1
        return []
    return [{"messages": msgs}]


def _oasst(obj, where, stats, **_):
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    root = obj.get("prompt", obj) if isinstance(obj.get("prompt"), dict) else obj
    out = []

    def walk(node, history, path):
        if not isinstance(node, dict):
            raise DataFormatError(f"{where}: tree node {path} must be an object")
        text = node.get("text")
        role = node.get("role")
        if not isinstance(text, str):
            raise DataFormatError(f"{where}: tree node {path} needs a string 'text'")
        if role not in ROLES:
            raise DataFormatError(f"{where}: tree node {path} has role {role!r}; expected 'prompter' or 'assistant'")
        msg = {"role": ROLES[role], "content": text}
        if msg["role"] == "assistant":
            if not history:
                raise DataFormatError(f"{where}: tree node {path} is an assistant message without a prompt")
            if text.strip():
                out.append({"messages": history + [msg]})
            else:
                stats["skipped: empty assistant message"] += 1
        replies = node.get("replies", [])
        if not isinstance(replies, list):
            raise DataFormatError(f"{where}: tree node {path}: 'replies' must be a list")
        for i, r in enumerate(replies):
            walk(r, history + [msg], f"{path}.replies[{i}]")

    walk(root, [], "root")
    if not out:
        stats["skipped: tree without assistant replies"] += 1
    return out


def _flan(obj, where, stats, templates=None, **_):
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "inputs" in obj:
        inputs = _str_field(obj, "inputs", where)
        targets = _str_field(obj, "targets", where, allow_empty=True)
    else:
        task = _str_field(obj, "task", where)
        if not templates or task not in templates:
            raise DataFormatError(
                f"{where}: record has no 'inputs'/'targets' and no template for task {task!r} "
                f"(templates for: {sorted(templates or {})})"
            )
        options = templates[task]
        # deterministic template choice per record, spread over the task's templates
        stats[f"template use: {task}"] += 1
        in_tpl, out_tpl = options[(stats[f"template use: {task}"] - 1) % len(options)]
        try:
            inputs, targets = in_tpl.format(**obj), out_tpl.format(**obj)
        except (KeyError, IndexError) as e:
            raise DataFormatError(f"{where}: template for task {task!r} needs field {e} missing from the record") from None
    if not targets.strip():
        stats["skipped: empty target"] += 1
        return []
    return [{"messages": [{"role": "user", "content": inputs}, {"role": "assistant", "content": targets}]}]


def _response(value, where, field):
    if isinstance(value, str):
        return value
    msgs = _messages(value, where, field)
    if msgs[-1]["role"] != "assistant":
        raise DataFormatError(f"{where}: {field!r} must end with an assistant message")
    return msgs[-1]["content"]


def _preference(obj, where, stats, **_):
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for k in ("chosen", "rejected"):
        if k not in obj:
            raise DataFormatError(f"{where}: missing field {k!r} (fields present: {sorted(obj)})")
    if "prompt" in obj:
        p = obj["prompt"]
        prompt = p if isinstance(p, str) else _messages(p, where, "prompt")
        if isinstance(prompt, str) and not prompt.strip():
            raise DataFormatError(f"{where}: field 'prompt' is empty")
    else:
        # implicit prompt: chosen and rejected are whole conversations sharing all but the last turn
        c, r = _messages(obj["chosen"], where, "chosen"), _messages(obj["rejected"], where, "rejected")
        if len(c) < 2 or c[:-1] != r[:-1]:
            raise DataFormatError(f"{where}: no 'prompt' and chosen/rejected do not share a prompt")
        prompt = c[:-1]
    chosen, rejected = _response(obj["chosen"], where, "chosen"), _response(obj["rejected"], where, "rejected")
    if chosen == rejected:
        stats["skipped: chosen == rejected"] += 1
        return []
    rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if obj.get("margin") is not None:
        m = obj["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m != m or m in (float("inf"), float("-inf")):
            raise DataFormatError(f"{where}: field 'margin' must be a finite number, got {m!r}")
        rec["margin"] = float(m)
    return [rec]


def _prompts(obj, where, stats, **_):
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise DataFormatError(f"{where}: expected an object with a 'prompt' field")
    p = obj["prompt"]
    prompt = p if isinstance(p, str) else _messages(p, where, "prompt")
    if isinstance(prompt, str) and not prompt.strip():
        raise DataFormatError(f"{where}: field 'prompt' is empty")
    return [{"prompt": prompt}]


def _kto(obj, where, stats, **_):
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for k in ("prompt", "completion", "label"):
        if k not in obj:
            raise DataFormatError(f"{where}: missing field {k!r} (fields present: {sorted(obj)})")
    p = obj["prompt"]
    prompt = p if isinstance(p, str) else _messages(p, where, "prompt")
    if isinstance(prompt, str) and not prompt.strip():
        raise DataFormatError(f"{where}: field 'prompt' is empty")
    label = obj["label"]
    # a bool, or the integers 0/1 (JSON has no other spelling of a binary label we accept: a
    # string "false" would be truthy)
    if not (isinstance(label, bool) or (type(label) is int and label in (0, 1))):
        raise DataFormatError(f"{where}: field 'label' must be true/false (or 1/0: 1 = desirable), got {label!r}")
    completion = _response(obj["completion"], where, "completion")
    if not completion.strip():
        stats["skipped: empty completion"] += 1
        return []
    stats["desirable" if label else "undesirable"] += 1
    return [{"prompt": prompt, "completion": completion, "label": bool(label)}]


def _text(obj, where, stats, **_):
    t = _str_field(obj, "text", where, allow_empty=True)
    if not t.strip():
        stats["skipped: empty text"] += 1
        return []
    return [{"text": t}]


def _stepwise(obj, where, stats, **_):
    """Step-labelled responses (fastalign/data/stepwise.py tokenises them): one bool per step."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for k in ("prompt", "completions", "labels"):
        if k not in obj:
            raise DataFormatError(f"{where}: missing field {k!r} (fields present: {sorted(obj)})")
    prompt = _prompts(obj, where, stats)[0]["prompt"]
    steps, labels = obj["completions"], obj["labels"]
    if not isinstance(steps, list):
        raise DataFormatError(f"{where}: field 'completions' must be a list of steps (strings), got "
                              f"{type(steps).__name__}")
    if not isinstance(labels, list):
        raise DataFormatError(f"{where}: field 'labels' must be a list of booleans, got {type(labels).__name__}")
    for i, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise DataFormatError(f"{where}: completions[{i}] must be a non-empty string, got {step!r}")
    for i, label in enumerate(labels):
        if not isinstance(label, bool):
            raise DataFormatError(f"{where}: labels[{i}] must be true or false, got {label!r}")
    if len(labels) != len(steps):
        raise DataFormatError(f"{where}: {len(steps)} steps in 'completions' but {len(labels)} 'labels' (one per step)")
    if not steps:
        stats["skipped: no steps"] += 1
        return []
    return [{"prompt": prompt, "completions": steps, "labels": labels}]


def _is_flat_oasst(path) -> bool:
    for _, obj in _read_records(path):
        return isinstance(obj, dict) and "message_id" in obj
    return False


def _oasst_trees(path, stats):
    """The flat OASST message table -> (where, nested root node) per conversation tree, roots in
    file order. Every message must have a message_id; a parent_id that names no message is an
    error (a table cut mid-tree would otherwise lose replies silently)."""
    nodes, order = {}, []
    for line, obj in _read_records(path):
        where = _where(path, line)
        stats["records read"] += 1
        if not isinstance(obj, dict) or not isinstance(obj.get("message_id"), str):
            raise DataFormatError(f"{where}: a flat OASST row needs a string 'message_id'")
        mid = obj["message_id"]
        if mid in nodes:
            raise DataFormatError(f"{where}: duplicate message_id {mid!r}")
        nodes[mid] = {"text": obj.get("text"), "role": obj.get("role"), "replies": [], "_parent": obj.get("parent_id"),
                      "_where": where, "_deleted": bool(obj.get("deleted", False))}
        order.append(mid)
    roots = []
    for mid in order:
        node = nodes[mid]
        parent = node.pop("_parent")
        if parent is None:
            roots.append(node)
        elif parent not in nodes:
            raise DataFormatError(f"{node['_where']}: message {mid!r} replies to parent_id {parent!r}, which is not in the file")
        else:
            nodes[parent]["replies"].append(node)

    def prune(node):  # drop deleted messages with their subtrees
        kept = []
        for r in node["replies"]:
            if r["_deleted"]:
                stats["skipped: deleted message (with its replies)"] += 1
            else:
                kept.append(prune(r))
        return {"text": node["text"], "role": node["role"], "replies": kept}

    for root in roots:
        if root["_deleted"]:
            stats["skipped: deleted message (with its replies)"] += 1
            continue
        yield root["_where"], prune(root)


_PARSERS = {"alpaca": _alpaca, "chat": _chat, "oasst": _oasst, "flan": _flan, "preference": _preference,
            "prompts": _prompts, "text": _text, "stepwise": _stepwise, "kto": _kto}


def load_records(fmt: str, path: str, *, templates=None, limit: int | None = None) -> tuple[list[dict], Counter]:
    """Reads `path` in format `fmt`; returns (canonical records, stats Counter). `templates`
    (dict or path of a JSON file) is for `flan`. `limit` keeps the first records."""
    if fmt not in _PARSERS:
        raise ConfigError(f"unknown data format {fmt!r}; known formats: {', '.join(sorted(_PARSERS))}")
    if not os.path.exists(path):
        raise DataNotFoundError(f"data file not found: {path}")
    if isinstance(templates, str):
        with open(templates, encoding="utf-8") as f:
            templates = json.load(f)
    stats = Counter()
    records = []
    if fmt == "text" and path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            docs = [d.strip() for d in f.read().split("\n\n")]
        records = [{"text": d} for d in docs if d]
    elif fmt == "oasst" and _is_flat_oasst(path):
        for where, root in _oasst_trees(path, stats):
            records.extend(_oasst(root, where, stats))
            if limit is not None and len(records) >= limit:
                records = records[:limit]
                break
    else:
        parse = _PARSERS[fmt]
        for line, obj in _read_records(path):
            stats["records read"] += 1
            records.extend(parse(obj, _where(path, line), stats, templates=templates))
            if limit is not None and len(records) >= limit:
                records = records[:limit]
                break
    stats["records kept"] = len(records)
    return records, stats


def kind_of(fmt: str) -> str:
    """The record kind ("demonstrations", "preferences", "prompts", "unpaired", "text", "steps") a format yields."""
    if fmt not in KINDS:
        raise ConfigError(f"unknown data format {fmt!r}; known formats: {', '.join(sorted(KINDS))}")
    return KINDS[fmt]


def describe(stats: Counter) -> str:
    """One line for logs: counts read/kept and every reason a record was skipped or changed."""
    return ", ".join(f"{k}: {v}" for k, v in stats.items() if v)
