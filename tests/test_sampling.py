"""fastalign.sampling: FastSampler against transformers' generate, its sampling distribution, its
log-probs, its argument checks, and the trainer's use of it (trainer.sampler, algo.old_logps).

Exactness. Greedy decoding is compared token for token with `model.generate` on the same chunks
of prompts (the model's own modules and weights compute everything but the attention -- the fused
q/k/v and gate/up GEMMs are the same dot products -- so only a near-tie of the top two logits
within rounding could differ; none is here). In bf16 the same holds against generate on the same
bf16 model, and for dtype="bf16" on an fp32 model against generate under bf16 autocast. The sampler's log-probs are
gather_logprobs of the logits it saw: that part is compared bit for bit.

Distributions (fixed seeds: deterministic). A token drawn N times with probability p has a
count X ~ Binomial(N, p); Bernstein's inequality gives P(|X - Np| >= t) <= 2 exp(-t^2 / (2
(Np(1-p) + t/3))), so t = a/3 + sqrt(a^2/9 + 2 a Np(1-p)) with a = ln(2/delta) bounds one
count at failure probability delta; a union bound over the K tokens of a test at delta = 1e-9 /
K bounds the whole test at 1e-9. Tokens of probability 0 (excluded by top-k / top-p) must have
count 0 exactly. The expected probabilities are computed in fp64 from the same logits.

Log-probs against a trainer forward (bound derived, first order): each fp32 evaluation of the
network is the exact network with every matmul operand, every Linear input and every residual
sum perturbed by at most gamma(K) relatively (K = the longest accumulation: hidden, intermediate,
vocabulary or sequence length; Higham 3.5 / 4.4), and with every attention output perturbed by
at most (3 gamma(K) + 2 s gamma(D) ||q|| max||k||) max|v| (a convex combination of values
whose weights carry the scores' dot-product error through the softmax, 2x its size, plus the
exp and sum roundings). To first order a log-prob then moves by at most sum |d logp / d x| |dx|
over those perturbations, which autograd gives in fp64 from the actual activations; two
evaluations (the sampler's decode and the trainer's full forward) are within twice that, plus
the head's own log-softmax error (tests.numerics.logp_error) for each.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastalign.models import tiny_model, tiny_tokenizer
from fastalign.ops.logprobs import gather_logprobs
from fastalign.sampling import FastSampler, TransformersEngine, make_engine
from fastalign.sampling.token_choice import choose_tokens
from tests.numerics import assert_within, gamma, logp_error

TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
DELTA = 1e-9  # the tolerated false-failure probability of one statistical test


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_model(tok, seed=3, **TINY).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # larger weights than the init's: greedy outputs that vary along a response
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
    return m


def _prompts(tok, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(7, len(tok), (n,), generator=g).tolist() for n in lengths]


def _generate(model, tok, prompts, max_batch, max_new_tokens, eos):
    """model.generate, greedy, on the same chunks, each response cut after its first EOS."""
    rows = []
    for i in range(0, len(prompts), max_batch):
        chunk = prompts[i: i + max_batch]
        w = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (w - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)
        for row in out[:, w:].tolist():
            rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


# ---- greedy: generate's tokens ---------------------------------------------------------------------------

def test_greedy_equals_generate_token_for_token(model, tok):
    prompts = _prompts(tok, [1, 2, 5, 9, 16, 3, 7, 12])
    free = _generate(model, tok, prompts, 3, 16, eos=tok.eos_token_id)
    # as EOS, the token whose first occurrences spread the rows' stops most (some never stop)
    def stops_of(t):
        return [r.index(t) + 1 if t in r else 16 for r in free]
    eos = max({t for r in free for t in r}, key=lambda t: (16 in stops_of(t), len(set(stops_of(t)))))
    ref = _generate(model, tok, prompts, 3, 16, eos=eos)
    stops = [len(r) for r in ref]
    assert min(stops) < 16 and max(stops) == 16 and len(set(stops)) > 2, stops  # the case is exercised
    out = FastSampler(model, tok, max_batch=3, eos_token_id=eos).sample(prompts, max_new_tokens=16, do_sample=False)
    assert out.token_ids == ref
    assert out.truncated == sum(eos not in r for r in ref)
    assert [len(x) for x in out.logprobs] == stops == [len(x) for x in out.entropies]
    # one big batch (no chunking) gives the same tokens
    assert FastSampler(model, tok, max_batch=64, eos_token_id=eos).sample(
        prompts, max_new_tokens=16, do_sample=False).token_ids == ref
    # the transformers engine is generate itself
    assert TransformersEngine(model, tok, max_batch=3, eos_token_id=eos).sample(
        prompts, max_new_tokens=16, do_sample=False).token_ids == ref


def _scaled(m, seed=3):
    """m with larger weights than the init's (as the `model` fixture): greedy outputs that vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
            else:  # norm weights and biases
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def _gqa_model(tok):
    """A tiny Llama with grouped-query attention (4 query heads on 2 KV heads) and q/k/v/o biases:
    the decode step's grouped SDPA and the fused biases are exercised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-5, attention_bias=True,
                      vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    return _scaled(LlamaForCausalLM(cfg), seed=11)


@pytest.mark.parametrize("fuse", [True, False])
def test_greedy_equals_generate_with_grouped_query_attention(tok, fuse):
    m = _gqa_model(tok)
    prompts = _prompts(tok, [3, 8, 1, 12, 5])
    ref = _generate(m, tok, prompts, 5, 14, eos=tok.eos_token_id)
    out = FastSampler(m, tok, max_batch=5, fuse=fuse).sample(prompts, max_new_tokens=14, do_sample=False)
    assert out.token_ids == ref


def test_fused_projections_equal_the_modules(tok):
    """One GEMM over q/k/v (gate/up) side by side against each Linear module: the same dot
    products, so within two matmul roundings (tests.numerics.matmul_bound) -- bit-equal where the
    GEMM's K-blocking does not depend on N (the CPU this was written on)."""
    from fastalign.sampling.decode_weights import DecodeWeights, run
    from tests.numerics import matmul_bound

    m = _gqa_model(tok)
    w = DecodeWeights(m, dtype=torch.float32, fuse=True)
    assert w.sync() and not w.sync()  # built once; nothing changed: not rebuilt
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    layer, lw = m.model.layers[1], w.layers[1]
    a, mlp = layer.self_attn, layer.mlp
    assert len(lw["qkv"]) == 1 and len(lw["gate_up"]) == 1  # fused: one Projection each
    with torch.no_grad():
        for got, mod in zip(run(lw["qkv"], x) + run(lw["gate_up"], x),
                            (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj)):
            want = mod(x)
            # the bias is added once by both: only the products differ
            assert_within(got, want, matmul_bound(x, mod.weight.T), str(mod))
        assert w.layers[0]["qkv"][0].bias is not None  # attention_bias=True: biases fused too


