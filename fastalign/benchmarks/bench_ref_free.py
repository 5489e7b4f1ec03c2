"""The reference-free paired losses, token log-probabilities -> per-pair losses: fastalign's fused
orpo_loss_from_tokens, simpo_loss_from_tokens and cpo_loss_from_tokens (sigmoid on summed
log-probs, with its NLL term) against their eager reference (fastalign/kernels/
reference_ref_free.py: masked sums and counts per row, then the pair formula and the NLL term, as
TRL's trainers compute them from token log-probs) and torch.compile of it. Forward and
forward+backward (gradient to the policy token log-probs).

Targets (issue 21): each fused head, fwd+bwd at 64 pairs x 2048 tokens (fp32), at least as fast
as torch.compile of its reference and >= 3x eager, same run. The fused op reads the token
log-probs and the mask once forward and writes the gradient once backward (the counts are
saved); eager reads them in several passes (where, sum, count) and its backward materialises
broadcast and where() intermediates of the full [2B, T] size.
"""

from __future__ import annotations

import torch

from fastalign.benchmarks._common import (
    DTYPES, Case, compiled, fastalign_backend, fastalign_backends, fastalign_op, grad_of, no_grad,
)
from fastalign.benchmarks._pytest_suite import pytest_suite
from fastalign.benchmarks._report import find_record, median, target
from fastalign.kernels.reference_ref_free import ref_free_losses

FAMILY = "ref_free"
# name -> (public op, its kwargs, the reference's (kind, beta, gamma, nll_weight, eps, mean))
HEADS = {
    "orpo_head": ("orpo_loss_from_tokens", {"beta": 0.1}, ("orpo", 0.1, 0.0, 1.0, 0.0, True)),
    "simpo_head": ("simpo_loss_from_tokens", {"beta": 2.0, "gamma": 0.5}, ("sigmoid", 2.0, 0.5, 0.0, 0.0, True)),
    "cpo_head": ("cpo_loss_from_tokens", {"beta": 0.1}, ("sigmoid", 0.1, 0.0, 1.0, 0.0, False)),
}


def _eager_head(args):
    kind, beta, gamma, alpha, eps, mean = args

    def head(x, mask):
        return ref_free_losses(x, mask, kind, beta, gamma, alpha, eps, mean)[0]

    return head


def _inputs(pairs, steps, dtype, backward):
    def make(device):
        g = torch.Generator().manual_seed(0)
        rows = 2 * pairs
        x = (-torch.rand(rows, steps, generator=g) * 3).to(DTYPES[dtype]).to(device)
        lengths = torch.randint(max(1, steps // 4), steps + 1, (rows,), generator=g)
        mask = (torch.arange(steps)[None, :] < lengths[:, None]).to(device)
        return {"device": device, "x": x.requires_grad_(backward), "mask": mask, "backward": backward}

    return make


def _runner(inp, f):
    if not inp["backward"]:
        return no_grad(f)

    def fwd_bwd():
        return grad_of(f().mean(), inp["x"], None)

    return fwd_bwd


def _fa(backend, op_name, kwargs):
    def build(inp):
        fastalign_backend(backend, inp["device"])
        op = fastalign_op(op_name)
        x, mask = inp["x"], inp["mask"]
        return _runner(inp, lambda: op(x, mask, backend=backend, **kwargs).losses)

    return build


def _eager(args, compile_it):
    def build(inp):
        head = _eager_head(args)
        fn = compiled(head) if compile_it else head
        x, mask = inp["x"], inp["mask"]
        return _runner(inp, lambda: fn(x, mask))

    return build


def cases(quick: bool, device: str) -> list[Case]:
    fastalign_op("orpo_loss_from_tokens")
    shapes = [(4, 64, "fp32")] if quick else [(64, 2048, "fp32"), (64, 2048, "bf16")]
    out = []
    for head, (op_name, kwargs, args) in HEADS.items():
        conts = {f"fastalign[{b}]": _fa(b, op_name, kwargs) for b in fastalign_backends(device)}
        fa = tuple(conts)
        conts.update({"eager": _eager(args, False), "torch.compile": _eager(args, True)})
        for pairs, steps, dtype in shapes:
            for mode in ("fwd", "fwd+bwd"):
                out.append(Case(FAMILY, head, mode, {"pairs": pairs, "T": steps, "dtype": dtype}, 2 * pairs * steps,
                                "2B x T", _inputs(pairs, steps, dtype, mode == "fwd+bwd"), conts, fa,
                                group=f"{head} {mode} {dtype}"))
    return out


def targets(records, quick: bool, device: str, ctx: dict) -> list[dict]:
    out = []
    fa = "fastalign[cpp]" if device == "cpu" else "fastalign[cuda]"
    for head in HEADS:
        rec = find_record(records, head, "fwd+bwd", pairs=64, T=2048, dtype="fp32")
        tf, te, tc = median(rec, fa), median(rec, "eager"), median(rec, "torch.compile")
        vs_eager = te / tf if tf and te else None
        vs_compile = tc / tf if tf and tc else None
        out.append(target("issue 21", f"{head} fwd+bwd {fa} speedup vs eager (64 pairs x 2048)", vs_eager, ">= 3x",
                          vs_eager is not None and vs_eager >= 3.0, quick))
        out.append(target("issue 21", f"{head} fwd+bwd {fa} speedup vs torch.compile (64 pairs x 2048)", vs_compile,
                          ">= 1x", vs_compile is not None and vs_compile >= 1.0, quick))
    return out


test_ref_free = pytest_suite(cases)  # `pytest fastalign/benchmarks/bench_ref_free.py --benchmark-enable`
