"""fastalign.integrations.transformers.patch_causal_lm: same loss and gradients as the stock
Hugging Face forward, without logits; tiny randomly initialised models (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastalign.integrations.transformers import patch_causal_lm, unpatch_causal_lm  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)


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


def _loss_and_grads(model, **inputs):
    out = model(**inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, params)


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2-tied"])
def test_loss_and_grads_match_stock_forward(make):
    model = make()
    ids, mask, labels = _batch(model.config.vocab_size)
    ref, ref_grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    patch_causal_lm(model)
    out, grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)
    # per-token log-probs: log_softmax(stock logits)[next label], 0 where there is none
    lsm = ref.logits.float().log_softmax(-1)
    nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    want = torch.where(nxt != -100, lsm.gather(-1, nxt.clamp(min=0)[..., None])[..., 0], 0.0)
    torch.testing.assert_close(out.token_logps, want.detach(), **TOL)


def test_num_items_shift_labels_passthrough_and_unpatch():
    model = _llama()
    ids, mask, labels = _batch(211)
    ref_sum = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(50)).loss
    ref_logits = model(input_ids=ids, attention_mask=mask).logits
    patch_causal_lm(model)
    got = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(50)).loss
    torch.testing.assert_close(got, ref_sum, **TOL)  # sum / num_items_in_batch (gradient accumulation)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    got_shift = model(input_ids=ids, attention_mask=mask, shift_labels=shifted).loss
    torch.testing.assert_close(got_shift, model(input_ids=ids, attention_mask=mask, labels=labels).loss, **TOL)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref_logits)  # no labels: stock
    with_logits = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    assert with_logits.logits is not None
    unpatch_causal_lm(model)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_logit_scaling_and_refusals():
    model = _llama()
    ids, mask, labels = _batch(211)
    model.config.logits_scaling = 4.0  # Granite-style: logits / 4 -> temperature 4
    patch_causal_lm(model)
    got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    unpatch_causal_lm(model)
    logits = model(input_ids=ids, attention_mask=mask).logits / 4.0
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 211).float(), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(got, ref, **TOL)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="softcapping"):
        patch_causal_lm(model)
    with pytest.raises(TypeError, match="lm_head"):
        patch_causal_lm(torch.nn.Linear(2, 2))