def test_a_kept_sampler_follows_weight_updates(model, tok):
    """The decoder's weight copies are rebuilt when a parameter changes in place (an optimizer
    step): a sampler made before the update gives the updated model's greedy tokens."""
    m = tiny_model(tok, seed=3, **TINY)
    m.load_state_dict(model.state_dict())
    prompts = _prompts(tok, [4, 9, 2])
    s = FastSampler(m, tok, max_batch=3)
    before = s.sample(prompts, max_new_tokens=10, do_sample=False).token_ids
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.train()
    m(torch.tensor([prompts[1]]), labels=torch.tensor([prompts[1]])).loss.backward()
    opt.step()
    m.eval()
    after = s.sample(prompts, max_new_tokens=10, do_sample=False).token_ids
    assert after == _generate(m, tok, prompts, 3, 10, eos=tok.eos_token_id)
    assert after != before  # the update changed the greedy tokens: the check above can fail


def test_unplain_projections_are_called_as_modules(model, tok):
    """A projection with a forward hook (as a LoRA wrapper or any module other than a plain
    nn.Linear) is not copied: the decoder calls it, so it still decodes as generate does."""
    m = tiny_model(tok, seed=3, **TINY)
    m.load_state_dict(model.state_dict())
    proj = m.model.layers[0].self_attn.k_proj
    handle = proj.register_forward_hook(lambda mod, args, out: out * 1.5 + 0.25)
    try:
        prompts = _prompts(tok, [6, 3])
        s = FastSampler(m, tok, max_batch=2)
        out = s.sample(prompts, max_new_tokens=10, do_sample=False).token_ids
        assert out == _generate(m, tok, prompts, 2, 10, eos=tok.eos_token_id)
        qkv0, qkv1 = (s.decoder.weights.layers[i]["qkv"] for i in (0, 1))
        assert qkv0[0].weight is None and qkv1[0].weight is not None  # layer 0: modules called; layer 1: fused
    finally:
        handle.remove()
    assert out != FastSampler(m, tok, max_batch=2).sample(prompts, max_new_tokens=10, do_sample=False).token_ids


# ---- the sampling dtype ---------------------------------------------------------------------------------

