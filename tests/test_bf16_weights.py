"""trainer.precision=bf16-weights on the tiny model: bf16 weights, fp32 master weights in the
optimizer, gradients accumulated in fp32.

Exact checks (deterministic, bit for bit):
  * after each step every trainable weight is bf16 and equals its fp32 master rounded to bf16;
    the optimizer holds the masters (fp32), not the weights;
  * a step's master gradient is the fp32 sum of the micro-batches' bf16 gradients, each computed
    alone (the same backward of the same micro-batch: the same bits), and the master update is
    torch's AdamW applied to fp32 copies of the masters with that gradient;
  * checkpoints hold the fp32 masters, and a resumed run continues bit for bit (losses, masters);
  * with LoRA adapters too (the adapters' masters only: the frozen base stays bf16).

The loss trajectory against fp32 training (the same data, seed and optimizer): to first order in
the roundings, the loss of the bf16 model at step t differs from the fp32 model's by
    |sum_i g_i (w~_i - w_i)| + sum_a |dL/da . a| k u_bf16
where g is the fp32 model's gradient, w~ - w the measured difference of the weights the two
forwards use (the bf16 weights include their rounding), and the second sum runs over the
outputs a of every leaf module (embedding, linear, norm, activation, logits), each rounded to
bf16 once (u_bf16 = 2^-8) -- k = 3 counts that output's rounding and up to two unhooked
elementwise roundings that follow it in the same layer (residual add; SiLU(gate) * up; the
attention's scaled products). Matmuls accumulate in fp32 (gamma_K fp32 << u_bf16, omitted).
The second-order terms are O(u_bf16^2) relative, well inside the factor 2 allowed on top. And
the weights themselves stay within what the two AdamW trajectories allow: |m~_t - w_t| <=
u_bf16 |w_0| + sum_s 2 lr_s C_s, where C_s bounds |m_hat / sqrt(v_hat)| for betas (b1, b2) after s
steps (Cauchy-Schwarz: (1 - b1) / (1 - b1^s) sqrt((1 - b2^s) / (1 - b2)) sqrt(sum_{j<s} (b1^2/b2)^j)).
"""

import copy
import json
import math
import os
import shutil
from collections import Counter

import pytest
import torch

from fastalign.algorithms import get_algorithm
from fastalign.data.synthetic import SyntheticTask
from fastalign.errors import ConfigError
from fastalign.models import adapters, tiny_model, tiny_tokenizer
from fastalign.trainer import Trainer
from fastalign.trainer.devices import check_bf16_weights
from tests.numerics import U, assert_within

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
UB = U[torch.bfloat16]
STEPS = 4
LR = 1e-3


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    return get_algorithm("sft")().encode(SyntheticTask().demonstrations(48, 0), tok, 64, Counter())


def _trainer(tok, data, out, precision="bf16-weights", model=None, **kw):
    cfg = dict(output_dir=str(out), max_steps=STEPS, batch_size=4, grad_accum=2, lr=LR, progress=False, plot=False,
               precision=precision, device="cpu", handle_sigint=False, schedule="constant")
    cfg.update(kw)
    return Trainer(get_algorithm("sft")(), {"policy": model or tiny_model(tok, seed=0, **TINY)}, tok, data, None, cfg)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def _check_weights_are_rounded_masters(tr):
    """The optimizer holds exactly the fp32 masters; every trainable weight is bf16 and equals its
    master rounded to bf16."""
    assert {id(p) for g in tr.optimizer.param_groups for p in g["params"]} == {id(m) for m in tr.master_weights.masters}
    for p, m in zip(tr.master_weights.params, tr.master_weights.masters):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        assert torch.equal(p, m.to(torch.bfloat16))


