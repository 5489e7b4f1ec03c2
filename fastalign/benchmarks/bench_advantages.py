"""Advantage estimators: fastalign.advantages on its fused backends against the torch backend (the
vectorised torch composition, fastalign/ops/advantage_estimators.py), torch.compile of it, and
verl's own implementation written out from verl/trainer/ppo/core_algos.py (the Python loops over
samples and groups, or for reinforce_plus_plus over time steps; remax is vectorised in verl).
Forward only: advantages take no gradient.

Inputs as a GRPO/RLOO batch: B responses in groups of G under shuffled, non-consecutive ids, a
random length per response, the outcome score on its last token (token-level rewards [B, T]).
verl's index is a host array; the "verl" contender gets a Python list of ints (verl: uid strings).
Targets (issue 20): every group estimator >= 50x verl's loop at B = 4096 (T = 512, G = 8).
"""

from __future__ import annotations

import torch

import fastalign
from fastalign.benchmarks import _peers
from fastalign.benchmarks._common import Case, Skip, compiled, fastalign_backend, fastalign_backends, no_grad
from fastalign.benchmarks._pytest_suite import pytest_suite
from fastalign.benchmarks._report import find_record, median, target

FAMILY = "advantages"
GROUP_KINDS = ("grpo", "rloo", "opo", "grpo_passk", "reinforce_plus_plus_baseline")
VERL = _peers.VERL_OUTCOME


def _inputs(batch, steps, group):
    def make(device):
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(1, steps + 1, (batch,), generator=g)
        mask = torch.arange(steps) < lengths.unsqueeze(-1)
        rewards = torch.zeros(batch, steps)
        rewards[torch.arange(batch), lengths - 1] = torch.randn(batch, generator=g)
        ids = (torch.randperm(batch // group, generator=g) * 7 + 3).repeat_interleave(group)
        index = ids[torch.randperm(batch, generator=g)]
        return {"device": device, "rewards": rewards.to(device), "mask": mask.to(device), "index": index.to(device),
                "index_list": index.tolist(), "baselines": torch.randn(batch, generator=g).to(device)}

    return make


def _options(kind, inp):
    if kind == "remax":
        return {"reward_baselines": inp["baselines"]}
    if kind == "reinforce_plus_plus":
        return {}
    return {"index": inp["index"]}


def _fastalign(kind, backend):
    def build(inp):
        if backend != "torch":
            fastalign_backend(backend, inp["device"])
        r, m, opts = inp["rewards"], inp["mask"], _options(kind, inp)
        return no_grad(lambda: fastalign.advantages(kind, r, m, backend=backend, **opts))

    return build


def _compiled_torch(kind):
    def build(inp):
        fn = compiled(lambda r, m, **o: fastalign.advantages(kind, r, m, backend="torch", **o))
        r, m, opts = inp["rewards"], inp["mask"], _options(kind, inp)
        return no_grad(lambda: fn(r, m, **opts))

    return build


def _verl(kind):
    def build(inp):
        r, m = inp["rewards"], inp["mask"]
        if kind == "reinforce_plus_plus":
            return no_grad(_peers.verl_reinforce_plus_plus, r, m, 1.0)
        if kind == "remax":
            return no_grad(_peers.verl_remax, r, m, inp["baselines"])
        if inp["device"] != "cpu":
            raise Skip("verl's per-sample loops run on the host's index array; timed on the CPU only")
        fn, index = VERL[kind], inp["index_list"]
        return no_grad(lambda: fn(r.clone(), m, index))  # verl writes the scores in place

    return build


def cases(quick: bool, device: str) -> list[Case]:
    fa = fastalign_backends(device)
    if quick:
        shapes = [(64, 32, 8)]
    else:
        shapes = [(4096, 512, 8), (4096, 512, 16), (1024, 2048, 16)]
    out = []
    for kind in GROUP_KINDS + ("reinforce_plus_plus", "remax"):
        conts = {f"fastalign[{b}]": _fastalign(kind, b) for b in fa}
        conts.update({"torch": _fastalign(kind, "torch"), "torch.compile": _compiled_torch(kind), "verl": _verl(kind)})
        for b, t, g in shapes:
            if kind not in GROUP_KINDS and g != 8 and t == 512:
                continue  # no groups: one case per (B, T)
            params = {"B": b, "T": t, "G": g} if kind in GROUP_KINDS else {"B": b, "T": t}
            out.append(Case(FAMILY, kind, "fwd", params, b * t, "B x T", _inputs(b, t, g), conts,
                            tuple(f"fastalign[{x}]" for x in fa), group=kind, rounds=3 if not quick else None))
    return out


def targets(records, quick: bool, device: str, ctx: dict) -> list[dict]:
    out = []
    fa = "fastalign[cpp]" if device == "cpu" else "fastalign[cuda]"
    for kind in GROUP_KINDS:
        rec = find_record(records, kind, "fwd", B=4096, T=512, G=8)
        tf, tv = median(rec, fa), median(rec, "verl")
        value = tv / tf if tf and tv else None
        out.append(target("issue 20", f"{kind} {fa} speedup vs verl's Python loop (B=4096, T=512, G=8)", value,
                          ">= 50x", value is not None and value >= 50.0, quick))
    return out


test_advantages = pytest_suite(cases)  # `pytest fastalign/benchmarks/bench_advantages.py --benchmark-enable`