def _lora_model(model, tok, targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")):
    """`model`'s weights under LoRA adapters (peft) with nonzero B (peft initialises B to 0: the
    adapters would change nothing), so the merged weights differ from the base ones."""
    from peft import LoraConfig, get_peft_model

    m = tiny_model(tok, seed=3, **TINY)
    m.load_state_dict(model.state_dict())
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=list(targets)))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval()


def test_lora_projections_enter_the_fused_weights_merged(model, tok):
    """A LoRA-wrapped projection is copied as W + scale B A (peft's merge): the decode weights'
    product equals the module's eval-mode output within the matmul bound of each (two products
    and a sum there, one product here), for q/k/v fused across wrapped (q, v) and plain (k)
    modules; with the adapters disabled it is the base Linear's."""
    from fastalign.sampling.decode_weights import DecodeWeights, run
    from fastalign.sampling.static_decoder import causal_lm
    from tests.numerics import matmul_bound

    pm = _lora_model(model, tok)
    w = DecodeWeights(causal_lm(pm), dtype=torch.float32)
    assert w.sync() and not w.sync()
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    a, mlp = pm.get_base_model().model.layers[1].self_attn, pm.get_base_model().model.layers[1].mlp
    lw = w.layers[1]
    assert all(p.weight is not None for p in lw["qkv"] + lw["gate_up"] + [lw["o"], lw["down"]])  # all copied
    with torch.no_grad():
        for got, mod in zip(run(lw["qkv"], x) + run(lw["gate_up"], x), (a.q_proj, a.k_proj, a.v_proj,
                                                                        mlp.gate_proj, mlp.up_proj)):
            want = mod(x)
            merged = mod.weight + (mod.get_delta_weight("default") if hasattr(mod, "lora_A") else 0)
            bound = matmul_bound(x, merged.T) + (matmul_bound(x, mod.get_base_layer().weight.T) +
                                                 matmul_bound(x, mod.get_delta_weight("default").T)
                                                 if hasattr(mod, "lora_A") else 0)
            assert_within(got, want, bound, str(mod))
        lora_q = (run(lw["qkv"], x)[0] - x @ a.q_proj.get_base_layer().weight.T).abs().max()
        assert lora_q > 1e-2  # the adapters change the product: the check above can fail
        with pm.disable_adapter():
            assert w.sync()  # the adapter state changed: rebuilt
            got = run(w.layers[1]["qkv"], x)[0]
            assert_within(got, x @ a.q_proj.get_base_layer().weight.T,
                          matmul_bound(x, a.q_proj.get_base_layer().weight.T), "disabled")
        assert w.sync()  # enabled again: rebuilt


def test_lora_model_greedy_equals_generate_and_follows_adapter_updates(model, tok):
    """FastSampler runs a peft LoRA model itself (no fallback to generate): greedy tokens equal
    generate's on the same wrapped model, with the adapters disabled equal the base model's, and a
    sampler kept across an optimizer step on the adapters samples the updated adapters."""
    from fastalign.sampling import make_engine

    pm = _lora_model(model, tok)
    prompts = _prompts(tok, [4, 9, 2, 6])
    s = make_engine("auto", pm, tok, max_batch=4)
    assert isinstance(s, FastSampler)
    ref = _generate(pm, tok, prompts, 4, 12, eos=tok.eos_token_id)
    assert s.sample(prompts, max_new_tokens=12, do_sample=False).token_ids == ref
    base = _generate(model, tok, prompts, 4, 12, eos=tok.eos_token_id)
    assert base != ref  # the adapters change the greedy tokens: the checks can fail
    with pm.disable_adapter():
        assert s.sample(prompts, max_new_tokens=12, do_sample=False).token_ids == base
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=2.0)
    pm.train()
    pm(torch.tensor([prompts[1]]), labels=torch.tensor([prompts[1]])).loss.backward()
    opt.step()
    pm.eval()
    after = s.sample(prompts, max_new_tokens=12, do_sample=False).token_ids
    assert after == _generate(pm, tok, prompts, 4, 12, eos=tok.eos_token_id)
    assert after != ref  # the step changed the greedy tokens


def test_bf16_model_greedy_equals_generate_on_the_same_model(model, tok):
    """dtype auto on a bf16 model decodes in bf16: generate's tokens on that model."""
    m = tiny_model(tok, seed=3, **TINY)
    m.load_state_dict(model.state_dict())
    m = m.to(torch.bfloat16).eval()
    prompts = _prompts(tok, [1, 2, 5, 9, 16, 3])
    ref = _generate(m, tok, prompts, 3, 16, eos=tok.eos_token_id)
    out = FastSampler(m, tok, max_batch=3).sample(prompts, max_new_tokens=16, do_sample=False, temperature=0.9)
    assert out.token_ids == ref
    assert all(lp.dtype == torch.float32 and ent.dtype == torch.float32 for lp, ent in zip(out.logprobs, out.entropies))


