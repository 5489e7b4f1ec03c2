"""fastalign.integrations.trl.patch_trl against stock TRL: real trainer steps, both ways.

A tiny Llama (built from a config, no download) is trained for 2 steps by TRL's own DPOTrainer,
once stock and once under `use_fastalign()`, from identical weights and seeds, fp32 on the CPU.
Compared: the loss and every logged metric, the gradients seen by the optimizer at each step,
and the updated parameters. A counting wrapper around `fastalign.linear_gather_logprobs` proves
the patched run really went through fastalign (and the stock run did not).

Tolerances (fp32): fastalign's fused log-softmax (online max/sum over vocabulary tiles, fp32)
and TRL's chunked one differ in the last ulps of each token's log-prob (|logp| ~ 5 here, ulp
~5e-7); summed over ~10 completion tokens that is ~1e-5 relative on the sequence log-probs and
the loss. Gradients are sums of [tokens, V] products accumulated in a different order: rtol
1e-4 with atol 1e-6 (the largest gradients here are ~1e-1). Measured (fp32): loss 1e-7 relative,
gradients 6e-7 of each tensor's largest entry, weights 7e-9 apart after 2 SGD steps.
TRL's default config (bf16=True) runs under bf16 autocast even on the CPU: see
test_dpo_trainer_step_bf16_autocast_matches_stock for that case and its tolerances (measured: first
step's gradients 0.5% of each tensor's scale, second step's 1.2%, after weights that already differ).
"""

import os

# Nothing may reach the network: set before TRL / transformers / datasets are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

hf_trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl==1.16.0)")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (TRL needs it)")

import fastalign  # noqa: E402
from fastalign.integrations import trl as fa_trl  # noqa: E402
from fastalign.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402

trl_utils = pytest.importorskip("trl.trainer.utils")

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
PARAM_TOL = dict(rtol=1e-5, atol=1e-6)

PAIRS = {
    "prompt": ["ab", "hello ", "x=", "q:", "sum 2+2=", "hi", "color:", "say yes:"],
    "chosen": ["cd", "world", "12", "yes", "4", "there", "red", "yes"],
    "rejected": ["zz", "there!", "9", "no no", "five", "?", "blue sky", "no"],
}


@pytest.fixture(autouse=True)
def _always_unpatched():
    fa_trl.unpatch_trl()
    yield
    fa_trl.unpatch_trl()


def _train(trainer, recorder, patched, model):
    """trainer.train(), patched with fastalign or stock: (loss logs, recorded gradients, weights)."""
    if patched:
        with fa_trl.use_fastalign():
            trainer.train()
    else:
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, recorder.grads, {n: p.detach().clone() for n, p in model.named_parameters()}


class _GradRecorder:
    """TrainerCallback: the gradients the optimizer is about to apply, per step."""

    def __init__(self):
        self.grads = []

    def __getattr__(self, name):  # every other TrainerCallback event: no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _run_dpo(tmp_path, patched, **config):
    from trl import DPOConfig, DPOTrainer

    tok = tiny_tokenizer()
    small = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model = tiny_model(tok, seed=0, **small)
    ref = tiny_model(tok, seed=1, **small)  # another model: the first step's loss is not log 2
    args = DPOConfig(output_dir=str(tmp_path / ("patched" if patched else "stock")), per_device_train_batch_size=4,
                     max_steps=2, learning_rate=0.5, optim="sgd", report_to="none", logging_steps=1, use_cpu=True,
                     seed=0, data_seed=0, save_strategy="no", disable_tqdm=True, **config)
    recorder = _GradRecorder()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_dict(PAIRS),
                         processing_class=tok, callbacks=[recorder])
    return _train(trainer, recorder, patched, model)


@pytest.fixture
def lgl_calls(monkeypatch):
    """Counts calls of fastalign.linear_gather_logprobs (looked up on the module at each call)."""
    calls = []
    real = fastalign.linear_gather_logprobs

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastalign, "linear_gather_logprobs", counting)
    return calls


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_trainer_step_matches_stock(tmp_path, lgl_calls, loss_type):
    _compare_dpo(tmp_path, lgl_calls, dict(loss_type=[loss_type], beta=0.1, bf16=False), LOSS_TOL, GRAD_TOL, PARAM_TOL)


