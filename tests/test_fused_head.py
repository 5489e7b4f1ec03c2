"""The trainer's fused log-prob head (fastalign/models/fused_head.py; token_logps(fused_head=True)):
per-token log-probs and entropies straight from the last hidden states, against the full-logits
path (fused_head=False: model(...).logits then gather_logprobs) -- padded, packed, SFT's packed
rows, PEFT adapters and the adapter-free reference, gradient checkpointing, GPT-2, bf16 autocast
and bf16 weights -- plus the refusals and a check that no [tokens, V] tensor is ever created.

Bounds. Both paths run the same backbone on the same inputs (the same ops on the same shapes:
bit-identical hidden states h) and differ only in the head:
  * the logits z = h W^T / T: one GEMM over all tokens vs one per tile of tokens (another
    blocking): the two differ by at most D = matmul_bound(h, W^T) / T (2 gamma(H) |h||W| / T,
    tests/numerics.py) plus one rounding of z / T each;
  * log p_j = z_j - LSE(z): each path evaluates it within logp_error(z) of the exact value for
    its own logits (any summation order of the LSE), and LSE is 1-Lipschitz in the max norm, so
    |d log p_j| <= D_j + max_k D_k + 2 logp_error(z)_j;
  * entropy H = LSE(z) - sum_k p_k z_k: dH/dz_k = -p_k (z_k - E_p[z]), so a logit change of at
    most max D moves H by at most (max z - min z) max D; each evaluation is within
    `entropy_error(z)` (below) of the exact value for its logits.
  * bf16 autocast: both GEMMs take the same bf16 operands and accumulate in fp32 (oneDNN on the
    CPU, cuBLAS on CUDA), then round the logits to bf16 once (the fused op rounds each tile, as
    the eager GEMM rounds its output): D = 2 gamma_fp32(H) |h_bf16||W_bf16| + 2 u_bf16 |z| (two
    fp32 sums within D of each other can round to neighbouring bf16 values).
  * gradients w.r.t. the model's parameters: the head's backward (another blocking again, and
    p computed per tile) feeds a gradient of h that differs by rounding, which the backbone's
    backward then propagates; there is no closed-form bound through a transformer's backward at
    hand, so (as tests/test_packing.py does) the fp32 error is measured: the full-logits path in
    fp64 stands for the exact value, E = the fp32 full-logits run's largest error against it
    (per parameter tensor), and the fused run may differ from the fp32 full-logits run by
    4 E + one fp32 rounding (both within ~E of exact). A wrong target shift, temperature or
    a missing entropy term moves results by ~1e-1, far beyond every bound.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastalign.algorithms import token_logps
from fastalign.data import collate as C
from fastalign.data.packing import next_token_targets, pack_rows
from fastalign.data.synthetic import SyntheticTask
from fastalign.models import ScalarHeadModel, tiny_model, tiny_tokenizer
from fastalign.models.adapters import AdapterFreeReference, PeftOptions, add_adapters
from fastalign.models.fused_head import FUSABLE, causal_lm, fused_head_refusal
from tests.numerics import U, assert_within, gamma, logp_error, matmul_bound

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
U32 = U[torch.float32]
_FN = 2 * 20 * U32  # one fp32 exp/log (tests/numerics.py: EXP_ULPS = 20, one ulp <= 2u|x|)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(tok, arch="llama", seed=0):
    return tiny_model(tok, seed=seed, arch=arch, **TINY)


def _batch(tok, n=5, seed=0):
    exs = C.encode_demonstrations(SyntheticTask().demonstrations(n, seed), tok, 64)
    return C.collate_lm(exs, tok.pad_token_id)


def _sft_packed_batch(tok):
    """SFT's algo.packing rows: several examples per row, position_ids, a [B, 1, T, T] mask."""
    exs = C.encode_demonstrations(SyntheticTask().demonstrations(8, 3), tok, 64)
    return C.collate_lm(C.pack(exs, 96), tok.pad_token_id)


