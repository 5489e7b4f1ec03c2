"""fastalign.integrations.transformers.patch_causal_lm: same loss and gradients as the stock
Hugging Face forward, without logits; tiny randomly initialised models (no downloads).

Bounds. The patched and the stock forward run the same decoder on the same inputs: its output
(the last hidden states h) is the same computation, checked bit for bit. They differ only in the
LM head: the logits h W^T come from another GEMM (patched: tiles of torch.mm; stock: F.linear),
at most matmul_bound(h, W^T) apart (2 gamma(H) |h||W|^T), and the log-softmax, its sum over the N
labelled tokens and its gradient are evaluated by other kernels. So every compared quantity gets
the error of two fp32 evaluations of the same head formula, computed in fp64 from the actual
logits (logp_error, ce_grad_error below), plus the effect of the logits' difference dz (log p_y
moves by <= |dz_y| + max_j |dz_j|, p_j by a factor <= |dz_j| + max|dz|). The decoder's backward is
a linear map of the gradient it receives at h; the test checks that the patched model's decoder
gradients are, bit for bit, that map applied to the patched gradient at h (the same computation),
and that this gradient at h is within the head's bound of the stock one. The rest of the difference
between the two runs' decoder gradients is the decoder's own conditioning applied to the head's
rounding, not an error of the patch.
"""

import pytest
import torch

from tests.numerics import EXP_ULPS, assert_within, logp_error, matmul_bound, sum_bound, unit_roundoff

transformers = pytest.importorskip("transformers")

from fastalign.integrations.transformers import patch_causal_lm, unpatch_causal_lm  # noqa: E402

U32 = unit_roundoff(torch.float32)
FN = 2 * EXP_ULPS * U32  # one exp/log/log1p: EXP_ULPS ulps, and one ulp of x is at most 2 u |x|


def ce_grad_error(z: torch.Tensor, labels: torch.Tensor, c: float) -> torch.Tensor:
    """Bound [N, V] on the error of one fp32 evaluation of G = d(-c sum_t log p_t[y_t]) / dz =
    c (p - onehot(y)) (rows with label -100: exactly 0). p_j = exp(log p_j) carries the relative
    error of log p_j (logp_error) plus F (exp) and 2 u (c rounded, times c); the label's
    entry c (p_y - 1) rounds once more (u |G|, and u |G| for c (1 - p_y) formed from scratch)."""
    z = z.detach().double()
    p = z.softmax(-1)
    g = c * (p - torch.nn.functional.one_hot(labels.clamp(min=0), z.shape[-1]))
    err = c * p * (logp_error(z) + FN + 2 * U32) + 2 * U32 * g.abs()
    return torch.where((labels != -100)[:, None], err, 0.0), torch.where((labels != -100)[:, None], g, 0.0)


def _llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=157, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 17), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # prompt tokens
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0  # right padding
    labels[2, 12:] = -100
    return ids, mask, labels


def _hidden_hook(model):
    """Records the decoder's output (the last hidden states) of every forward in `store["h"]`."""
    store = {}
    handle = model.get_decoder().register_forward_hook(lambda mod, args, out: store.__setitem__("h", out[0]))
    return store, handle


def _shifted(labels):
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)


def _head_bounds(h, weight, logits, labels, c):
    """Per-token bound on |log p_patched - log p_stock| [B, T] (0 where there is no label) and the
    gradient pieces: (G, dG) = d loss / d logits (fp64) and its bound for two evaluations, with the
    loss -c sum_t log p_t. `logits` are the stock fp32 logits, `labels` the shifted ones."""
    v = logits.shape[-1]
    z, lab = logits.detach().reshape(-1, v), labels.reshape(-1)
    dz = matmul_bound(h.detach().reshape(-1, h.shape[-1]), weight.detach().T)  # the two GEMMs
    valid = lab != -100
    at = lab.clamp(min=0)[:, None]
    tok = 2 * logp_error(z).gather(1, at)[:, 0] + dz.gather(1, at)[:, 0] + dz.amax(1)
    err, g = ce_grad_error(z, lab, c)
    p = z.double().softmax(-1)
    dg = 2 * err + c * p * (dz + dz.amax(1, keepdim=True)) * valid[:, None]
    return torch.where(valid, tok, 0.0).reshape(labels.shape), g, dg


