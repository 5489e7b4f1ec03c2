"""Data formats (bundled samples, malformed records with file:line), collation and masking,
packing and mixing, the synthetic task and its oracle.

Bounds. The comparisons here are exact by construction: the packing test compares the packed
model's logits with the same computation in which the rest of the row is replaced (masked keys
weigh exactly 0), and the oracle's scores are the same Python divisions as the expected fractions.
The one tolerance is statistical (a binomial flip rate, 4 standard deviations), see that test.
"""

import json
import math
import os
import random
from collections import Counter

import pytest
import torch

from fastalign.data import collate as C
from fastalign.data.formats import DataFormatError, load_records
from fastalign.data.synthetic import Oracle, SyntheticTask, corrupt, solve

BUNDLED = os.path.join(os.path.dirname(__file__), "..", "fastalign", "data", "bundled")


@pytest.fixture(scope="module")
def tok():
    from fastalign.models import tiny_tokenizer

    return tiny_tokenizer()


def _path(name):
    return os.path.join(BUNDLED, name)


# ---- loaders on the bundled samples ------------------------------------------------------------


def test_alpaca_sample():
    recs, st = load_records("alpaca", _path("alpaca_sample.json"))
    assert len(recs) == 5 and st["records read"] == 5
    assert recs[0]["messages"] == [{"role": "user", "content": "Reverse the list.\n\n3 1 4"},
                                   {"role": "assistant", "content": "4 1 3"}]
    assert recs[3]["messages"][0]["content"] == "Name a primary colour."  # empty input: no separator


def test_chat_sample_incl_sharegpt():
    recs, _ = load_records("chat", _path("chat_sample.jsonl"))
    assert len(recs) == 4
    assert recs[1]["messages"][0]["role"] == "system"
    assert recs[3]["messages"] == [{"role": "user", "content": "count 7 in 7 1 7"}, {"role": "assistant", "content": "2"}]


def test_oasst_tree_gives_one_demo_per_assistant_message():
    recs, st = load_records("oasst", _path("oasst_sample.jsonl"))
    assert st["records read"] == 2 and len(recs) == 4
    deep = [r for r in recs if len(r["messages"]) == 4]
    assert deep and [m["content"] for m in deep[0]["messages"]] == ["What is 2 + 2?", "4", "And 3 + 3?", "6"]


def test_oasst_flat_message_table(tmp_path):
    """oasst1/oasst2's flat export: one message per line, linked by parent_id, in any order;
    deleted messages go with their replies, counted."""
    rows = [
        {"message_id": "a2", "parent_id": "p1", "role": "assistant", "text": "4"},
        {"message_id": "p1", "parent_id": None, "role": "prompter", "text": "What is 2 + 2?"},
        {"message_id": "p2", "parent_id": "a2", "role": "prompter", "text": "And 3 + 3?"},
        {"message_id": "a3", "parent_id": "p2", "role": "assistant", "text": "6"},
        {"message_id": "a4", "parent_id": "p1", "role": "assistant", "text": "five", "deleted": True},
        {"message_id": "p5", "parent_id": "a4", "role": "prompter", "text": "why?"},
        {"message_id": "a5", "parent_id": "p5", "role": "assistant", "text": "joke"},
        {"message_id": "q1", "parent_id": None, "role": "prompter", "text": "sort 3 1"},
        {"message_id": "b1", "parent_id": "q1", "role": "assistant", "text": "1 3"},
    ]
    path = tmp_path / "oasst_flat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs, st = load_records("oasst", str(path))
    assert [[m["content"] for m in r["messages"]] for r in recs] == [
        ["What is 2 + 2?", "4"], ["What is 2 + 2?", "4", "And 3 + 3?", "6"], ["sort 3 1", "1 3"]]
    assert st["skipped: deleted message (with its replies)"] == 1 and st["records read"] == 9
    assert recs[0]["messages"][0]["role"] == "user"
    # a reply to a message that is not in the file is an error naming the line
    path.write_text(json.dumps({"message_id": "x", "parent_id": "nope", "role": "assistant", "text": "hi"}) + "\n")
    with pytest.raises(DataFormatError, match=r"oasst_flat.jsonl:1: .*parent_id 'nope'"):
        load_records("oasst", str(path))
    path.write_text(json.dumps({"message_id": "x", "parent_id": None, "role": "prompter", "text": "hi"}) + "\n"
                    + json.dumps({"message_id": "x", "parent_id": None, "role": "prompter", "text": "hi"}) + "\n")
    with pytest.raises(DataFormatError, match=r"oasst_flat.jsonl:2: duplicate message_id"):
        load_records("oasst", str(path))