def entropy_error(z: torch.Tensor) -> torch.Tensor:
    """Bound [..., 1] on one fp32 evaluation of the entropy of softmax(z) from fp32 logits z, in
    any order: with d = z - max z, S = sum e^d, L = log S, H = L - sum_k p_k d_k:
      * L within lse_err as in numerics.logp_error (rho = the relative error of S);
      * sum p d: each term e^d_k d_k off by (u |d_k| + F + u) relative (the rounded d_k, exp,
        the product), summed in any order (gamma(V)), divided by S (rho + u): relative error
        r = u max|d| + F + 2u + gamma(V) + rho + u on sum p |d|;
      * H = L - sum p d rounds: u (|L| + sum p |d|)."""
    z = z.detach().double()
    d = z - z.max(-1, keepdim=True).values
    big_l = d.exp().sum(-1, keepdim=True).log()
    p = (d - big_l).exp()
    spd = (p * d.abs()).sum(-1, keepdim=True)
    umax = U32 * d.abs().amax(-1, keepdim=True)
    rho = umax + 2 * _FN + U32 + gamma(z.shape[-1])
    lse_err = rho / (1 - rho) + _FN * big_l.abs() + U32 * (z.max(-1, keepdim=True).values.abs() + big_l.abs())
    r = umax + _FN + 3 * U32 + gamma(z.shape[-1]) + rho
    return lse_err + r * spd + U32 * (big_l.abs() + spd)


def _head_inputs(model, batch, packed):
    """(h, W, b) the LM head received on the full-logits path (a forward pre-hook on lm_head)."""
    head = causal_lm(model).get_output_embeddings()
    seen = []
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            token_logps(model, batch, packed=packed, fused_head=False)
    finally:
        handle.remove()
    return seen[-1], head.weight.detach(), head.bias


def _forward_bounds(model, batch, packed, temperature, low_precision=None):
    """Per-position bounds [B, T-1] on |fused - logits| for the log-probs and the entropy (the
    module docstring), laid out like token_logps' outputs."""
    h, w, b = _head_inputs(model, batch, packed)
    if low_precision is not None:
        h, w = h.to(low_precision), w.to(low_precision)
    z = (h.double() @ w.double().T + (0 if b is None else b.double())) / temperature
    d = matmul_bound(h.double(), w.double().T) / temperature + U32 * z.abs()
    if low_precision is not None:
        d = d + 2 * U[low_precision] * z.abs()
    dmax = d.amax(-1, keepdim=True)
    lp_err = logp_error(z)
    if packed:  # the hidden states of the packed row: back to the padded layout
        rows = pack_rows(batch["input_ids"], batch["attention_mask"])
        z, d, dmax, lp_err = (rows.scatter(t[0]) for t in (z, d, dmax, lp_err))
    idx = next_token_targets(batch["labels"]).clamp(min=0)[..., None]
    lp_bound = (d.gather(-1, idx) + dmax + 2 * lp_err.gather(-1, idx))[..., 0]
    ent_bound = (2 * entropy_error(z) + (z.amax(-1, keepdim=True) - z.amin(-1, keepdim=True)) * dmax)[..., 0]
    return lp_bound[:, :-1], ent_bound[:, :-1]