def test_bf16_sampling_of_an_fp32_model_is_its_bf16_autocast_forward(model, tok):
    """dtype="bf16" on an fp32 model: generate's greedy tokens under bf16 autocast (the trainer's
    bf16 forward), which differ from the fp32 model's somewhere (so the dtype is really used);
    the log-probs are fp32."""
    prompts = _prompts(tok, [1, 2, 5, 9, 16, 3, 7, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _generate(model, tok, prompts, 4, 16, eos=tok.eos_token_id)
    s = FastSampler(model, tok, max_batch=4, dtype="bf16")
    out = s.sample(prompts, max_new_tokens=16, do_sample=False)
    assert out.token_ids == ref
    assert all(lp.dtype == torch.float32 for lp in out.logprobs)
    assert out.token_ids != _generate(model, tok, prompts, 4, 16, eos=tok.eos_token_id)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched


def test_seeded_sampling_is_deterministic_and_seed_dependent(model, tok):
    prompts = _prompts(tok, [4, 8, 2])
    s = FastSampler(model, tok, max_batch=2)
    a, b = (s.sample(prompts, max_new_tokens=12, seed=5, top_p=0.9) for _ in range(2))
    assert a.token_ids == b.token_ids and all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    assert s.sample(prompts, max_new_tokens=12, seed=6, top_p=0.9).token_ids != a.token_ids


# ---- the distribution of sampled tokens -----------------------------------------------------------------

def _bernstein_t(n, p, k):
    a = math.log(2 * k / DELTA)
    var = n * p * (1 - p)
    return a / 3 + math.sqrt(a * a / 9 + 2 * a * var)


def _assert_counts_match(counts: torch.Tensor, probs: torch.Tensor, what: str):
    """counts [V] of N draws against probs [V] (fp64, summing to 1)."""
    n = int(counts.sum())
    k = int((probs > 0).sum())
    assert (counts[probs == 0] == 0).all(), f"{what}: an excluded token was drawn"
    for j in (probs > 0).nonzero().flatten().tolist():
        p = float(probs[j])
        t = _bernstein_t(n, p, k)
        assert abs(float(counts[j]) - n * p) <= t, f"{what}: token {j} drawn {int(counts[j])} times, expected " \
                                                   f"{n * p:.1f} +- {t:.1f}"


def _filtered_probs(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """transformers' warpers in fp64: temperature, top-k (ties at the k-th kept), then top-p."""
    z = logits.double() / temperature
    if top_k:
        kth = z.topk(top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    p = z.softmax(-1)
    if top_p < 1:
        ordered, order = p.sort(descending=True)
        above = ordered.cumsum(0) - ordered
        # the test's logits keep every mass boundary far from top_p (no rounding-dependent case)
        assert (above - top_p).abs().min() > 1e-4
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[order[above < top_p]] = True
        p = torch.where(keep, p, torch.zeros_like(p))
        p = p / p.sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8),
                                                     (0.9, 6, 0.7)])
def test_token_choice_is_distributed_as_the_filtered_softmax(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(12, generator=g) * 2
    n = 40_000
    tokens = choose_tokens(logits.expand(n, -1), do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                           generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(tokens, minlength=12)
    _assert_counts_match(counts, _filtered_probs(logits, temperature, top_k, top_p),
                         f"T={temperature} top_k={top_k} top_p={top_p}")


def test_top_k_and_top_p_never_emit_excluded_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(256, 500, generator=g) * 3
    logits[:, :7] = float("-inf")  # masked vocabulary entries stay out
    logits[0, 100:110] = 50.0      # a tie at the top: top_k=3 keeps all ten tied entries
    for top_k, top_p in [(3, 1.0), (0, 0.5), (20, 0.3), (1, 1.0)]:
        for rep in range(20):
            tok = choose_tokens(logits, do_sample=True, temperature=1.0, top_k=top_k, top_p=top_p,
                                generator=torch.Generator().manual_seed(rep))
            z = logits.double()
            allowed = torch.ones_like(z, dtype=torch.bool)
            if top_k:
                allowed &= z >= z.topk(top_k, -1).values[:, -1:]
            if top_p < 1:
                p = torch.where(allowed, z, torch.full_like(z, float("-inf"))).softmax(-1)
                ordered, order = p.sort(-1, descending=True)
                keep = torch.zeros_like(allowed)
                keep.scatter_(-1, order, (ordered.cumsum(-1) - ordered) < top_p + 1e-6)  # + rounding margin
                allowed &= keep
            assert allowed.gather(1, tok[:, None]).all(), (top_k, top_p)
    assert (choose_tokens(logits, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, generator=None)
            == logits.argmax(-1)).all()


def test_sampler_first_two_tokens_follow_the_model(model, tok):
    """FastSampler end to end: the first token's frequencies against softmax(logits / T) of the
    prompt, the second's against sum_a p(a) p(b | a) over the rows that did not stop at a."""
    T, n = 0.8, 6000
    prompt = _prompts(tok, [6], seed=4)[0]
    eos = tok.eos_token_id
    out = FastSampler(model, tok, max_batch=1000).sample([prompt] * n, max_new_tokens=2, temperature=T, seed=9)
    V = len(tok)
    with torch.no_grad():
        p0 = (model(torch.tensor([prompt])).logits[0, -1].double() / T).softmax(-1)
        nexts = torch.tensor([prompt + [a] for a in range(V)])
        p1 = (model(nexts).logits[:, -1].double() / T).softmax(-1)  # [a, b] = p(b | a)
    first = torch.tensor([r[0] for r in out.token_ids])
    _assert_counts_match(torch.bincount(first, minlength=V), p0, "first token")
    go_on = p0.clone()
    go_on[eos] = 0
    second = torch.tensor([r[1] for r in out.token_ids if r[0] != eos])
    _assert_counts_match(torch.bincount(second, minlength=V), (go_on / go_on.sum()) @ p1, "second token")
    assert all(len(r) == 1 for r in out.token_ids if r[0] == eos)  # a row stops at its EOS


# ---- log-probs ------------------------------------------------------------------------------------------

def test_logprobs_are_gather_logprobs_of_the_logits_seen(model, tok):
    prompts = _prompts(tok, [3, 11, 6])
    s = FastSampler(model, tok, max_batch=4)
    seen = []
    for name in ("prefill", "step"):
        fn = getattr(s.decoder, name)

        def spy(*a, _fn=fn):
            out = _fn(*a)
            seen.append(out.clone())
            return out
        setattr(s.decoder, name, spy)
    out = s.sample(prompts, max_new_tokens=6, temperature=0.7, top_k=5, seed=0)
    for i, (ids, lp, ent) in enumerate(zip(out.token_ids, out.logprobs, out.entropies)):
        logits = torch.stack([seen[t][i] for t in range(len(ids))])  # no row finished: rows keep their index
        want, want_ent = gather_logprobs(logits, torch.tensor(ids), temperature=0.7, return_entropy=True)
        assert torch.equal(lp, want) and torch.equal(ent, want_ent) and lp.dtype == torch.float32


def _first_order_bounds(model, input_ids, labels, temperature):
    """Per-token bound [B, T-1] of one fp32 evaluation of the log-probs (module docstring). The
    matmul operand perturbation is written on each Linear's output, gamma(k) |x| |W|^T (Higham
    3.5), so that every perturbation is per row and one backward per position serves all rows."""
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    K = max(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, input_ids.shape[1])
    gk = gamma(K)
    m64 = tiny_model(tiny_tokenizer(), **TINY).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    acts, hooks, qkv = [], [], {}  # (tensor whose gradient is taken, its perturbation size)

    def linear_hook(mod, args, out, name):
        x = args[0]
        x.retain_grad()
        out.retain_grad()
        acts.append((x, gk * x.detach().abs(), name))  # the rounding of what produced the input
        acts.append((out, gk * (x.detach().abs() @ mod.weight.detach().abs().T), None))
        if name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
            qkv[name] = out.detach()

    for name, mod in m64.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(lambda m, a, o, name=name: linear_hook(m, a, o, name)))
    for layer in m64.model.layers:
        def post(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h.retain_grad()
            acts.append((h, gk * h.detach().abs(), None))
        hooks.append(layer.register_forward_hook(post))
    try:
        logits = m64(input_ids=input_ids).logits
    finally:
        for h in hooks:
            h.remove()
    lab = labels[:, 1:]
    lp = (logits[:, :-1] / temperature).log_softmax(-1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    for i, (x, size, name) in enumerate(acts):  # the attention outputs (o_proj's input) get their own size
        if name is not None and name.endswith("o_proj"):
            pre_ = name[: -len("o_proj")]
            B, T = x.shape[:2]
            q, k, v = (qkv[pre_ + s].view(B, T, -1, hd) for s in ("q_proj", "k_proj", "v_proj"))
            # |q.k| error <= gamma(hd) sum|q_i||k_i| <= gamma(hd) ||q|| ||k||, and the rotary embedding
            # keeps the norms; the largest key of the row bounds every score of a query
            score_err = hd ** -0.5 * gamma(hd) * q.norm(dim=-1) * k.norm(dim=-1).amax(1, keepdim=True)
            acts[i] = (x, ((3 * gk + 2 * score_err)[..., None] * v.abs().amax(1, keepdim=True)).reshape(B, T, -1),
                       name)
    bound = torch.zeros(lp.shape, dtype=torch.float64)
    head = logp_error(logits[:, :-1].detach() / temperature).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    for t in range(lp.shape[1]):
        on = lab[:, t] != -100
        if not on.any():
            continue
        grads = torch.autograd.grad(lp[on, t].sum(), [x for x, _, _ in acts], retain_graph=True, allow_unused=True)
        total = torch.zeros(lp.shape[0], dtype=torch.float64)
        for (x, size, _), g in zip(acts, grads):
            if g is not None:  # rows are independent: row b's gradient is its own log-prob's
                total += (g.abs() * size).flatten(1).sum(1)
        bound[:, t] = torch.where(on, total + head[:, t], 0.0)
    return bound


def test_logprobs_equal_a_full_forward_within_the_derived_bound(model, tok):
    T = 0.9
    prompts = _prompts(tok, [5, 9, 2], seed=7)
    out = FastSampler(model, tok, max_batch=3).sample(prompts, max_new_tokens=10, temperature=T, seed=3)
    seqs = [p + r for p, r in zip(prompts, out.token_ids)]
    w = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (w - len(s)) for s in seqs])
    labels = torch.tensor([[-100] * len(p) + r + [-100] * (w - len(p) - len(r))
                           for p, r in zip(prompts, out.token_ids)])
    with torch.no_grad():  # the trainer's computation: a right-padded full forward, then gather_logprobs
        mask = torch.tensor([[1] * len(s) + [0] * (w - len(s)) for s in seqs])
        full = gather_logprobs(model(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:],
                               temperature=T)
        wrong_t = gather_logprobs(model(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:])
    bound = 2 * _first_order_bounds(model, ids, labels, T)
    missed = 0
    for i, (p, r) in enumerate(zip(prompts, out.token_ids)):
        sl = slice(len(p) - 1, len(p) - 1 + len(r))
        assert_within(out.logprobs[i], full[i, sl], bound[i, sl], f"row {i}")
        missed += int(((out.logprobs[i] - wrong_t[i, sl]).abs() > bound[i, sl]).sum())
    assert missed > 0  # the bound is tight enough to see log-probs at the wrong temperature (1 for 0.9)


# ---- bad arguments -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_ids=[[]]), r"prompt_ids\[0\] must be a non-empty list"),
    (dict(prompt_ids=[[5, 1000]]), r"prompt_ids\[0\] holds 1000, not a token id in \[0, 103\)"),
    (dict(prompt_ids="abc"), "prompt_ids must be a list"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(do_sample="yes"), "do_sample must be a bool"),
    (dict(seed="1"), "seed must be an int or None"),
])
@pytest.mark.parametrize("engine", [FastSampler, TransformersEngine])
def test_bad_sample_arguments_are_refused(model, tok, engine, kwargs, match):
    args = dict(prompt_ids=[[5, 6]], max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        engine(model, tok).sample(args.pop("prompt_ids"), **args)


def test_bad_engine_arguments_are_refused(model, tok):
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        FastSampler(model, tok, max_batch=0)
    with pytest.raises(ValueError, match="compile must be 'auto', True or False"):
        FastSampler(model, tok, compile="yes")
    with pytest.raises(ValueError, match="dtype must be 'auto', 'fp32' or 'bf16', got 'fp16'"):
        FastSampler(model, tok, dtype="fp16")
    with pytest.raises(ValueError, match="fuse must be a bool"):
        FastSampler(model, tok, fuse="yes")
    with pytest.raises(ValueError, match="dtype torch.float32 on a torch.bfloat16 model"):
        FastSampler(tiny_model(tok, **TINY).to(torch.bfloat16), tok, dtype="fp32")
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_engine("vllm", model, tok)
    gpt2 = tiny_model(tok, arch="gpt2", **TINY)
    with pytest.raises(ValueError, match="model type 'gpt2' is not one of"):
        FastSampler(gpt2, tok)
    with pytest.raises(ValueError, match="sampler 'fastalign' cannot run this model: model type 'gpt2'"):
        make_engine("fastalign", gpt2, tok)
    assert isinstance(make_engine("auto", gpt2, tok), TransformersEngine)
    assert isinstance(make_engine("auto", model, tok), FastSampler)
    assert isinstance(make_engine("auto", model, tok, sharded=True), TransformersEngine)
    assert isinstance(make_engine("transformers", model, tok), TransformersEngine)


# ---- the trainer: trainer.sampler and algo.old_logps ------------------------------------------------------

def _grpo_run(tok, tmp_path, *, old_logps, sampler, policy_state):
    from collections import Counter

    from fastalign.algorithms import get_algorithm
    from fastalign.data.synthetic import SyntheticTask
    from fastalign.trainer.loop import Trainer

    alg = get_algorithm("grpo")({"group_size": 4, "max_new_tokens": 6, "beta": 0.0, "temperature": 0.9,
                                 "old_logps": old_logps}, reward_fn=lambda p, r: float(len(set(r))))
    policy = tiny_model(tok, **TINY)
    policy.load_state_dict(policy_state)
    seen, loss = [], alg.loss

    def spy(models, batch):
        seen.append({k: batch[k].detach().clone() for k in ("input_ids", "labels", "old_logps", "advantages")})
        return loss(models, batch)

    alg.loss = spy
    prompts = alg.encode(SyntheticTask().sample(4, seed=0), tok, 64, Counter())
    cfg = dict(output_dir=str(tmp_path / f"{old_logps}-{sampler}"), max_steps=1, batch_size=4, lr=1e-3,
               progress=False, plot=False, sampler=sampler)
    metrics = Trainer(alg, {"policy": policy}, tok, prompts, None, cfg).fit()["train"]
    return seen, metrics


def test_old_logps_from_the_sampler_agree_with_the_recompute(tok, tmp_path):
    state = tiny_model(tok, seed=5, **TINY).state_dict()
    rec, m_rec = _grpo_run(tok, tmp_path, old_logps="recompute", sampler="fastalign", policy_state=state)
    smp, m_smp = _grpo_run(tok, tmp_path, old_logps="sampler", sampler="fastalign", policy_state=state)
    policy0 = tiny_model(tok, **TINY)
    policy0.load_state_dict(state)
    worst = 0.0
    for a, b in zip(rec, smp):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["advantages"], b["advantages"])
        mask = a["labels"][:, 1:] != -100
        bound = 2 * _first_order_bounds(policy0, a["input_ids"], a["labels"], 0.9)
        assert_within(b["old_logps"][mask], a["old_logps"][mask], bound[mask], "old log-probs")
        assert (b["old_logps"][~mask] == 0).all()
        worst = max(worst, float(bound[mask].max()))  # noqa: the bound is fp64 without gradients
    # the loss: token-mean of max(-A r, -A clip(r)), r = exp(new - old); only old differs, by <= worst,
    # so each term moves by <= |A| e^worst (e^worst - 1) (clipping is 1-Lipschitz in r), plus each
    # run's rounding of the mean (gamma(n) of the terms' magnitudes); GRPO's advantages are z-scores
    # within a group of 4: |A| <= (4 - 1) / sqrt(4)
    a_max, n = 1.5, sum(int((x["labels"][:, 1:] != -100).sum()) for x in rec)
    r_max = math.exp(worst)
    loss_bound = a_max * r_max * (r_max - 1) + 2 * gamma(n) * a_max * r_max
    assert abs(m_smp["loss"] - m_rec["loss"]) <= loss_bound


