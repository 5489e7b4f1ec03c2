"""fastalign.sampling: FastSampler against transformers' generate, its sampling distribution, its
log-probs, its argument checks, and the trainer's use of it (trainer.sampler, algo.old_logps).

Exactness. Greedy decoding is compared token for token with `model.generate` on the same chunks
of prompts (the model's own modules compute everything but the attention, so only a near-tie of
the top two logits within rounding could differ; none is here). The sampler's log-probs are
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
    free = _generate(model, tok, prompts, 3, 24, eos=tok.eos_token_id)
    # as EOS, the token whose first occurrences spread the rows' stops most (some never stop)
    def stops_of(t):
        return [r.index(t) + 1 if t in r else 24 for r in free]
    eos = max({t for r in free for t in r}, key=lambda t: (24 in stops_of(t), len(set(stops_of(t)))))
    ref = _generate(model, tok, prompts, 3, 24, eos=eos)
    stops = [len(r) for r in ref]
    assert min(stops) < 24 and max(stops) == 24 and len(set(stops)) > 2, stops  # the case is exercised
    out = FastSampler(model, tok, max_batch=3, eos_token_id=eos).sample(prompts, max_new_tokens=24, do_sample=False)
    assert out.token_ids == ref
    assert out.truncated == sum(eos not in r for r in ref)
    assert [len(x) for x in out.logprobs] == stops == [len(x) for x in out.entropies]
    # one big batch (no chunking) gives the same tokens
    assert FastSampler(model, tok, max_batch=64, eos_token_id=eos).sample(
        prompts, max_new_tokens=24, do_sample=False).token_ids == ref
    # the transformers engine is generate itself
    assert TransformersEngine(model, tok, max_batch=3, eos_token_id=eos).sample(
        prompts, max_new_tokens=24, do_sample=False).token_ids == ref


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
    """Per-token bound [B, T-1] of one fp32 evaluation of the log-probs (module docstring)."""
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    K = max(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, input_ids.shape[1])
    gk = gamma(K)
    m64 = tiny_model(tiny_tokenizer(), **TINY).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    acts, hooks, qkv = [], [], {}
    for name, mod in m64.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def pre(mod, args, name=name):
                x = args[0]
                x.retain_grad()
                acts.append((name, x))
            hooks.append(mod.register_forward_pre_hook(pre))
            if name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
                hooks.append(mod.register_forward_hook(lambda m, a, o, name=name: qkv.__setitem__(name, o)))
    for layer in m64.model.layers:
        def post(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h.retain_grad()
            acts.append(("residual", h))
        hooks.append(layer.register_forward_hook(post))
    try:
        logits = m64(input_ids=input_ids).logits
        lab = labels[:, 1:]
        lp = (logits[:, :-1] / temperature).log_softmax(-1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    finally:
        for h in hooks:
            h.remove()
    # the attention outputs' perturbation size, per row and channel (o_proj's input)
    att = {}
    for name, x in acts:
        if name.endswith("o_proj"):
            pre_ = name[: -len("o_proj")]
            B, T = x.shape[:2]
            q, k, v = (qkv[pre_ + s].detach().view(B, T, -1, hd) for s in ("q_proj", "k_proj", "v_proj"))
            # |q.k| error <= gamma(hd) sum|q_i||k_i| <= gamma(hd) ||q|| ||k||, and the rotary embedding
            # keeps the norms; the largest key of the row bounds every score of a query
            score_err = hd ** -0.5 * gamma(hd) * q.norm(dim=-1) * k.norm(dim=-1).amax(1, keepdim=True)
            att[name] = ((3 * gk + 2 * score_err)[..., None] * v.abs().amax(1, keepdim=True)).reshape(B, T, -1)
    params = [p for p in m64.parameters()]
    bound = torch.zeros(lp.shape, dtype=torch.float64)
    for b, t in (labels[:, 1:] != -100).nonzero().tolist():
        grads = torch.autograd.grad(lp[b, t], params + [x for _, x in acts], retain_graph=True, allow_unused=True)
        total = sum((g.abs() * p.abs()).sum() * gk for g, p in zip(grads, params) if g is not None)
        for (name, x), g in zip(acts, grads[len(params):]):
            if g is None:
                continue
            size = att[name] if name in att else gk * x.detach().abs()
            total = total + (g.abs() * size).sum()
        bound[b, t] = total + logp_error(logits[b, t].detach() / temperature)[labels[b, t + 1]]
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
