"""The DPO head, token log-probabilities -> loss: fastalign's fused `dpo_loss_from_tokens` and the
composed `sequence_logps` + `dpo_loss`, against eager PyTorch as TRL's DPOTrainer writes it
(masked sums per sequence over a [chosen; rejected] batch, then -logsigmoid(beta * margin)) and
torch.compile of it. Forward and forward+backward (gradient to the policy token logps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastalign.benchmarks._common import (
    DTYPES, Case, compiled, fastalign_backend, fastalign_backends, fastalign_op, grad_of, no_grad,
)
from fastalign.benchmarks._pytest_suite import pytest_suite

FAMILY = "preference"
BETA = 0.1


def eager_dpo_head(policy_tok, ref_tok, mask, beta=BETA):
    pol = (policy_tok.float() * mask).sum(-1)
    ref = (ref_tok.float() * mask).sum(-1)
    n = pol.shape[0] // 2
    chosen, rejected = pol[:n], pol[n:]
    ref_chosen, ref_rejected = ref[:n], ref[n:]
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    losses = -F.logsigmoid(beta * margin)
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def _inputs(pairs, steps, dtype, backward):
    def make(device):
        g = torch.Generator().manual_seed(0)
        rows = 2 * pairs
        pol = (-torch.rand(rows, steps, generator=g) * 3).to(DTYPES[dtype]).to(device)
        ref = (pol.float().cpu() + torch.randn(rows, steps, generator=g) * 0.1).to(DTYPES[dtype]).to(device)
        lengths = torch.randint(max(1, steps // 4), steps + 1, (rows,), generator=g)
        mask = (torch.arange(steps)[None, :] < lengths[:, None]).float().to(device)
        return {"device": device, "pol": pol.requires_grad_(backward), "ref": ref, "mask": mask, "backward": backward}

    return make


def _runner(inp, f):
    pol = inp["pol"]
    if not inp["backward"]:
        return no_grad(f)

    def fwd_bwd():
        out = f()
        losses = out[0] if isinstance(out, (tuple, list)) else out
        return grad_of(losses.mean(), pol, None)

    return fwd_bwd


def _fa_fused(backend):
    def build(inp):
        fastalign_backend(backend, inp["device"])
        op = fastalign_op("dpo_loss_from_tokens")
        pol, ref, mask = inp["pol"], inp["ref"], inp["mask"]
        return _runner(inp, lambda: op(pol, ref, mask, beta=BETA, loss_type="sigmoid", backend=backend))

    return build


def _fa_composed(backend):
    def build(inp):
        fastalign_backend(backend, inp["device"])
        seq, dpo = fastalign_op("sequence_logps"), fastalign_op("dpo_loss")
        pol, ref, mask = inp["pol"], inp["ref"], inp["mask"]
        n = pol.shape[0] // 2

        def f():
            p, r = seq(pol, mask, backend=backend), seq(ref, mask, backend=backend)
            return dpo(p[:n], p[n:], r[:n], r[n:], beta=BETA, loss_type="sigmoid", backend=backend)

        return _runner(inp, f)

    return build


def _eager(compile_it):
    def build(inp):
        fn = compiled(eager_dpo_head) if compile_it else eager_dpo_head
        pol, ref, mask = inp["pol"], inp["ref"], inp["mask"]
        return _runner(inp, lambda: fn(pol, ref, mask))

    return build


def cases(quick: bool, device: str) -> list[Case]:
    fastalign_op("dpo_loss")
    fa_b = fastalign_backends(device)
    conts = {}
    for b in fa_b:
        conts[f"fastalign[{b}] from_tokens"] = _fa_fused(b)
        conts[f"fastalign[{b}] seq+dpo"] = _fa_composed(b)
    conts.update({"eager": _eager(False), "torch.compile": _eager(True)})
    fa = tuple(n for n in conts if n.startswith("fastalign"))
    shapes = [(4, 64, "fp32")] if quick else [(64, 2048, "fp32"), (64, 8192, "fp32"), (64, 2048, "bf16")]
    out = []
    for pairs, steps, dtype in shapes:
        for mode in ("fwd", "fwd+bwd"):
            out.append(Case(FAMILY, "dpo_head", mode, {"pairs": pairs, "T": steps, "dtype": dtype}, 2 * pairs * steps,
                            "2B x T", _inputs(pairs, steps, dtype, mode == "fwd+bwd"), conts, fa,
                            group=f"dpo_head {mode} {dtype}"))
    return out


def targets(records, quick: bool, device: str, ctx: dict) -> list[dict]:
    return []  # issue 4 sets no speed target; its ratios are in the table


test_preference = pytest_suite(cases)  # `pytest fastalign/benchmarks/bench_preference.py --benchmark-enable`