def test_dpo_trainer_step_bf16_autocast_matches_stock(tmp_path, lgl_calls):
    """TRL's default (bf16=True): on the CPU too, the step runs under bf16 autocast, so both heads multiply
    bf16-rounded hidden states and head weights (fp32 statistics). TRL then writes each logits-gradient tile
    back into its bf16 buffer before the weight / hidden GEMMs; fastalign keeps that gradient in fp32. The
    gradients differ by that one bf16 rounding (2^-8 relative on the head's contribution): rtol 2^-7.
    Forward values (loss, metrics) only see the same bf16 operands: fp32 tolerances there."""
    bf16 = dict(rtol=2**-7, atol=1e-5, scale=2**-7)
    _compare_dpo(tmp_path, lgl_calls, dict(loss_type=["sigmoid"], beta=0.1), dict(rtol=1e-5, atol=1e-5), bf16, None)


def _close(got, want, tol, msg):
    tol = dict(tol)
    scale = tol.pop("scale", 0.0)  # atol relative to the tensor's largest entry
    tol["atol"] = max(tol["atol"], scale * want.abs().max().item())
    torch.testing.assert_close(got, want, **tol, msg=msg)


def _compare_dpo(tmp_path, lgl_calls, config, loss_tol, grad_tol, param_tol):
    torch.manual_seed(0)
    loss_type = config["loss_type"][0]
    logs_s, grads_s, params_s = _run_dpo(tmp_path, patched=False, **config)
    assert lgl_calls == [], "the stock run must not touch fastalign"
    logs_p, grads_p, params_p = _run_dpo(tmp_path, patched=True, **config)
    # policy forward per step (chosen+rejected batch) + reference forward per step
    assert len(lgl_calls) == 4, f"expected 4 fastalign head calls in 2 patched steps, got {len(lgl_calls)}"

    assert len(logs_s) == len(logs_p) == 2
    if loss_type == "sigmoid":
        assert abs(logs_s[0]["loss"] - 0.6931) > 1e-3, "the reference differs from the policy: loss is not log 2"
    for step, (ls, lp) in enumerate(zip(logs_s, logs_p)):
        assert ls.keys() == lp.keys()
        for key in ls:
            if key in ("train_runtime", "train_samples_per_second", "train_steps_per_second"):
                continue
            # the gradient norm, and everything after the first update, carry the gradients' tolerance
            tol = loss_tol if step == 0 and key != "grad_norm" else grad_tol
            _close(torch.tensor(lp[key], dtype=torch.float64), torch.tensor(ls[key], dtype=torch.float64), tol,
                                       msg=lambda m, k=key, s=step: f"step {s} metric {k}: {m}")
    assert len(grads_s) == len(grads_p) == 2
    for step, (gs, gp) in enumerate(zip(grads_s, grads_p)):
        assert gs.keys() == gp.keys() and len(gs) > 0
        for name in gs:
            assert gs[name].abs().max() > 0 or gp[name].abs().max() == 0
            _close(gp[name], gs[name], grad_tol,
                                       msg=lambda m, n=name, s=step: f"step {s} grad {n}: {m}")
    init = dict(tiny_model(tiny_tokenizer(), seed=0, hidden_size=32, num_layers=2, num_heads=2,
                           intermediate_size=64).named_parameters())
    for name in params_s:
        # the updates (sums of lr x clipped gradients) at the gradients' tolerance, the weights at param_tol
        _close(params_p[name] - init[name], params_s[name] - init[name], grad_tol,
               msg=lambda m, n=name: f"update of {n}: {m}")
        if param_tol is not None:
            _close(params_p[name], params_s[name], param_tol, msg=lambda m, n=name: f"{n}: {m}")
    # the steps changed the weights (the comparison is not between two untouched models)
    assert any((params_s[n] - p).abs().max() > 1e-4 for n, p in init.items())


def test_patch_and_unpatch_restore_trl(lgl_calls):
    originals = {name: getattr(trl_utils, name) for name in
                 ("_ChunkedLogProbFunction", "_use_triton", "selective_log_softmax", "entropy_from_logits",
                  "selective_log_softmax_and_entropy")}
    patched = fa_trl.patch_trl()
    assert set(patched) == {f"trl.trainer.utils.{n}" for n in originals}
    assert fa_trl.patch_trl() == patched  # idempotent
    for name, original in originals.items():
        assert getattr(trl_utils, name) is not original, name
    fa_trl.unpatch_trl()
    for name, original in originals.items():
        assert getattr(trl_utils, name) is original, name
    with fa_trl.use_fastalign():
        assert fa_trl.is_patched()
    assert not fa_trl.is_patched()
    assert trl_utils._ChunkedLogProbFunction is originals["_ChunkedLogProbFunction"]