def _loss_bound(logits, labels, tok_bound, denom):
    """|loss_patched - loss_stock| for loss = -sum_t log p_t / denom: the per-token bounds, the sum
    of the N terms in two orders (sum_bound of sum |log p_t|), the division on each side."""
    lp = logits.detach().double().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    lp = torch.where(labels != -100, lp, 0.0)
    n = int((labels != -100).sum())
    loss = -lp.sum() / denom
    return (tok_bound.sum() + sum_bound(lp.abs().sum(), n)) / denom + 2 * U32 * loss.abs()


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2-tied"])
def test_loss_and_grads_match_stock_forward(make):
    model = make()
    ids, mask, labels = _batch(model.config.vocab_size)
    store, hook = _hidden_hook(model)
    params = [p for p in model.parameters() if p.requires_grad]
    weight = model.lm_head.weight
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    h = store["h"]
    *ref_grads, ref_gh, ref_glogits = torch.autograd.grad(ref.loss, params + [h, ref.logits], retain_graph=True)
    patch_causal_lm(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    hook.remove()
    assert out.logits is None
    assert torch.equal(store["h"], h)  # the same decoder computation on the same inputs
    *grads, gh = torch.autograd.grad(out.loss, params + [store["h"]])

    nxt = _shifted(labels)
    n = int((nxt != -100).sum())
    tok_bound, g, dg = _head_bounds(h, weight, ref.logits, nxt, 1.0 / n)
    assert_within(out.loss, ref.loss, _loss_bound(ref.logits, nxt, tok_bound, n), "loss")
    # per-token log-probs: log_softmax(stock logits)[next label], 0 where there is none
    lsm = ref.logits.float().log_softmax(-1)
    want = torch.where(nxt != -100, lsm.gather(-1, nxt.clamp(min=0)[..., None])[..., 0], 0.0)
    assert_within(out.token_logps, want.detach(), tok_bound, "token_logps")
    # the stock autograd's d loss / d logits is the formula G (fp32 vs fp64: one evaluation)
    assert_within(ref_glogits.reshape(g.shape), g, dg / 2, "stock d loss / d logits")

    # gradient at h: G W in two evaluations of G (dG) and two GEMMs over V
    w = weight.detach().double()
    gh_bound = (dg @ w.abs() + matmul_bound(g, w)).reshape(h.shape)
    assert_within(gh, ref_gh, gh_bound, "d loss / d hidden")
    # the decoder back-propagates the patched gradient at h exactly as the stock graph does
    decoder = torch.autograd.grad(h, params, grad_outputs=gh, allow_unused=True)
    hd = h.detach().reshape(-1, h.shape[-1]).double()
    for p, got, dec in zip(params, grads, decoder):
        if p is weight:
            # the LM head's own part G^T h (tied GPT-2: plus the embedding's part, added last,
            # which rounds once more): vs the stock G^T h in fp64
            head = got.double() - (dec.double() if dec is not None else 0.0)
            bound = dg.T @ hd.abs() + matmul_bound(g.T, hd) + U32 * got.double().abs()
            assert_within(head, ref_glogits.reshape(g.shape).double().T @ hd, bound, "lm_head.weight grad")
        else:
            assert torch.equal(got, dec), tuple(p.shape)
    assert any(p is weight for p in params)


def test_num_items_shift_labels_passthrough_and_unpatch():
    model = _llama()
    ids, mask, labels = _batch(211)
    store, hook = _hidden_hook(model)
    ref_sum = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(50)).loss
    ref_logits = model(input_ids=ids, attention_mask=mask).logits
    patch_causal_lm(model)
    got = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(50)).loss
    hook.remove()
    nxt = _shifted(labels)
    tok_bound, _, _ = _head_bounds(store["h"], model.lm_head.weight, ref_logits, nxt, 1.0)
    # sum / num_items_in_batch (gradient accumulation)
    assert_within(got, ref_sum, _loss_bound(ref_logits, nxt, tok_bound, 50), "loss / num_items_in_batch")
    got_shift = model(input_ids=ids, attention_mask=mask, shift_labels=nxt).loss
    # shift_labels = the labels shifted by the patch itself: the same op on the same inputs
    assert torch.equal(got_shift, model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref_logits)  # no labels: stock
    with_logits = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    assert with_logits.logits is not None
    unpatch_causal_lm(model)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_logit_scaling_and_refusals():
    model = _llama()
    ids, mask, labels = _batch(211)
    model.config.logits_scaling = 4.0  # Granite-style: logits / 4 -> temperature 4
    store, hook = _hidden_hook(model)
    patch_causal_lm(model)
    got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    unpatch_causal_lm(model)
    logits = model(input_ids=ids, attention_mask=mask).logits / 4.0
    hook.remove()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 211).float(), labels[:, 1:].reshape(-1))
    # z / 4 is exact in binary (both sides scale by a power of two), so the head bound applies to
    # z / 4 with the GEMM's difference scaled by 1/4 (h / 4 in the bound: |h/4||W| = |h||W| / 4)
    nxt = _shifted(labels)
    n = int((nxt != -100).sum())
    tok_bound, _, _ = _head_bounds(store["h"] / 4.0, model.lm_head.weight, logits, nxt, 1.0 / n)
    assert_within(got, ref, _loss_bound(logits, nxt, tok_bound, n), "loss at temperature 4")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="softcapping"):
        patch_causal_lm(model)
    with pytest.raises(TypeError, match="lm_head"):
        patch_causal_lm(torch.nn.Linear(2, 2))