def test_flan_templates():
    recs, _ = load_records("flan", _path("flan_sample.jsonl"), templates=_path("flan_templates.json"))
    users = [r["messages"][0]["content"] for r in recs]
    assert users[1] == "sort 4 1 3" and users[2] == "Put in ascending order: 9 7 8"  # templates rotate
    assert recs[2]["messages"][1]["content"] == "7 8 9"


def test_preference_plain_chat_and_implicit_prompt():
    recs, _ = load_records("preference", _path("preference_sample.jsonl"))
    assert recs[0] == {"prompt": "reverse 3 1 4", "chosen": "4 1 3", "rejected": "3 1 4"}
    assert recs[2]["prompt"] == [{"role": "user", "content": "repeat hi 2"}] and recs[2]["chosen"] == "hi hi"
    assert recs[3]["prompt"] == [{"role": "user", "content": "count 7 in 7 1 7"}] and recs[3]["rejected"] == "3"


def test_prompts_and_text():
    recs, _ = load_records("prompts", _path("prompts_sample.jsonl"))
    assert len(recs) == 3
    recs, _ = load_records("text", _path("text_sample.txt"))
    assert len(recs) == 3 and recs[0]["text"].startswith("Lists")


# ---- malformed records: file and line ----------------------------------------------------------


@pytest.mark.parametrize("fmt, lines, line_no, words", [
    ("alpaca", ['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], 2, "missing field 'output'"),
    ("alpaca", ['{"instruction": "a", "output": "b"}', '', '{"instruction": 3, "output": "b"}'], 3, "must be a string"),
    ("chat", ['{"messages": [{"role": "user", "content": "x"}]}'], 1, "must end with an assistant"),
    ("chat", ['{"messages": [{"role": "robot", "content": "x"}]}'], 1, "role 'robot'"),
    ("preference", ['{"prompt": "p", "chosen": "a"}'], 1, "missing field 'rejected'"),
    ("preference", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": "p", "chosen": "a", "rejected": "b"'], 2,
     "invalid JSON"),
    ("oasst", ['{"prompt": {"role": "prompter", "text": "q", "replies": [{"role": "assistant"}]}}'], 1, "string 'text'"),
    ("flan", ['{"task": "nope", "x": 1}'], 1, "no template for task"),
])
def test_malformed_record_names_file_and_line(tmp_path, fmt, lines, line_no, words):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as e:
        load_records(fmt, str(p))
    assert str(e.value).startswith(f"{p}:{line_no}:") and words in str(e.value)


def test_malformed_json_array_element_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a", "output": 5}\n]\n')
    with pytest.raises(DataFormatError, match=r"bad.json:3: field 'output' must be a string"):
        load_records("alpaca", str(p))


def test_skipped_records_are_counted(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"instruction": "a", "output": ""}\n{"instruction": "a", "output": "ok"}\n')
    recs, st = load_records("alpaca", str(p))
    assert len(recs) == 1 and st["skipped: empty output"] == 1 and st["records read"] == 2
    p.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    recs, st = load_records("preference", str(p))
    assert recs == [] and st["skipped: chosen == rejected"] == 1


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="known formats"):
        load_records("csv", str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError):
        load_records("chat", str(tmp_path / "nope.jsonl"))


# ---- tokenisation, masking, collation ----------------------------------------------------------


def test_sft_masks_prompt_and_trains_on_completion(tok):
    recs = [{"messages": [{"role": "user", "content": "sort 3 1"}, {"role": "assistant", "content": "1 3"}]}]
    (ex,) = C.encode_demonstrations(recs, tok, 64)
    text = tok.decode(ex["input_ids"])
    assert text == "<|user|>sort 3 1<|assistant|>1 3<eos>"
    target = [t for t in ex["labels"] if t != C.IGNORE]
    assert tok.decode(target) == "1 3<eos>"
    assert ex["labels"][: len(ex["labels"]) - len(target)] == [C.IGNORE] * (len(ex["labels"]) - len(target))


def test_default_template_without_chat_template(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}]
    (ex,) = C.encode_demonstrations(recs, t, 64)
    assert t.decode(ex["input_ids"]) == "<bos>### User:\nhi\n\n### Assistant:\nok<eos>"
    assert t.decode([x for x in ex["labels"] if x != C.IGNORE]) == "ok<eos>"