def test_module_imported_by_name_is_patched_and_restored():
    # a trl module that did `from .utils import selective_log_softmax` (as the experimental trainers do)
    import sys
    import types

    fake = types.ModuleType("trl._fastalign_test_mod")
    fake.selective_log_softmax = trl_utils.selective_log_softmax
    original = fake.selective_log_softmax
    sys.modules[fake.__name__] = fake
    try:
        fa_trl.patch_trl()
        assert fake.selective_log_softmax is trl_utils.selective_log_softmax is not original
        fa_trl.unpatch_trl()
        assert fake.selective_log_softmax is original
    finally:
        del sys.modules[fake.__name__]


def test_patched_functions_match_trl():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40, dtype=torch.float32, requires_grad=True)
    index = torch.randint(0, 40, (3, 5))
    idx_k = torch.randint(0, 40, (3, 5, 2))
    row_mask = torch.rand(3, 5) > 0.3
    tol = dict(rtol=1e-5, atol=1e-6)

    def run():  # through trl.trainer.utils' names: stock, or fastalign once patched
        res = []
        for temperature in (1.0, 0.7):
            lp = trl_utils.selective_log_softmax(logits, index, temperature=temperature, row_mask=row_mask)
            res += [lp, *torch.autograd.grad(lp.sum(), logits)]
            lp, ent = trl_utils.selective_log_softmax_and_entropy(logits, index, temperature=temperature,
                                                                  row_mask=row_mask)
            res += [lp, ent, *torch.autograd.grad((lp + 0.3 * ent).sum(), logits)]
        res.append(trl_utils.selective_log_softmax(logits, idx_k))
        ent = trl_utils.entropy_from_logits(logits)
        return res + [ent, *torch.autograd.grad(ent.sum(), logits)]

    want = run()
    with fa_trl.use_fastalign():
        got = run()
        counts = fa_trl.call_counts()
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, i=i: f"result {i}: {m}")
    assert counts == {"selective_log_softmax": 3, "selective_log_softmax_and_entropy": 2, "entropy_from_logits": 1}


def test_fused_head_matches_trl_kernel(lgl_calls):
    """FusedLMHead against TRL's ChunkedLogProbFunction directly: every output field, logit_scale,
    temperature, bias, and the gradients from log-probs and entropy; soft-capping falls back to TRL."""
    from trl.kernels import ChunkedLogProbFunction

    torch.manual_seed(0)
    head = fa_trl.FusedLMHead(ChunkedLogProbFunction)
    h = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (9,))
    outs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    for temperature, scale in ((1.0, 1.0), (0.7, 0.5)):
        want = ChunkedLogProbFunction.apply(h, w, b, t, temperature, 32, None, scale, outs)
        got = head.apply(h, w, b, t, temperature, 32, None, scale, outs)
        for name, x, y in zip(outs, got, want):
            if name == "is_top1":
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        gw = torch.autograd.grad((want[0] + 0.5 * want[1]).sum(), (h, w, b))
        gg = torch.autograd.grad((got[0] + 0.5 * got[1]).sum(), (h, w, b))
        for x, y in zip(gg, gw):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    assert len(lgl_calls) == 2
    # fields not asked for are None, as in TRL
    got = head.apply(h, w, None, t, 1.0, 32, None, 1.0, ("log_probs",))
    assert got[1:] == (None, None, None, None)
    # soft-capping: TRL's own kernel, counted as a fallback
    fa_trl._COUNTS.clear()
    want = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32, 30.0, 1.0, outs)
    got = head.apply(h, w, None, t, 1.0, 32, 30.0, 1.0, outs)
    torch.testing.assert_close(got[0], want[0])
    assert fa_trl.call_counts() == {"lm_head_fallback": 1} and len(lgl_calls) == 3


def _reward(completions, **kwargs):
    # a deterministic reward with spread inside each group: vowels minus a length cost
    return [float(sum(c.count(ch) for ch in "aeiou")) - 0.1 * len(c) for c in completions]


def _run_online(tmp_path, kind, patched):
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    tok = tiny_tokenizer()
    path = tmp_path / f"{kind}-{'patched' if patched else 'stock'}"
    # TRL builds the KL reference (beta > 0) from the policy's path: save the tiny model locally
    tiny_model(tok, seed=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64).save_pretrained(path / "m")
    tok.save_pretrained(path / "m")
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config_cls(output_dir=str(path), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                      max_steps=2, learning_rate=0.1, optim="sgd", report_to="none", logging_steps=1, use_cpu=True,
                      seed=0, bf16=False, save_strategy="no", disable_tqdm=True, beta=0.04)
    recorder = _GradRecorder()
    trainer = trainer_cls(model=str(path / "m"), reward_funcs=_reward, args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_dict({"prompt": ["ab", "hello ", "x=", "q:"]}),
                          callbacks=[recorder])
    return _train(trainer, recorder, patched, trainer.model)


