"""The DPO head, token log-probabilities -> loss: fastalign's fused `dpo_loss_from_tokens` and the
composed `sequence_logps` + `dpo_loss`, against eager PyTorch as TRL's DPOTrainer writes it
(masked sums per sequence over a [chosen; rejected] batch, then -logsigmoid(beta * margin)) and
torch.compile of it. Forward and forward+backward (gradient to the policy token logps).

dpo_types (issue 21): the general fused head (`dpo_loss_from_tokens` with a weighted list of loss
types) fwd+bwd at 64 pairs x 2048 tokens, against the same losses written eagerly on the masked
sums (fastalign/kernels/reference_dpo_types.py, as TRL's _compute_loss computes them) and
torch.compile of that: "rpo" = sigmoid + sft (TRL's RPO), "mix" = robust + sigmoid_norm +
discopop under the JS f-divergence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastalign.benchmarks._common import (
    DTYPES, Case, compiled, fastalign_backend, fastalign_backends, fastalign_op, grad_of, no_grad,
)
from fastalign.benchmarks._pytest_suite import pytest_suite
from fastalign.benchmarks._report import find_record, median, target
from fastalign.kernels import reference_dpo_types as RT

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


TYPE_MIXES = {
    "rpo": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0], f_divergence_type="reverse_kl"),
    "mix": dict(loss_type=["robust", "sigmoid_norm", "discopop"], loss_weights=[1.0, 0.5, 0.5],
                f_divergence_type="js_divergence", label_smoothing=0.1),
}


def eager_types_head(policy_tok, ref_tok, mask, mix, beta=BETA):
    """The reference losses on masked sums (token counts from the mask), eager torch."""
    kw = TYPE_MIXES[mix]
    pol = (policy_tok.float() * mask).sum(-1)
    ref = (ref_tok.float() * mask).sum(-1)
    counts = mask.sum(-1)
    n = pol.shape[0] // 2
    return RT.dpo_type_losses(pol[:n], pol[n:], ref[:n], ref[n:], kw["loss_type"], kw["loss_weights"], beta,
                              kw.get("label_smoothing", 0.0), f_divergence=kw["f_divergence_type"],
                              chosen_lengths=counts[:n],
                              rejected_lengths=counts[n:])


def _fa_types(backend, mix):
    def build(inp):
        fastalign_backend(backend, inp["device"])
        op = fastalign_op("dpo_loss_from_tokens")
        pol, ref, mask = inp["pol"], inp["ref"], inp["mask"]
        return _runner(inp, lambda: op(pol, ref, mask, beta=BETA, backend=backend, **TYPE_MIXES[mix]))

    return build


def _eager_types(compile_it, mix):
    def build(inp):
        fn = compiled(eager_types_head) if compile_it else eager_types_head
        pol, ref, mask = inp["pol"], inp["ref"], inp["mask"]
        return _runner(inp, lambda: fn(pol, ref, mask, mix))

    return build


def _types_cases(quick: bool, device: str) -> list[Case]:
    shapes = [(4, 64, "fp32")] if quick else [(64, 2048, "fp32"), (64, 2048, "bf16")]
    out = []
    for mix in TYPE_MIXES:
        conts = {f"fastalign[{b}]": _fa_types(b, mix) for b in fastalign_backends(device)}
        conts.update({"eager": _eager_types(False, mix), "torch.compile": _eager_types(True, mix)})
        fa = tuple(n for n in conts if n.startswith("fastalign"))
        for pairs, steps, dtype in shapes:
            out.append(Case(FAMILY, "dpo_types", "fwd+bwd", {"mix": mix, "pairs": pairs, "T": steps, "dtype": dtype},
                            2 * pairs * steps, "2B x T", _inputs(pairs, steps, dtype, True), conts, fa,
                            group=f"dpo_types {mix} {dtype}"))
    return out


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
    return out + _types_cases(quick, device)


def targets(records, quick: bool, device: str, ctx: dict) -> list[dict]:
    # issue 4 sets no speed target for dpo_head; issue 21: the general head >= torch.compile and >= 3x eager
    out = []
    fa = "fastalign[cpp]" if device == "cpu" else "fastalign[cuda]"
    for mix in TYPE_MIXES:
        for dtype in ("fp32", "bf16"):
            rec = find_record(records, "dpo_types", "fwd+bwd", mix=mix, pairs=64, T=2048, dtype=dtype)
            tf, te, tc = median(rec, fa), median(rec, "eager"), median(rec, "torch.compile")
            v_e = te / tf if tf and te else None
            v_c = tc / tf if tf and tc else None
            what = f"dpo_types {mix} {dtype} fwd+bwd {fa} (64 pairs x 2048)"
            out.append(target("issue 21", f"{what} vs eager", v_e, ">= 3x", v_e is not None and v_e >= 3.0, quick))
            out.append(target("issue 21", f"{what} vs torch.compile", v_c, ">= 1x", v_c is not None and v_c >= 1.0,
                              quick))
    return out


test_preference = pytest_suite(cases)  # `pytest fastalign/benchmarks/bench_preference.py --benchmark-enable`
