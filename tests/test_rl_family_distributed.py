"""The critic-free family under torchrun (2 CPU processes, gloo, DDP): DAPO's dynamic sampling and
the rollout correction's MIS (plus TIS), against the single process of the same global batch.

One DAPO run (tests/test_rl_family.py's tiny model) with both on: the first step's global batch
holds one prompt whose group always scores a constant, in rank 0's share. So:
  * dynamic sampling: rank 0 drops that group and refills from its share of the next global
    batch; rank 1 lacks nothing but samples the extra round too (the ranks sample the same number
    of rounds) and keeps its first round. The kept prompts of the two ranks are those of the
    single-process run (which drops the same group and refills from the next global batch's first
    prompt), the data cursor is the same, and the logged counts (dropped, filled, rounds) are the
    single process's: summed over ranks. Only the sampled responses differ (each rank samples its
    own rows with the step's seed), so the comparison is of prompts, counts and cursor.
  * MIS / TIS: the sampler's log-probs are perturbed (algo.debug_rollout_logp_noise) so that MIS
    rejects some tokens. The ranks' losses are normalised by the kept tokens of both ranks: the
    first optimizer step's gradient under DDP is, BIT FOR BIT, the single process's gradient of
    the two ranks' micro-batches run one after the other (one micro-batch per rank: the single
    process adds g0 + g1, DDP all-reduces 2 g0 + 2 g1 and halves it, exact in binary; see
    tests/test_distributed.py). The logged MIS fraction is that of both ranks' tokens.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
CFG = {"group_size": 4, "max_new_tokens": 5, "overlong_buffer": 0, "max_sampling_rounds": 2, "mini_batches": 1,
       "micro_batch_size": 16, "debug_rollout_logp_noise": 0.5,
       "rollout_correction": {"rollout_is": "token", "rollout_is_threshold": 2.0, "rollout_rs": "token",
                              "rollout_rs_threshold": 2.0}}


def _run(out, mode, record=None):
    """A 2-step DAPO run (batch_size 4 prompts per rank, or 8 in one process); returns what the
    first step saw: the kept prompts, its metrics, the data cursor after it. With `record`
    (a path), also the first optimizer step's micro-batches and its gradient, saved there."""
    from fastalign.algorithms import get_algorithm
    from fastalign.data.synthetic import SyntheticTask
    from fastalign.models import tiny_model, tiny_tokenizer
    from fastalign.trainer import Trainer
    from tests.test_rl_family import _text_reward

    tok = tiny_tokenizer()
    constant = set()
    alg = get_algorithm("dapo")(CFG, reward_fn=lambda p, r: 1.0 if str(p) in constant else _text_reward(p, r))
    data = alg.encode(SyntheticTask().sample(40, seed=0), tok, 64, Counter())
    tr = Trainer(alg, {"policy": tiny_model(tok, seed=0, **TINY)}, tok, data, None, dict(
        output_dir=str(out), max_steps=2, batch_size=4, grad_accum=1 if mode == "ddp" else 2, lr=1e-3,
        warmup_steps=0, precision="fp32", device="cpu", distributed=mode, sampler="fastalign", progress=False,
        plot=False, handle_sigint=False))
    perm = tr._permutation(0)
    constant.add(str(data[perm[1]]["prompt"]))  # global position 1: rank 0's share
    got = {"perm_prompts": [str(data[i]["prompt"]) for i in perm[:16]]}
    inner_adv = alg.advantages

    def advantages(context, rollout):
        if "prompts" not in got:
            got["prompts"] = [str(p) for p in rollout.prompts[::4]]
        return inner_adv(context, rollout)

    alg.advantages = advantages
    if record is not None:
        real = tr.context.optimize

        def optimize(mbs, *, loss_fn=None, units_fn=None):
            if not os.path.exists(record):
                tr.accumulate(mbs, loss_fn=loss_fn, units_fn=units_fn)
                grads = [p.grad.detach().clone() for p in tr.params]
                tr.optimizer.zero_grad(set_to_none=True)
                torch.save({"mbs": mbs, "grads": grads}, record)
            return real(mbs, loss_fn=loss_fn, units_fn=units_fn)

        tr.context.optimize = optimize
    tr.callbacks.append(lambda t, m: got.setdefault("step1", {**m, "pos": t.pos}))
    tr.fit()
    return got