# RLOO goes through the same patched head as GRPO: marked slow to keep this file near 30 s on 2 cores
@pytest.mark.parametrize("kind", ["grpo", pytest.param("rloo", marks=pytest.mark.slow)])
def test_online_trainer_steps_match_stock(tmp_path, lgl_calls, kind):
    """GRPOTrainer / RLOOTrainer, 2 steps, fp32, KL to a reference (beta 0.04). Sampling is seeded and
    generation uses the model's own forward (not patched), so both runs score the same completions; the
    log-probs of policy, old policy and reference then go through fastalign's head."""
    logs_s, grads_s, params_s = _run_online(tmp_path, kind, patched=False)
    assert lgl_calls == []
    logs_p, grads_p, params_p = _run_online(tmp_path, kind, patched=True)
    assert len(lgl_calls) >= 4, f"fastalign's head ran {len(lgl_calls)} times"
    assert len(logs_s) == len(logs_p) >= 1 and len(grads_s) == len(grads_p) == 2
    for step, (ls, lp) in enumerate(zip(logs_s, logs_p)):
        assert ls.keys() == lp.keys()
        for key in ls:
            if "time" in key or "per_second" in key:
                continue
            _close(torch.tensor(lp[key], dtype=torch.float64), torch.tensor(ls[key], dtype=torch.float64), GRAD_TOL,
                   msg=lambda m, k=key, s=step: f"step {s} metric {k}: {m}")
    for step, (gs, gp) in enumerate(zip(grads_s, grads_p)):
        assert gs.keys() == gp.keys() and any(g.abs().max() > 0 for g in gs.values())
        for name in gs:
            _close(gp[name], gs[name], GRAD_TOL, msg=lambda m, n=name, s=step: f"step {s} grad {n}: {m}")
    for name in params_s:
        _close(params_p[name], params_s[name], PARAM_TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_head_mixed_dtypes_fall_back(lgl_calls):
    """cast_lm_head_to_fp32 with a bf16 head (fp32 hidden, bf16 weight, no autocast): handed to TRL whole,
    which casts one vocabulary chunk at a time (fastalign would copy the whole head to fp32)."""
    from trl.kernels import ChunkedLogProbFunction

    head = fa_trl.FusedLMHead(ChunkedLogProbFunction)
    h = torch.randn(5, 16)
    w = torch.randn(30, 16, dtype=torch.bfloat16)
    t = torch.randint(0, 30, (5,))
    fa_trl._COUNTS.clear()
    got = head.apply(h, w, None, t, 1.0, 32, None, 1.0, ("log_probs",))
    want = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32, None, 1.0, ("log_probs",))
    assert torch.equal(got[0], want[0]) and lgl_calls == [] and fa_trl.call_counts() == {"lm_head_fallback": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (TRL's Triton head runs on CUDA only)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_matches_trl_triton_kernel_cuda(dtype):
    """On a GPU, against TRL's Triton path of ChunkedLogProbFunction. fp32: rounding only (rtol 1e-5; the
    fp32 GEMMs may use TF32 if the caller enabled it -- they are not here). bf16: both round each logits
    tile to bf16; TRL also rounds the logits gradient to bf16 before its GEMMs (fastalign keeps it fp32):
    log-probs / entropy within 2^-7 of their scale, gradients within 2^-7 of each tensor's scale."""
    from trl.kernels import ChunkedLogProbFunction

    torch.manual_seed(0)
    head = fa_trl.FusedLMHead(ChunkedLogProbFunction)
    h = torch.randn(300, 64, device="cuda", dtype=dtype, requires_grad=True)
    w = (0.1 * torch.randn(5000, 64, device="cuda")).to(dtype).requires_grad_()
    t = torch.randint(0, 5000, (300,), device="cuda")
    outs = ("log_probs", "entropy", "mean_logits", "is_top1")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3, scale=2**-7)
    want = ChunkedLogProbFunction.apply(h, w, None, t, 0.9, 1024, None, 1.0, outs)
    got = head.apply(h, w, None, t, 0.9, 1024, None, 1.0, outs)
    for name, x, y in zip(outs[:3], got, want):
        _close(x.float(), y.float(), tol, msg=lambda m, n=name: f"{n}: {m}")
    gw = torch.autograd.grad((want[0] + 0.5 * want[1]).sum(), (h, w))
    gg = torch.autograd.grad((got[0] + 0.5 * got[1]).sum(), (h, w))
    for x, y in zip(gg, gw):
        _close(x.float(), y.float(), tol, msg=lambda m: m)
