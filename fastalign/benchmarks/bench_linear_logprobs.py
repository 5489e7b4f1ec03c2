"""linear_gather_logprobs (hidden -> token logprobs without the logits) against: eager
matmul + log_softmax + gather, matmul + fastalign.gather_logprobs, torch.compile of the eager code,
TRL's ChunkedLogProbFunction and (CUDA) Liger's fused linear cross entropy (reduction="none").
Time and extra peak memory, forward and forward+backward (gradients to hidden and weight)."""

from __future__ import annotations

import torch

import fastalign
from fastalign.benchmarks import _peers
from fastalign.benchmarks._common import (
    DTYPES, Case, compiled, fastalign_backend, fastalign_backends, fastalign_op, grad_of, no_grad,
)
from fastalign.benchmarks._pytest_suite import pytest_suite
from fastalign.benchmarks._report import contender, find_record, target

FAMILY = "linear_logprobs"


def eager_linear_logprobs(hidden, weight, labels):
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _inputs(tokens, hidden_size, vocab, dtype, backward):
    def make(device):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(tokens, hidden_size, generator=g).to(DTYPES[dtype]).to(device)
        w = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(DTYPES[dtype]).to(device)
        inp = {"device": device, "hidden": h.requires_grad_(backward), "weight": w.requires_grad_(backward),
               "labels": torch.randint(0, vocab, (tokens,), generator=g).to(device), "backward": backward}
        if backward:
            inp["g"] = torch.randn(tokens, generator=g).to(device)
        return inp

    return make


def _runner(inp, f):
    h, w, labels = inp["hidden"], inp["weight"], inp["labels"]
    if not inp["backward"]:
        return no_grad(f, h, w, labels)

    def fwd_bwd():
        out = f(h, w, labels)
        return grad_of(out, (h, w), inp["g"].to(out.dtype))

    return fwd_bwd


def _fa(backend):
    def build(inp):
        fastalign_backend(backend, inp["device"])
        op = fastalign_op("linear_gather_logprobs")
        return _runner(inp, lambda h, w, l: op(h, w, l, backend=backend))

    return build


def _matmul_fa(backend):
    def build(inp):
        fastalign_backend(backend, inp["device"])
        return _runner(inp, lambda h, w, l: fastalign.gather_logprobs(h @ w.T, l, backend=backend))

    return build


def _eager(inp):
    return _runner(inp, eager_linear_logprobs)


def _compile(inp):
    return _runner(inp, compiled(eager_linear_logprobs))


def _trl(inp):
    return _runner(inp, _peers.trl_chunked_logprob())


def _liger(inp):
    flce = _peers.liger_function("liger_fused_linear_cross_entropy", inp["device"])
    return _runner(inp, lambda h, w, l: -flce(h, w, l, reduction="none"))


def cases(quick: bool, device: str) -> list[Case]:
    fastalign_op("linear_gather_logprobs")
    cuda = device.startswith("cuda")
    fa_b = fastalign_backends(device)
    conts = {f"fastalign[{b}]": _fa(b) for b in fa_b}
    conts[f"matmul + fastalign[{fa_b[0]}] gather"] = _matmul_fa(fa_b[0])
    conts.update({"eager": _eager, "torch.compile": _compile, "trl chunked": _trl})
    if cuda:
        conts["liger flce"] = _liger
    if quick:
        shapes = [(64, 32, 1000, "fp32")]
    elif cuda:
        shapes = [(8192, 4096, 151936, "bf16"), (8192, 4096, 32000, "bf16")]
    else:
        shapes = [(1024, 1024, 32000, "fp32"), (4096, 1024, 32000, "fp32")]
    out = []
    for tokens, hsize, vocab, dtype in shapes:
        for mode in ("fwd", "fwd+bwd"):
            out.append(Case(FAMILY, "linear_gather_logprobs", mode,
                            {"tokens": tokens, "H": hsize, "V": vocab, "dtype": dtype}, tokens * vocab, "tokens x V",
                            _inputs(tokens, hsize, vocab, dtype, mode == "fwd+bwd"), conts,
                            tuple(f"fastalign[{b}]" for b in fa_b), group=f"linear_gather_logprobs {mode} {dtype} H={hsize}",
                            rounds=None if quick else 3))
    return out


def targets(records, quick: bool, device: str, ctx: dict) -> list[dict]:
    """Issue 5 (CPU): at tokens=4096, H=1024, V=32000 fp32, fwd+bwd: extra peak memory <= 1/8 of
    the eager path's and time <= 1.2x eager's."""
    if device != "cpu":
        return []
    rec = find_record(records, "linear_gather_logprobs", "fwd+bwd", tokens=4096, V=32000, dtype="fp32")
    fa, ea = contender(rec, "fastalign[cpp]"), contender(rec, "eager")
    out = []
    fm, em = fa.get("extra_peak_bytes"), ea.get("extra_peak_bytes")
    # the issue counts peak memory above inputs AND outputs; in fwd+bwd the outputs are the
    # gradients (hidden [tokens, H], weight [V, H], fp32) and the logprobs [tokens]
    outputs = 4 * (4096 * 1024 + 32000 * 1024 + 4096)
    if fm is not None and em:
        fm, em = max(fm - outputs, 0), max(em - outputs, 1)
    v = fm / em if fm is not None and em else None
    out.append(target("issue 5", "linear_gather_logprobs fwd+bwd cpp peak above inputs+outputs / eager's (4096 x 1024 x 32000 fp32)",
                      v, "<= 0.125", v is not None and v <= 0.125, quick,
                      detail=None if v is None else f"{fm / 2**20:.0f} MiB vs {em / 2**20:.0f} MiB, "
                                                    f"after {outputs / 2**20:.0f} MiB of gradients/outputs"))
    ft, et = fa.get("median_s"), ea.get("median_s")
    v = ft / et if ft and et else None
    out.append(target("issue 5", "linear_gather_logprobs fwd+bwd cpp time / eager (4096 x 1024 x 32000 fp32)",
                      v, "<= 1.2", v is not None and v <= 1.2, quick, unit=""))
    return out


test_linear_logprobs = pytest_suite(cases)  # `pytest fastalign/benchmarks/bench_linear_logprobs.py --benchmark-enable`