def test_old_logps_sampler_falls_back_to_the_recompute_with_transformers(tok, tmp_path):
    state = tiny_model(tok, seed=5, **TINY).state_dict()
    rec, m_rec = _grpo_run(tok, tmp_path, old_logps="recompute", sampler="transformers", policy_state=state)
    smp, m_smp = _grpo_run(tok, tmp_path, old_logps="sampler", sampler="transformers", policy_state=state)
    assert all(torch.equal(a["old_logps"], b["old_logps"]) for a, b in zip(rec, smp))
    assert m_rec["loss"] == m_smp["loss"]


def test_trainer_sampler_option_is_checked(tok, tmp_path):
    from fastalign.algorithms import get_algorithm
    from fastalign.errors import ConfigError
    from fastalign.trainer.loop import Trainer

    from collections import Counter

    from fastalign.data.synthetic import SyntheticTask

    alg = get_algorithm("grpo")({"beta": 0.0}, reward_fn=lambda p, r: 0.0)
    cfg = dict(output_dir=str(tmp_path), max_steps=1, progress=False, plot=False)
    data = alg.encode(SyntheticTask().sample(2, seed=0), tok, 64, Counter())
    with pytest.raises(ConfigError, match="sampler must be one of auto, fastalign, transformers"):
        Trainer(alg, {"policy": tiny_model(tok, **TINY)}, tok, data, None, {**cfg, "sampler": "vllm"})
    with pytest.raises(ConfigError, match="trainer.sampler: 'fastalign' cannot sample from this policy: model type"):
        Trainer(alg, {"policy": tiny_model(tok, arch="gpt2", **TINY)}, tok, data, None, {**cfg, "sampler": "fastalign"})
    with pytest.raises(ConfigError, match="old_logps"):
        get_algorithm("grpo")({"old_logps": "cached"}, reward_fn=lambda p, r: 0.0)