def test_masters_are_fp32_weights_bf16_and_the_step_is_adamw_on_the_masters(tok, data, tmp_path):
    tr = _trainer(tok, data, tmp_path, max_grad_norm=None)
    _check_weights_are_rounded_masters(tr)
    mbs = tr.next_micro_batches()
    assert len(mbs) == 2
    # each micro-batch's bf16 gradient alone, on a copy (the trainer's loss scaling: / total units)
    total = sum(tr.algorithm.loss_units(mb) for mb in mbs)
    alone = []
    for mb in mbs:
        m = copy.deepcopy(tr.models["policy"])
        loss_sum, _ = tr.algorithm.loss({"policy": m}, mb)
        (loss_sum / total).backward()
        alone.append([p.grad for p in m.parameters()])
    masters_before = [m.detach().clone() for m in tr.master_weights.masters]
    tr.accumulate(mbs)
    for i, m in enumerate(tr.master_weights.masters):
        assert m.grad.dtype == torch.float32 and tr.master_weights.params[i].grad is None
        assert torch.equal(m.grad, alone[0][i].float() + alone[1][i].float())  # summed in fp32, not bf16
    grads = [m.grad.clone() for m in tr.master_weights.masters]
    tr.optimizer.step()
    tr.master_weights.copy_to_model()
    ref = [w.clone().requires_grad_(True) for w in masters_before]
    for w, g in zip(ref, grads):
        w.grad = g
    decay = [w for w in ref if w.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0},
                             {"params": [w for w in ref if w.dim() < 2], "weight_decay": 0.0}], lr=LR)
    by_id = {id(m): i for i, m in enumerate(tr.master_weights.masters)}
    order = [by_id[id(p)] for g in tr.optimizer.param_groups for p in g["params"]]
    opt.param_groups[0]["params"] = [ref[i] for i in order if tr.master_weights.masters[i].dim() >= 2]
    opt.param_groups[1]["params"] = [ref[i] for i in order if tr.master_weights.masters[i].dim() < 2]
    opt.step()
    for w, m in zip(ref, tr.master_weights.masters):
        assert torch.equal(w.detach(), m.detach())
    _check_weights_are_rounded_masters(tr)


def test_resume_is_exact_and_checkpoints_hold_fp32_masters(tok, data, tmp_path):
    full = tmp_path / "full"
    tr = _trainer(tok, data, full, max_steps=6, save_every=2, save_total_limit=5)
    tr.fit()
    _check_weights_are_rounded_masters(tr)
    from safetensors.torch import load_file

    saved = load_file(str(full / "checkpoints" / "step-000006" / "policy" / "model.safetensors"))
    live = dict(tr.models["policy"].named_parameters())
    masters = {id(p): m for p, m in zip(tr.master_weights.params, tr.master_weights.masters)}
    for k, v in saved.items():
        assert v.dtype == torch.float32 and torch.equal(v, masters[id(live[k])].detach()), k
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004")
    tr2 = _trainer(tok, data, resumed, max_steps=6, save_every=2, save_total_limit=5, resume_from="latest")
    tr2.fit()
    assert _losses(resumed) == _losses(full)[4:]
    again = load_file(str(resumed / "checkpoints" / "step-000006" / "policy" / "model.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_with_lora_adapters_only_the_adapters_have_masters(tok, data, tmp_path):
    opts = adapters.check_options({"r": 4, "alpha": 8})
    model = adapters.add_adapters(tiny_model(tok, seed=0, **TINY), opts)
    tr = _trainer(tok, data, tmp_path, model=model, max_steps=2)
    tr.fit()
    names = {id(p): n for n, p in tr.models["policy"].named_parameters()}
    assert tr.master_weights.params and all("lora_" in names[id(p)] for p in tr.master_weights.params)
    assert all(p.dtype == torch.bfloat16 for p in tr.models["policy"].parameters())
    _check_weights_are_rounded_masters(tr)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tr.last_checkpoint, "policy", "adapter_model.safetensors"))
    assert saved and all(v.dtype == torch.float32 for v in saved.values())