def _worker(out):
    from fastalign.trainer import distributed as D

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    got = _run(os.path.join(out, "run"), "ddp", record=os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({k: v for k, v in got.items()}, f, default=float)
    D.barrier()
    D.shutdown()


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    from tests.test_distributed import _launch

    out = tmp_path_factory.mktemp("rl_ddp")
    _launch([os.path.abspath(__file__), "--worker", str(out)], cwd=str(out))
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_dynamic_sampling_under_ddp_matches_one_process(ddp, tmp_path):
    _, (r0, r1) = ddp
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run(tmp_path / "single", "none")
    finally:
        torch.set_num_threads(threads)
    perm = single["perm_prompts"]
    assert r0["perm_prompts"] == r1["perm_prompts"] == perm  # the same data order everywhere
    # rank 0: its share (global 0-3) without position 1, refilled from its share of the next
    # global batch (8-11): 8; rank 1 keeps its first round (4-7) though it sampled a second
    assert r0["prompts"] == [perm[i] for i in (0, 2, 3, 8)]
    assert r1["prompts"] == [perm[i] for i in (4, 5, 6, 7)]
    assert sorted(r0["prompts"] + r1["prompts"]) == sorted(single["prompts"])
    for key in ("dynamic_sampling/rounds", "dynamic_sampling/dropped", "dynamic_sampling/filled", "zero_std_groups",
                "pos"):
        assert r0["step1"][key] == r1["step1"][key] == single["step1"][key], key
    assert (single["step1"]["dynamic_sampling/dropped"], single["step1"]["pos"]) == (1, 16)


def test_mis_under_ddp_gradient_is_the_single_process_one(ddp, tmp_path):
    from fastalign.algorithms import get_algorithm
    from fastalign.data import collate as C
    from fastalign.data.synthetic import SyntheticTask
    from fastalign.models import tiny_model, tiny_tokenizer
    from fastalign.trainer import Trainer

    out, (r0, _) = ddp
    recs = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    mbs = recs[0]["mbs"] + recs[1]["mbs"]
    assert len(recs[0]["mbs"]) == len(recs[1]["mbs"]) == 1
    tok = tiny_tokenizer()
    alg = get_algorithm("dapo")(CFG, reward_fn=lambda p, r: 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        data = alg.encode(SyntheticTask().sample(8, seed=0), tok, 64, Counter())
        tr = Trainer(alg, {"policy": tiny_model(tok, seed=0, **TINY)}, tok, data, None, dict(
            output_dir=str(tmp_path), max_steps=1, batch_size=4, lr=1e-3, warmup_steps=0, precision="fp32",
            device="cpu", progress=False, plot=False, handle_sigint=False))
        m = tr.accumulate(mbs)
    finally:
        torch.set_num_threads(threads)
    assert len(tr.params) == len(recs[0]["grads"]) > 10
    for i, p in enumerate(tr.params):
        assert torch.equal(p.grad, recs[0]["grads"][i]), i
        assert torch.equal(recs[0]["grads"][i], recs[1]["grads"][i]), i
    # the units are the kept tokens of both ranks; MIS rejected some (not all) of them
    valid = sum(int((mb["labels"][:, 1:] != C.IGNORE).sum()) for mb in mbs)
    kept = sum(int(mb["loss_mask"].sum()) for mb in mbs)
    assert m["units"] == kept and 0 < kept < valid
    # the logged MIS fraction: over both ranks' tokens (each rank logs the same)
    assert r0["step1"]["rollout_rs_masked_frac"] == pytest.approx(1 - kept / valid, abs=1e-12)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