def _run(model, batch, *, fused, packed=False, temperature=1.0, grads=True):
    """token_logps' (logps, entropy, mask) and the gradients of sum(logps) + 0.3 sum(entropy)
    with respect to the trainable parameters, by name."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    lp, ent, mask = token_logps(model, batch, temperature=temperature, return_entropy=True, packed=packed,
                                fused_head=fused)
    if grads:
        (lp.sum() + 0.3 * (ent * mask).sum()).backward()
    g = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None} if grads else {}
    return lp.detach(), ent.detach(), mask, g


def _exact_grads(model, batch, temperature=1.0):
    """The gradients of _run's objective in fp64 (a copy of the model), with torch's log_softmax
    on the full fp64 logits of the padded forward (packed or not: the same exact function)."""
    exact = copy.deepcopy(model).double()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logp = torch.log_softmax(exact(**inputs).logits[:, :-1] / temperature, -1)
    labels = batch["labels"][:, 1:]
    mask = labels != C.IGNORE
    lp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    ent = -(logp.exp() * logp).sum(-1) * mask
    (lp.sum() + 0.3 * ent.sum()).backward()
    return {n: p.grad.detach() for n, p in exact.named_parameters() if p.grad is not None}


def _check_equal_paths(model, batch, *, packed=False, temperature=1.0, grads=True):
    assert fused_head_refusal(model) is None
    lp_f, ent_f, mask, g_f = _run(model, batch, fused=True, packed=packed, temperature=temperature, grads=grads)
    lp_l, ent_l, mask_l, g_l = _run(model, batch, fused=False, packed=packed, temperature=temperature, grads=grads)
    assert torch.equal(mask, mask_l) and mask.any()
    lp_b, ent_b = _forward_bounds(model, batch, packed, temperature)
    assert_within(lp_f, lp_l, lp_b * mask, "log-probs")
    assert_within(ent_f, ent_l, ent_b * mask, "entropy")
    assert torch.equal(lp_f[~mask], torch.zeros_like(lp_f[~mask])) and torch.equal(ent_f[~mask], ent_l[~mask])
    if not grads:
        return
    assert g_f.keys() == g_l.keys() and g_f
    g64 = _exact_grads(model, batch, temperature)
    for name, g in g_f.items():
        e = (g_l[name].double() - g64[name]).abs().max()
        assert_within(g, g_l[name], 4 * e + U32 * g64[name].abs(), f"grad {name}")


# ---- the fused path equals the full-logits path ------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fused_equals_logits_tiny_llama(tok, packed):
    model = _model(tok).train()
    _check_equal_paths(model, _batch(tok), packed=packed, temperature=0.7)


def test_fused_equals_logits_sft_packed_rows_and_gpt2(tok):
    _check_equal_paths(_model(tok).train(), _sft_packed_batch(tok))
    _check_equal_paths(_model(tok, arch="gpt2").train(), _batch(tok, seed=1))


def test_fused_equals_logits_with_adapters_and_reference(tok):
    policy = add_adapters(_model(tok), PeftOptions(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():  # adapters that change the outputs (peft starts B at 0)
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    policy.train()
    batch = _batch(tok)
    _check_equal_paths(policy, batch)
    ref = AdapterFreeReference(policy)
    assert fused_head_refusal(ref) is None
    with torch.no_grad():
        _check_equal_paths(ref, batch, grads=False)
        got, _ = token_logps(ref, batch)  # the reference is the base model: adapters off
        policy.eval()
        with policy.disable_adapter():
            plain, _ = token_logps(policy, batch, fused_head=False)
        policy.train()
        lp_b, _ = _forward_bounds(ref, batch, False, 1.0)
        assert_within(got, plain, lp_b * (batch["labels"][:, 1:] != C.IGNORE), "reference log-probs")
        adapted, _ = token_logps(policy, batch)
        assert (adapted - got).abs().max() > 1e-3  # the adapters do change the log-probs: the check can fail


def test_fused_equals_logits_with_gradient_checkpointing(tok):
    model = _model(tok).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _check_equal_paths(model, _batch(tok), packed=False)
    _check_equal_paths(model, _batch(tok), packed=True)


def test_fused_equals_logits_bf16_autocast_and_bf16_weights(tok):
    """bf16: the forward bound of the module docstring with bf16 operands; the gradients of the
    two bf16 runs against each other within 4 E_bf16 (E: the full-logits bf16 run's error
    against fp64), as for fp32."""
    model = _model(tok).train()
    batch = _batch(tok)
    for weights in (False, True):
        m = copy.deepcopy(model).to(torch.bfloat16) if weights else model
        outs = []
        for fused in (True, False):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not weights):
                outs.append(_run(m, batch, fused=fused))
        (lp_f, ent_f, mask, g_f), (lp_l, ent_l, _, g_l) = outs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not weights):
            lp_b, ent_b = _forward_bounds(m, batch, False, 1.0, low_precision=torch.bfloat16)
        assert_within(lp_f, lp_l, lp_b * mask, f"bf16 log-probs (weights {weights})")
        assert_within(ent_f, ent_l, ent_b * mask, f"bf16 entropy (weights {weights})")
        g64 = _exact_grads(model, batch)
        assert g_f.keys() == g_l.keys() and g_f
        for name, g in g_f.items():
            assert g.dtype == (torch.bfloat16 if weights else torch.float32)
            e = (g_l[name].double() - g64[name]).abs().max()
            assert_within(g, g_l[name], 4 * e + U[torch.bfloat16] * g64[name].abs(), f"bf16 grad {name}")


# ---- the logits are never built ------------------------------------------------------------------------


class _LargestVocabTensor(TorchDispatchMode):
    """Records the largest tensor produced by any op with the vocabulary size V among its dims."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and self.vocab in t.shape:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_no_tensor_of_tokens_by_vocab_on_the_fused_path(tok, packed, monkeypatch):
    """With 16-token tiles, no forward or backward op of the fused path creates a tensor with V
    among its dims larger than a quarter of tokens x V (the full logits; the head's own weight
    gradient [V, H] is smaller here); the full-logits path does (the detector works). And the
    head's nn.Linear.forward never runs."""
    import fastalign.ops.linear_logprobs as llp

    monkeypatch.setattr(llp, "auto_chunk_size", lambda *a, **k: 16)
    model = _model(tok).train()
    batch = _batch(tok, n=6)
    vocab = model.config.vocab_size
    tokens = int(batch["attention_mask"].sum()) if packed else batch["input_ids"].numel()
    assert vocab * TINY["hidden_size"] < tokens * vocab // 4  # the weight gradient stays below the threshold
    head = model.get_output_embeddings()
    linear_forward = torch.nn.Linear.forward

    def guarded(self, x):
        if self is head:
            raise AssertionError("the LM head's forward ran: full logits")
        return linear_forward(self, x)

    for fused in (True, False):
        mode = _LargestVocabTensor(vocab)
        with monkeypatch.context() as mp:
            if fused:
                mp.setattr(torch.nn.Linear, "forward", guarded)
            with mode:
                lp, ent, mask = token_logps(model, batch, return_entropy=True, packed=packed, fused_head=fused)
                (lp.sum() + ent.sum()).backward()
        if fused:
            assert mode.largest < tokens * vocab // 4, (mode.largest, tokens * vocab)
        else:
            assert mode.largest >= tokens * vocab