def test_trainer_sampler_dtype_follows_the_trainer_and_guards_old_logps(tok, tmp_path):
    """trainer.sampler_dtype auto = the trainer's compute dtype; a sampler in another dtype than
    the trainer cannot give old log-probs (they would be of another forward): refused."""
    from collections import Counter

    from fastalign.algorithms import get_algorithm
    from fastalign.data.synthetic import SyntheticTask
    from fastalign.errors import ConfigError
    from fastalign.trainer.loop import Trainer

    def trainer(old_logps, **cfg):
        alg = get_algorithm("grpo")({"beta": 0.0, "old_logps": old_logps}, reward_fn=lambda p, r: 0.0)
        data = alg.encode(SyntheticTask().sample(2, seed=0), tok, 64, Counter())
        return Trainer(alg, {"policy": tiny_model(tok, **TINY)}, tok, data, None,
                       dict(output_dir=str(tmp_path), max_steps=1, progress=False, plot=False, device="cpu", **cfg))

    assert trainer("sampler", precision="fp32").sampler_dtype == "fp32"
    assert trainer("sampler", precision="bf16").sampler_dtype == "bf16"
    assert trainer("sampler", precision="bf16-weights").sampler_dtype == "bf16"
    assert trainer("recompute", precision="fp32", sampler_dtype="bf16").sampler_dtype == "bf16"
    with pytest.raises(ConfigError, match="algo.old_logps: 'sampler' needs FastSampler to compute in the trainer's "
                                          "dtype, but trainer.sampler_dtype is bf16 and trainer.precision fp32"):
        trainer("sampler", precision="fp32", sampler_dtype="bf16")
    with pytest.raises(ConfigError, match="trainer.sampler_dtype is fp32 and trainer.precision bf16 computes in bf16"):
        trainer("sampler", precision="bf16", sampler_dtype="fp32")
    with pytest.raises(ConfigError, match="sampler_dtype: 'fp32' with trainer.precision bf16-weights"):
        trainer("recompute", precision="bf16-weights", sampler_dtype="fp32")
    with pytest.raises(ConfigError, match="sampler_dtype"):
        trainer("recompute", sampler_dtype="fp16")
    # generate has no sampling dtype: nothing to guard
    assert trainer("sampler", precision="fp32", sampler_dtype="bf16", sampler="transformers").sampler_dtype == "bf16"


