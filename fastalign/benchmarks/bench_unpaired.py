"""The KTO head, token log-probabilities -> loss: fastalign's fused `kto_loss_from_tokens` (the KL
reference point from the KL batch inside the same launch) against eager PyTorch as TRL 1.16's
KTOTrainer writes it (masked sums per sequence of the batch and of the KL batch, z0 =
clamp(mean(KL_logps - ref_KL_logps), 0), then 1 - sigmoid(beta * (lr - z0)) for desirable and
1 - sigmoid(beta * (z0 - lr)) for undesirable examples) and torch.compile of it. Forward and
forward+backward (gradient to the policy token logps; the reference and KL log-probs are frozen).
N examples x T tokens, the KL batch the same size."""

from __future__ import annotations

import torch

from fastalign.benchmarks._common import (
    DTYPES, Case, compiled, fastalign_backend, fastalign_backends, fastalign_op, grad_of, no_grad,
)
from fastalign.benchmarks._pytest_suite import pytest_suite

FAMILY = "unpaired"
BETA = 0.1


def eager_kto_head(pol_tok, ref_tok, mask, labels, kl_pol_tok, kl_ref_tok, kl_mask, beta=BETA):
    pol = (pol_tok.float() * mask).sum(-1)
    ref = (ref_tok.float() * mask).sum(-1)
    kl = ((kl_pol_tok.float() * kl_mask).sum(-1) - (kl_ref_tok.float() * kl_mask).sum(-1)).mean().clamp(min=0)
    lr = pol - ref
    losses = torch.where(labels, 1 - torch.sigmoid(beta * (lr - kl)), 1 - torch.sigmoid(beta * (kl - lr)))
    return losses, (beta * lr).detach(), kl.detach()


def _inputs(rows, steps, dtype, backward):
    def make(device):
        g = torch.Generator().manual_seed(0)

        def tok():
            pol = (-torch.rand(rows, steps, generator=g) * 3).to(DTYPES[dtype])
            ref = (pol.float() + torch.randn(rows, steps, generator=g) * 0.1).to(DTYPES[dtype])
            lengths = torch.randint(max(1, steps // 4), steps + 1, (rows,), generator=g)
            mask = (torch.arange(steps)[None, :] < lengths[:, None]).float()
            return pol.to(device), ref.to(device), mask.to(device)

        pol, ref, mask = tok()
        kp, kq, km = tok()
        labels = (torch.rand(rows, generator=g) < 0.5).to(device)
        return {"device": device, "pol": pol.requires_grad_(backward), "ref": ref, "mask": mask, "labels": labels,
                "kp": kp, "kq": kq, "km": km, "backward": backward}

    return make


def _runner(inp, f):
    if not inp["backward"]:
        return no_grad(f)

    def fwd_bwd():
        return grad_of(f()[0].mean(), inp["pol"], None)

    return fwd_bwd


def _fa_fused(backend):
    def build(inp):
        fastalign_backend(backend, inp["device"])
        op = fastalign_op("kto_loss_from_tokens")
        i = inp
        return _runner(inp, lambda: op(i["pol"], i["ref"], i["mask"], i["labels"], kl_policy_token_logps=i["kp"],
                                       kl_ref_token_logps=i["kq"], kl_mask=i["km"], beta=BETA, backend=backend))

    return build


def _eager(compile_it):
    def build(inp):
        fn = compiled(eager_kto_head) if compile_it else eager_kto_head
        i = inp
        return _runner(inp, lambda: fn(i["pol"], i["ref"], i["mask"], i["labels"], i["kp"], i["kq"], i["km"]))

    return build


def cases(quick: bool, device: str) -> list[Case]:
    fastalign_op("kto_loss_from_tokens")
    conts = {f"fastalign[{b}] from_tokens": _fa_fused(b) for b in fastalign_backends(device)}
    conts.update({"eager": _eager(False), "torch.compile": _eager(True)})
    fa = tuple(n for n in conts if n.startswith("fastalign"))
    shapes = [(4, 64, "fp32")] if quick else [(64, 2048, "fp32"), (64, 2048, "bf16")]
    out = []
    for rows, steps, dtype in shapes:
        for mode in ("fwd", "fwd+bwd"):
            out.append(Case(FAMILY, "kto_head", mode, {"N": rows, "T": steps, "dtype": dtype}, 2 * rows * steps,
                            "N x T (+ KL N x T)", _inputs(rows, steps, dtype, mode == "fwd+bwd"), conts, fa,
                            group=f"kto_head {mode} {dtype}"))
    return out


def targets(records, quick: bool, device: str, ctx: dict) -> list[dict]:
    return []  # issue 21's targets (>= torch.compile, >= 3x eager) are read off the table by the lead


test_unpaired = pytest_suite(cases)  # `pytest fastalign/benchmarks/bench_unpaired.py --benchmark-enable`