# ---- which models are fused: fused_head_refusal --------------------------------------------------------


def test_the_fusable_classes_apply_nothing_to_their_logits():
    """Each class of FUSABLE assigns `logits` once, from its lm_head, and returns it as is (the
    precondition of head_logps; re-read here so a transformers upgrade that changes one fails)."""
    import transformers

    for name in FUSABLE:
        src = inspect.getsource(getattr(transformers, name).forward)
        assigned = [line.strip() for line in src.splitlines() if line.strip().startswith("logits ")]
        assert assigned == ["logits = self.lm_head(hidden_states)"], (name, assigned)
        assert "logits=logits," in src.replace(" ", ""), name


def test_refusals(tok):
    model = _model(tok)
    assert fused_head_refusal(model) is None
    assert fused_head_refusal(_model(tok, arch="gpt2")) is None
    assert "ScalarHeadModel" in fused_head_refusal(ScalarHeadModel(_model(tok), seed=0))

    class Custom(type(model)):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    sub = _model(tok)
    sub.__class__ = Custom
    assert "overrides LlamaForCausalLM.forward" in fused_head_refusal(sub)

    capped = _model(tok)
    capped.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in fused_head_refusal(capped)
    scaled = _model(tok)
    scaled.config.logit_scale = 0.5
    assert "logit_scale" in fused_head_refusal(scaled)

    hooked = _model(tok)
    handle = hooked.lm_head.register_forward_hook(lambda m, a, out: out * 2)
    assert "hooks" in fused_head_refusal(hooked)
    handle.remove()
    assert fused_head_refusal(hooked) is None

    lora_head = add_adapters(_model(tok), PeftOptions(r=2, target_modules=["q_proj", "lm_head"]), seed=0)
    assert "not a plain nn.Linear" in fused_head_refusal(lora_head)
    saved_head = add_adapters(_model(tok), PeftOptions(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                              seed=0)
    assert "not a plain nn.Linear" in fused_head_refusal(saved_head)
    assert fused_head_refusal(add_adapters(_model(tok), PeftOptions(r=2), seed=0)) is None

    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    assert "Gemma2ForCausalLM is not one of" in fused_head_refusal(gemma)


def test_refused_models_use_the_logits(tok):
    """A refused model (a forward hook doubling the logits) goes through its full logits: the
    hook's effect shows, and token_logps equals the unfused call."""
    model = _model(tok).eval()
    batch = _batch(tok)
    with torch.no_grad():
        plain, _ = token_logps(model, batch)
        handle = model.lm_head.register_forward_hook(lambda m, a, out: out * 2)
        hooked, _ = token_logps(model, batch)
        unfused, _ = token_logps(model, batch, fused_head=False)
        handle.remove()
    assert torch.equal(hooked, unfused) and (hooked - plain).abs().max() > 1e-2


def test_model_fused_head_config_switch(tmp_path, monkeypatch):
    """model.fused_head: true (default) takes the fused path and false the full logits, through
    `fastalign train`'s run_training; both train. Their first losses (before any update: the same
    weights) agree within fp32 rounding: the DPO loss is a 1-Lipschitz function of beta times a
    sum of ~100 log-prob differences per pair, each within ~1e-6 of its counterpart (the bounds
    above), so 1e-4 absolute is ~100x the worst case; later steps are not compared (AdamW
    amplifies rounding in gradients near 0, see tests/test_distributed.py). A bad value is a
    ConfigError naming the option; YAML's `off` reads as false."""
    import json

    import fastalign.models.fused_head as FH
    from fastalign.errors import ConfigError
    from fastalign.trainer.run import load_config, resolve_config, run_training

    def cfg(mode):
        return {"model": {"policy": "tiny", "tiny": TINY, "fused_head": mode == "on"},
                "data": {"train_size": 16, "eval_size": 0, "max_length": 48},
                "algo": {"beta": 0.2},
                "trainer": {"output_dir": str(tmp_path / mode), "max_steps": 3, "batch_size": 4, "lr": 1e-3,
                            "progress": False, "plot": False, "save_final": False, "precision": "fp32",
                            "device": "cpu"}}

    with pytest.raises(ConfigError, match="model.fused_head"):
        resolve_config("dpo", {"model": {"fused_head": "sometimes"}})
    assert resolve_config("dpo", load_config(None, ["model.fused_head=off"]))["model"].fused_head is False
    calls, original = [], FH.head_logps
    monkeypatch.setattr("fastalign.algorithms.base.head_logps",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    losses, fused_calls = {}, {}
    for mode in ("on", "off"):
        calls.clear()
        run_training("dpo", cfg(mode))
        fused_calls[mode] = len(calls)
        with open(tmp_path / mode / "metrics.jsonl") as f:
            losses[mode] = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert fused_calls["on"] >= 6 and fused_calls["off"] == 0  # policy + reference per step
    assert len(losses["on"]) == len(losses["off"]) == 3
    assert losses["on"][0] == pytest.approx(losses["off"][0], abs=1e-4)
    for mode in ("on", "off"):
        assert abs(losses[mode][-1] - losses[mode][0]) > 1e-3  # both train


def test_response_logps_builds_no_logits(tok, monkeypatch):
    """fastalign.trainer.generation.response_logps (the recipes' evaluation) scores through
    token_logps' fused head: it runs with the LM head's nn.Linear.forward forbidden and gives the
    full-logits path's sums within the bounds above, summed (each row's token bounds plus a sum of
    T terms in any order)."""
    from fastalign.trainer.generation import response_logps
    from tests.numerics import sum_bound

    model = _model(tok).eval()
    prompts = ["ab", "hello there", "x"]
    responses = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 2]]
    exs = []
    for p, r in zip(prompts, responses):
        pid = tok(C.prompt_text(tok, p), add_special_tokens=False)["input_ids"]
        exs.append({"input_ids": pid + r, "labels": [C.IGNORE] * len(pid) + r})
    batch = C.collate_lm(exs, tok.pad_token_id)
    with torch.no_grad():
        want, mask = token_logps(model, batch, temperature=0.9, fused_head=False)
        lp_b, _ = _forward_bounds(model, batch, False, 0.9)
    head, linear_forward = model.get_output_embeddings(), torch.nn.Linear.forward

    def guarded(self, x):
        assert self is not head, "the LM head's forward ran: full logits"
        return linear_forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", guarded)
    got = response_logps(model, tok, prompts, responses, temperature=0.9)
    bound = (lp_b * mask).sum(-1) + sum_bound(want.abs().sum(-1), mask.shape[1])
    assert_within(got, want.sum(-1), bound, "response log-probs")