def test_refusals(tok, data, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="bf16-weights with trainer.distributed=fsdp is not supported"):
        _trainer(tok, data, tmp_path, distributed="fsdp")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ConfigError, match="Tesla V100 cannot compute in bf16"):
        check_bf16_weights(torch.device("cuda"))
    with pytest.raises(ConfigError, match="runs on cpu or cuda devices"):
        check_bf16_weights(torch.device("mps"))


# ---- the loss trajectory against fp32 ------------------------------------------------------------


def _adam_ratio_bound(s, b1=0.9, b2=0.999):
    return (1 - b1) / (1 - b1 ** s) * math.sqrt((1 - b2 ** s) / (1 - b2)) * math.sqrt(
        sum((b1 * b1 / b2) ** j for j in range(s)))


def _first_order_terms(alg, model, mbs):
    """(fp32 gradient of the step's loss by parameter name, sum over leaf-module outputs of
    |dL/da . a|), the loss being the trainer's: summed over the micro-batches / total units."""
    m = copy.deepcopy(model).float()
    outs = []

    def keep(_mod, _inp, out):
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.requires_grad:
            out.retain_grad()
            outs.append(out)

    hooks = [mod.register_forward_hook(keep) for mod in m.modules() if not list(mod.children())]
    total = sum(alg.loss_units(mb) for mb in mbs)
    for mb in mbs:
        loss_sum, _ = alg.loss({"policy": m}, mb)
        (loss_sum / total).backward()
    for h in hooks:
        h.remove()
    act = sum(float((a.grad.double() * a.detach().double()).abs().sum()) for a in outs if a.grad is not None)
    return {n: p.grad.double() for n, p in m.named_parameters()}, act


def test_loss_trajectory_stays_within_the_rounding_bound_of_fp32(tok, data, tmp_path):
    runs, weights = {}, {}
    for precision in ("fp32", "bf16-weights"):
        snaps = []
        tr = _trainer(tok, data, tmp_path / precision, precision=precision, save_final=False)
        snaps.append({n: p.detach().double().clone() for n, p in tr.models["policy"].named_parameters()})
        tr.callbacks.append(lambda t, _m, s=snaps: s.append(
            {n: p.detach().double().clone() for n, p in t.models["policy"].named_parameters()}))
        if precision == "bf16-weights":
            masters = []
            tr.callbacks.append(lambda t, _m: masters.append(
                {id(p): m.detach().double().clone() for p, m in zip(t.master_weights.params, t.master_weights.masters)}))
            by_name = {id(p): n for n, p in tr.models["policy"].named_parameters()}
        tr.fit()
        runs[precision], weights[precision] = [loss for _, loss in _losses(tmp_path / precision)], snaps
    fp32, bf16 = runs["fp32"], runs["bf16-weights"]
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]  # both learn
    # replay the steps' batches (the same seeded permutation) to get the first-order terms
    replay = _trainer(tok, data, tmp_path / "replay", precision="fp32")
    alg = replay.algorithm
    drift = 0.0
    for t in range(STEPS):
        mbs = replay.next_micro_batches()
        model = tiny_model(tok, seed=0, **TINY)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights["fp32"][t][n])
        grads, act = _first_order_terms(alg, model, mbs)
        dw = sum(float((grads[n] * (weights["bf16-weights"][t][n] - weights["fp32"][t][n])).sum()) for n in grads)
        bound = 2 * (abs(dw) + 3 * UB * act)
        assert_within(bf16[t], fp32[t], bound, f"loss at step {t + 1}")
        if t:  # the masters after step t against the fp32 weights: the two AdamW trajectories' room
            drift += 2 * LR * _adam_ratio_bound(t)
            for pid, m in masters[t - 1].items():
                w = weights["fp32"][t][by_name[pid]]
                assert_within(m, w, UB * weights["fp32"][0][by_name[pid]].abs() + drift, f"master {by_name[pid]}")
