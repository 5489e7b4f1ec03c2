"""RL kernels: gae against the per-time-step Python loops of TRL and verl; ppo_policy_loss and
ppo_value_loss (forward, forward+backward) against eager PyTorch (verl's formulas) and
torch.compile of it.

The peers' loops and losses are written out from their published formulas (not imported; the
GAE loops live in fastalign/benchmarks/_peers.py, shared with tests/test_gae.py):
- TRL PPOTrainer GAE: the plain reverse loop without a mask;
- verl compute_gae_advantage_return: the reverse loop carrying value and advantage through
  masked steps (multi-turn);
- verl compute_policy_loss (vanilla, with dual clip) and compute_value_loss, "token-mean".
policy_loss (loss types sapo, cispo, reinforce, gspo, geo_mean, gspo_token, and ppo with token
TIS) fwd+bwd against the eager reference (fastalign/kernels/reference_policy_losses.py) and
torch.compile of it; on every fused backend (cpp, cuda, triton) sapo, cispo, reinforce, gspo and
geo_mean run the fused pg_policy_loss kernel, gspo_token the ppo kernels on shifted inputs, all
with their statistics in the kernel's pass.
torch.compile of the GAE loops is not measured: it unrolls T steps into one graph (minutes of
compilation at T = 2048), which nobody ships.
"""

from __future__ import annotations

import torch

from fastalign.benchmarks._common import (
    DTYPES, Case, compiled, fastalign_backend, fastalign_backends, fastalign_op, grad_of, no_grad,
)
from fastalign.benchmarks._peers import trl_gae_loop, verl_gae_loop
from fastalign.benchmarks._pytest_suite import pytest_suite
from fastalign.benchmarks._report import find_record, median, target

FAMILY = "rl"