def test_truncation_and_skips_are_counted(tok):
    st = Counter()
    recs = [{"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 50}]},
            {"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "y"}]}]
    out = C.encode_demonstrations(recs, tok, 64, st)
    assert len(out) == 1 and len(out[0]["input_ids"]) == 64
    assert st["truncated: completion cut at max_length"] == 1 and st["skipped: prompt longer than max_length"] == 1


def test_collate_pairs_layout(tok):
    recs = [{"prompt": "reverse 1 2", "chosen": "2 1", "rejected": "1 2 2"}, {"prompt": "sort 2 1", "chosen": "1 2", "rejected": "2"}]
    exs = C.encode_preferences(recs, tok, 64)
    b = C.collate_pairs(exs, tok.pad_token_id)
    assert b["input_ids"].shape[0] == 4
    chosen0 = [t for t in b["labels"][0].tolist() if t != C.IGNORE]
    rejected1 = [t for t in b["labels"][3].tolist() if t != C.IGNORE]
    assert tok.decode(chosen0) == "2 1<eos>" and tok.decode(rejected1) == "2<eos>"
    assert b["attention_mask"].sum().item() == sum(len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in exs)


def test_pack_keeps_masks_and_boundaries(tok):
    exs = C.encode_demonstrations(SyntheticTask().demonstrations(20, 0), tok, 64)
    rows = C.pack(exs, 32)
    assert all(len(r["input_ids"]) == 32 for r in rows[:-1])
    flat_ids = sum((r["input_ids"] for r in rows), [])
    assert flat_ids == sum((e["input_ids"] for e in exs), [])[: len(flat_ids)]
    n_targets = sum(t != C.IGNORE for r in rows for t in r["labels"])
    # every completion token is kept as a target except at row starts
    assert n_targets <= sum(t != C.IGNORE for e in exs for t in e["labels"])
    assert all(r["labels"][0] == C.IGNORE for r in rows)
    # positions restart with every example; segments number the examples
    first = rows[0]
    n0 = len(exs[0]["input_ids"])
    assert first["position_ids"][:n0 + 2] == list(range(n0)) + [0, 1]
    assert first["segment_ids"][:n0 + 1] == [0] * n0 + [1]


def test_packed_rows_compute_what_the_examples_compute_alone(tok):
    """The block-diagonal mask + restarted positions: the logits of a packed row are those of each
    example run by itself (so packing changes no gradient, only the padding waste).

    Checked exactly: an example's tokens carry positions 0..n-1 (as alone), and its logits in the
    packed row do not change, bit for bit, when every other token of the row is replaced. The
    second run is the same computation (same shapes, same masks) in which the replaced keys get
    attention weight exactly 0 (exp of a -inf/min-float score), and 0 times a finite value adds
    exactly nothing; so any difference is a leak. (Comparing with the example run alone, in a
    shorter batch, would compare two GEMM/attention blockings through the whole model, for which
    no derived bound exists here.)"""
    from fastalign.models import tiny_model

    torch.manual_seed(0)
    model = tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64).eval()
    exs = C.encode_demonstrations(SyntheticTask().demonstrations(12, 0), tok, 64)
    rows = C.pack(exs, 40)
    batch = C.collate_lm(rows, tok.pad_token_id)
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    assert mask.shape == (len(rows), 1, ids.shape[1], ids.shape[1])
    vocab = len(tok)
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        leaky_packed = model(input_ids=ids, position_ids=pos).logits  # plain causal mask
        checked, leaks = 0, 0
        for r, row in enumerate(rows):
            for k in sorted(set(row["segment_ids"])):
                where = [i for i, seg in enumerate(row["segment_ids"]) if seg == k]
                n = len(exs[k]["input_ids"])
                if len(where) != n:
                    continue  # an example cut by a row boundary: each part is its own segment
                assert ids[r, where].tolist() == exs[k]["input_ids"] and pos[r, where].tolist() == list(range(n))
                others = torch.ones(ids.shape[1], dtype=torch.bool)
                others[where] = False
                swapped = ids.clone()
                swapped[r, others] = (ids[r, others] + 7) % vocab  # every other token of the row changes
                got = model(input_ids=swapped, attention_mask=mask, position_ids=pos).logits
                assert torch.equal(got[r, where], packed[r, where]), (r, k)
                checked += 1
                if where[0] > 0:
                    # without the mask an example after the first one sees the tokens before it:
                    # the same swap changes its logits, so the exact check can fail
                    leaky = model(input_ids=swapped, position_ids=pos).logits
                    leaks += not torch.equal(leaky[r, where], leaky_packed[r, where])
        assert checked >= 5 and leaks >= 3  # most examples of 12 land whole in a row (the rest are cut)
    # the SFT loss through token_logps uses the mask and positions
    from fastalign.algorithms import token_logps

    logps, mask = token_logps(model, batch)
    assert torch.isfinite(logps).all() and mask.sum() > 0


# ---- synthetic task and oracle -----------------------------------------------------------------


def test_task_is_deterministic_and_solvable():
    t = SyntheticTask()
    a, b = t.sample(50, seed=3), t.sample(50, seed=3)
    assert a == b and a != t.sample(50, seed=4)
    assert {r["prompt"].split()[0] for r in a} == {"reverse", "sort", "repeat", "count"}
    assert all(Oracle.score(r["prompt"], r["answer"]) == 1.0 for r in a)
    assert solve("reverse 3 1 4") == "4 1 3" and solve("sort 3 1 4") == "1 3 4"
    assert solve("repeat ab 3") == "ab ab ab" and solve("count 1 in 3 1 4 1") == "2"
    with pytest.raises(ValueError, match="cannot parse"):
        solve("dance 1 2")


def test_oracle_partial_credit():
    s = Oracle.score  # hits / max(len): the same one Python division as the literal, so exact
    assert s("reverse 3 1 4", "4 1 3") == 1.0
    assert s("reverse 3 1 4", "4 1") == 2 / 3       # too short
    assert s("reverse 3 1 4", "4 1 3 3") == 3 / 4   # too long
    assert s("reverse 3 1 4", "3 1 4") == 1 / 3
    assert s("reverse 3 1 4", "") == 0.0
    assert s("count 1 in 1 1 2", "2") == 1.0 and s("count 1 in 1 1 2", "3") == 0.5
    assert s("count 1 in 1 1 2", "5") == 0.0 and s("count 1 in 1 1 2", "x") == 0.0
    rng = random.Random(0)
    assert all(s(r["prompt"], corrupt(r["answer"], rng)) < 1.0 for r in SyntheticTask().sample(200, 1))


def test_oracle_preferences_noise_and_biases():
    p = "reverse 3 1 4"
    assert Oracle().prefer(p, "4 1 3", "4 1") == 0 and Oracle().prefer(p, "4 1", "4 1 3") == 1
    assert Oracle().prefer(p, "4 1 3", "4 1 3") is None
    # noise: the flip rate matches. A statistical bound, not a rounding one: the count of flips is
    # binomial(4000, 0.3), standard deviation sqrt(0.3 * 0.7 / 4000) ~ 0.0072, and 4 of them
    # allow ~6e-5 of a correct coin to fail; the seeded Mersenne Twister gives the same draws on
    # every machine (0.30275 here), and a wrong rate (0.25, 0.35) is ~7 sigma away
    o = Oracle(noise=0.3, seed=1)
    flips = sum(o.prefer(p, "4 1 3", "4 1") == 1 for _ in range(4000)) / 4000
    assert abs(flips - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    # length bias makes a longer, worse answer win
    assert Oracle(length_bias=0.2).prefer(p, "4 1 3", "4 1 3 3 3 3") == 1
    assert Oracle(style_bias=0.5).prefer(p, "4 1", "4 1!") == 1
    pairs, ties = Oracle().label_pairs([p, p], ["4 1 3", "4 1"], ["4 1", "4 1"])
    assert pairs == [{"prompt": p, "chosen": "4 1 3", "rejected": "4 1"}] and ties == 1
    assert Oracle().best_worst(p, ["4 1", "4 1 3", "9"]) == ("4 1 3", "9")
    pairs, ties = SyntheticTask().preference_pairs(100, seed=0)
    assert len(pairs) + ties == 100 and all(Oracle.score(r["prompt"], r["chosen"]) > Oracle.score(r["prompt"], r["rejected"]) for r in pairs)