@pytest.mark.slow
def test_smollm2_greedy_equals_generate_in_fp32_and_bf16():
    pytest.importorskip("gguf")
    from fastalign.data import collate as C
    from fastalign.models import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", tokenizer=tok).eval()
    questions = ["What is the capital of France?", "Name three primary colors.", "Write one sentence about cats."]
    prompts = [tok(C.prompt_text(tok, q), add_special_tokens=False)["input_ids"] for q in questions]
    ref = _generate(model, tok, prompts, 3, 20, eos=tok.eos_token_id)
    out = FastSampler(model, tok, max_batch=3).sample(prompts, max_new_tokens=20, do_sample=False)
    assert out.token_ids == ref
    assert "Paris" in tok.decode(out.token_ids[0])
    # LoRA on every projection, B nonzero (as after some training): FastSampler merges the adapters and
    # still gives generate's tokens on the wrapped model -- which differ from the base model's
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ref_lora = _generate(pm, tok, prompts, 3, 20, eos=tok.eos_token_id)
    assert ref_lora != ref
    assert FastSampler(pm, tok, max_batch=3).sample(prompts, max_new_tokens=20, do_sample=False).token_ids == ref_lora
    # bf16: sampling the fp32 model in bf16 (autocast) is generate under bf16 autocast; on the bf16 model
    # dtype auto is generate on that model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_autocast = _generate(model, tok, prompts, 3, 20, eos=tok.eos_token_id)
    assert FastSampler(model, tok, max_batch=3, dtype="bf16").sample(
        prompts, max_new_tokens=20, do_sample=False).token_ids == ref_autocast
    model = model.to(torch.bfloat16)
    assert FastSampler(model, tok, max_batch=3).sample(prompts, max_new_tokens=20, do_sample=False).token_ids \
        == _generate(model, tok, prompts, 3, 20, eos=tok.eos_token_id)