# ---- the peers' formulas --------------------------------------------------------------------------


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def eager_policy_loss(logprobs, old_logprobs, advantages, mask, clip=0.2, dual_clip=3.0):
    neg_kl = torch.clamp(logprobs.float() - old_logprobs.float(), -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    adv = advantages.float()
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    clip1 = torch.maximum(l1, l2)
    l3 = -adv * dual_clip
    clip2 = torch.minimum(l3, clip1)
    losses = torch.where(adv < 0, clip2, clip1)
    loss = _masked_mean(losses, mask)
    stats = (_masked_mean(-neg_kl, mask).detach(), _masked_mean((l2 > l1).float(), mask).detach(),
             _masked_mean(((clip1 > l3) & (adv < 0)).float(), mask).detach())
    return loss, stats


def eager_value_loss(values, old_values, returns, mask, clip=0.2):
    v, ret = values.float(), returns.float()
    clipped = torch.clamp(v, old_values.float() - clip, old_values.float() + clip)
    l1 = (v - ret) ** 2
    l2 = (clipped - ret) ** 2
    loss = 0.5 * _masked_mean(torch.maximum(l1, l2), mask)
    return loss, _masked_mean((l2 > l1).float(), mask).detach()


# ---- inputs --------------------------------------------------------------------------------------


def _mask(batch, steps, g):
    """Responses of random length (>= T/4) with a few masked observation spans inside."""
    lengths = torch.randint(max(1, steps // 4), steps + 1, (batch,), generator=g)
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    holes = torch.rand(batch, steps, generator=g) < 0.05
    return (mask & ~holes).float()


def _gae_inputs(batch, steps):
    def make(device):
        g = torch.Generator().manual_seed(0)
        r, v = torch.randn(batch, steps, generator=g), torch.randn(batch, steps, generator=g)
        return {"device": device, "rewards": r.to(device), "values": v.to(device),
                "mask": _mask(batch, steps, g).to(device)}

    return make


def _loss_inputs(batch, steps, dtype, backward):
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(batch, steps, generator=g) * 0.1 - 1).to(DTYPES[dtype]).to(device)
        old = (x.float().cpu() + torch.randn(batch, steps, generator=g) * 0.2).to(DTYPES[dtype]).to(device)
        other = torch.randn(batch, steps, generator=g).to(DTYPES[dtype]).to(device)
        return {"device": device, "x": x.requires_grad_(backward), "old": old, "other": other,
                "mask": _mask(batch, steps, g).to(device), "backward": backward}

    return make


GAMMA, LAM = 1.0, 0.95


def _fa_gae(backend):
    def build(inp):
        fastalign_backend(backend, inp["device"])
        gae = fastalign_op("gae")
        r, v, m = inp["rewards"], inp["values"], inp["mask"]
        return lambda: gae(r, v, m, gamma=GAMMA, lam=LAM, backend=backend)

    return build


def _trl_gae(inp):
    # TRL zero-fills values past the end
    return no_grad(trl_gae_loop, inp["rewards"], inp["values"] * inp["mask"], GAMMA, LAM)


def _verl_gae(inp):
    return no_grad(verl_gae_loop, inp["rewards"], inp["values"], inp["mask"], GAMMA, LAM)


def _loss_runner(inp, f):
    if not inp["backward"]:
        return no_grad(f)
    return lambda: grad_of(f()[0], inp["x"], None)


def _fa_loss(op_name, backend):
    def build(inp):
        fastalign_backend(backend, inp["device"])
        op = fastalign_op(op_name)
        x, old, other, mask = inp["x"], inp["old"], inp["other"], inp["mask"]
        if op_name == "ppo_policy_loss":
            f = lambda: op(x, old, other, mask, clip_low=0.2, dual_clip=3.0, backend=backend)  # noqa: E731
        else:
            f = lambda: op(x, old, other, mask, clip=0.2, backend=backend)  # noqa: E731
        return _loss_runner(inp, f)

    return build


def _eager_loss(op_name, compile_it):
    def build(inp):
        fn = eager_policy_loss if op_name == "ppo_policy_loss" else eager_value_loss
        if compile_it:
            fn = compiled(fn)
        x, old, other, mask = inp["x"], inp["old"], inp["other"], inp["mask"]
        return _loss_runner(inp, lambda: fn(x, old, other, mask))

    return build


POLICY_LOSS_CASES = {  # name -> (loss_type, extra policy_loss kwargs)
    "sapo": ("sapo", {}), "cispo": ("cispo", {}), "gspo_token": ("gspo_token", {}),
    "ppo+tis": ("ppo", {"rollout_is": "token", "clip_high": 0.28}),
    "reinforce": ("reinforce", {}), "gspo": ("gspo", {}), "geo_mean": ("geo_mean", {}),
}


def _policy_inputs(batch, steps):
    def make(device):
        inp = _loss_inputs(batch, steps, "fp32", True)(device)
        g = torch.Generator().manual_seed(1)
        inp["rollout"] = inp["old"] + (torch.randn(batch, steps, generator=g) * 0.1).to(device)
        return inp

    return make


def _fa_policy(name, backend):
    def build(inp):
        fastalign_backend(backend, inp["device"])
        op = fastalign_op("policy_loss")
        loss_type, kw = POLICY_LOSS_CASES[name]
        x, old, adv, mask, roll = inp["x"], inp["old"], inp["other"], inp["mask"], inp["rollout"]
        rk = {"rollout_logprobs": roll} if "rollout_is" in kw else {}
        return _loss_runner(inp, lambda: op(x, old, adv, mask, loss_type=loss_type, backend=backend, **rk, **kw))

    return build


def _eager_policy(name, compile_it):
    def build(inp):
        from fastalign.kernels import reference_policy_losses as R
        from fastalign.ops.policy_loss import CORRECTION_DEFAULTS

        loss_type, kw = POLICY_LOSS_CASES[name]
        kw = dict(kw)
        corr = {k: kw.pop(k) for k in list(kw) if k in CORRECTION_DEFAULTS}
        formula = getattr(R, loss_type)
        x, old, adv, mask, roll = inp["x"], inp["old"], inp["other"], inp["mask"], inp["rollout"]

        def fn(x, old, adv, mask, roll):
            return R.policy_loss(formula, x, old, adv, mask, kw, rollout_logprobs=roll if corr else None,
                                 correction={**CORRECTION_DEFAULTS, **corr})

        f = compiled(fn) if compile_it else fn
        return _loss_runner(inp, lambda: f(x, old, adv, mask, roll))

    return build


def _policy_cases(quick, fa):
    out = []
    try:
        fastalign_op("policy_loss")
    except Exception:
        return out
    b, t = (4, 64) if quick else (64, 2048)
    for name in POLICY_LOSS_CASES:
        conts = {f"fastalign[{x}]": _fa_policy(name, x) for x in fa}
        conts.update({"eager": _eager_policy(name, False), "torch.compile": _eager_policy(name, True)})
        out.append(Case(FAMILY, f"policy_loss[{name}]", "fwd+bwd", {"B": b, "T": t, "dtype": "fp32"}, b * t, "B x T",
                        _policy_inputs(b, t), conts, tuple(f"fastalign[{x}]" for x in fa),
                        group="policy_loss fwd+bwd fp32"))
    return out


def cases(quick: bool, device: str) -> list[Case]:
    fastalign_op("gae")
    out = []
    fa = fastalign_backends(device)
    gae_conts = {f"fastalign[{b}]": _fa_gae(b) for b in fa}
    gae_conts.update({"trl loop": _trl_gae, "verl loop": _verl_gae})
    if quick:
        gae_shapes = [(4, 64)]
    elif device.startswith("cuda"):
        gae_shapes = [(64, 2048), (64, 8192)]
    else:
        gae_shapes = [(64, 512), (64, 2048), (64, 8192)]
    for b, t in gae_shapes:
        out.append(Case(FAMILY, "gae", "fwd", {"B": b, "T": t, "dtype": "fp32"}, b * t, "B x T",
                        _gae_inputs(b, t), gae_conts, tuple(f"fastalign[{x}]" for x in fa), group="gae fp32"))
    loss_shapes = [(4, 64, "fp32")] if quick else [(64, 2048, "fp32"), (64, 8192, "fp32"), (64, 2048, "bf16")]
    for op_name in ("ppo_policy_loss", "ppo_value_loss"):
        try:
            fastalign_op(op_name)
        except Exception:
            continue
        conts = {f"fastalign[{b}]": _fa_loss(op_name, b) for b in fa}
        conts.update({"eager": _eager_loss(op_name, False), "torch.compile": _eager_loss(op_name, True)})
        for b, t, dtype in loss_shapes:
            for mode in ("fwd", "fwd+bwd"):
                out.append(Case(FAMILY, op_name, mode, {"B": b, "T": t, "dtype": dtype}, b * t, "B x T",
                                _loss_inputs(b, t, dtype, mode == "fwd+bwd"), conts,
                                tuple(f"fastalign[{x}]" for x in fa), group=f"{op_name} {mode} {dtype}"))
    return out + _policy_cases(quick, fa)


# ---- targets (issue 3 on the CPU, issue 8 on the GPU) -----------------------------------------------


def targets(records, quick: bool, device: str, ctx: dict) -> list[dict]:
    out = []
    if device == "cpu":
        checks = [("issue 3", "gae", "fwd", 2048, "fastalign[cpp]", 100.0)]
    else:
        checks = [("issue 8", "gae", "fwd", 8192, "fastalign[cuda]", 1000.0),
                  ("issue 8", "gae", "fwd", 8192, "fastalign[triton]", 1000.0)]
    for issue, op, mode, t, fa, need in checks:
        rec = find_record(records, op, mode, B=64, T=t, dtype="fp32")
        tf = median(rec, fa)
        loops = {n: median(rec, n) for n in ("trl loop", "verl loop")}
        loops = {n: v for n, v in loops.items() if v}
        # against the faster of the two loops (the conservative ratio); both are in the table
        value = min(loops.values()) / tf if tf and loops else None
        detail = ", ".join(f"{n} {v / tf:.0f}x" for n, v in loops.items()) if tf and loops else None
        out.append(target(issue, f"gae {fa} speedup vs the faster Python loop (B=64, T={t})", value,
                          f">= {need:g}x", value is not None and value >= need, quick, detail=detail))
    if device == "cpu":
        rec = find_record(records, "ppo_policy_loss", "fwd+bwd", B=64, T=2048, dtype="fp32")
        tf, te = median(rec, "fastalign[cpp]"), median(rec, "eager")
        value = te / tf if tf and te else None
        out.append(target("issue 3", "ppo_policy_loss fwd+bwd cpp speedup vs eager (B=64, T=2048 fp32)", value,
                          ">= 3x", value is not None and value >= 3.0, quick))
        for name in POLICY_LOSS_CASES:  # issue 20: >= torch.compile and >= 5x eager
            rec = find_record(records, f"policy_loss[{name}]", "fwd+bwd", B=64, T=2048, dtype="fp32")
            tf, te, tc = (median(rec, c) for c in ("fastalign[cpp]", "eager", "torch.compile"))
            value = te / tf if tf and te else None
            vs_compile = tc / tf if tf and tc else None
            ok = value is not None and value >= 5.0 and vs_compile is not None and vs_compile >= 1.0
            detail = None if vs_compile is None else f"{vs_compile:.2f}x torch.compile"
            out.append(target("issue 20", f"policy_loss[{name}] fwd+bwd cpp speedup vs eager (B=64, T=2048 fp32), "
                              f"and >= torch.compile", value, ">= 5x and >= 1x compile", ok, quick, detail=detail))
    return out


test_rl = pytest_suite(cases)  # `pytest fastalign/benchmarks/bench_rl.py --benchmark-enable`
