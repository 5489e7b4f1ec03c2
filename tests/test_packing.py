"""Padding-free packed forwards (`data.packing`, fastalign/data/packing.py): the bookkeeping, that
packed sequences never see each other, that packed and padded forwards agree (log-probs, losses,
gradients, values, scores), that models which cannot pack are refused, and that every algorithm
trains with packing on.

Bounds.
  * Exact (bit for bit): the pack/unpack bookkeeping (index arithmetic); and the isolation of
    packed sequences: changing every token of one sequence leaves every other sequence's outputs
    unchanged, because the two runs are the same computation (same shapes, same masks) in which
    the changed keys weigh exactly 0 (softmax of a masked score) and 0 times a finite value adds
    exactly nothing; each GEMM row depends only on its own input row.
  * Packed vs padded: the same math summed in other orders -- GEMMs over [T, H] instead of
    [N * L, H] (other blockings), the attention softmax and weighted sum over the T keys of the
    packed row instead of the L keys of a padded row (the extra keys weigh exactly 0 in both, but
    the vectorised sums group the real ones differently). So each is within the fp32 forward
    error of the exact result, and they differ by at most twice that. There is no closed-form
    forward-error bound through a transformer at hand, so the fp32 error is measured here: the
    same model and batch in fp64 (rounding 2^-53, ~2^29 times below fp32's) stands for the exact
    value, and the padded fp32 run's largest error against it, E, is that computation's error
    size on this CPU. Packed may differ from padded by 2 E (both within E of exact); the bound
    is 4 E (the packed run's own largest error is another draw of the same size, not E itself)
    plus one fp32 rounding of the value. A leak or a wrong position moves results by ~1e-2 here,
    ~10^4 times the bound.
"""

from collections import Counter

import pytest
import torch

from fastalign.algorithms import get_algorithm, token_logps
from fastalign.data import collate as C
from fastalign.data.packing import next_token_targets, pack_rows
from fastalign.data.synthetic import SyntheticTask
from fastalign.errors import ConfigError
from fastalign.models import ScalarHeadModel, tiny_model, tiny_tokenizer
from fastalign.trainer.loop import Trainer
from tests.numerics import assert_within, unit_roundoff

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
U32 = unit_roundoff(torch.float32)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _lm_batch(tok, n=6, seed=0):
    exs = C.encode_demonstrations(SyntheticTask().demonstrations(n, seed), tok, 64)
    return C.collate_lm(exs, tok.pad_token_id)


def _pair_batch(tok, n=4, seed=0):
    pairs, _ = SyntheticTask().preference_pairs(n, seed=seed)
    return C.collate_pairs(C.encode_preferences(pairs, tok, 64), tok.pad_token_id)


def _model(tok, attn="sdpa", seed=0):
    m = tiny_model(tok, seed=seed, **TINY)
    m.config._attn_implementation = attn
    return m


def _measured_bound(padded32, exact64):
    """4 E + one rounding, E the padded fp32 run's largest error against fp64 (module docstring)."""
    e = (padded32.detach().double() - exact64.detach().double()).abs().max()
    return 4 * e + U32 * exact64.detach().double().abs()


# ---- the bookkeeping --------------------------------------------------------------------------------


def test_pack_rows_layout_and_round_trip():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 1, 5, 0, 2])
    n, length = len(lengths), int(lengths.max())
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = torch.randint(5, 100, (n, length), generator=g) * mask
    rows = pack_rows(ids, mask)
    assert rows.input_ids.shape == (1, int(lengths.sum())) and rows.shape == (n, length)
    assert rows.input_ids[0].tolist() == [t for r, k in zip(ids.tolist(), lengths.tolist()) for t in r[:k]]
    assert rows.position_ids[0].tolist() == [p for k in lengths.tolist() for p in range(k)]
    x = torch.randn(n, length, 3, generator=g)
    back = rows.scatter(rows.gather(x))
    assert torch.equal(back, x * mask[..., None])  # real tokens exactly, 0 at the padding
    assert torch.equal(rows.scatter(rows.gather(x[..., 0]), fill=-1.0)[mask == 0], torch.full((int((mask == 0).sum()),), -1.0))
    labels = torch.tensor([[C.IGNORE, 7, 8], [C.IGNORE, 9, C.IGNORE]])
    assert next_token_targets(labels).tolist() == [[7, 8, C.IGNORE], [9, C.IGNORE, C.IGNORE]]
    w = torch.randn(int(lengths.sum()), requires_grad=True)
    rows.scatter(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_pack_rows_refuses_what_it_cannot_pack():
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="right padding"):
        pack_rows(ids, torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left padding
    with pytest.raises(ValueError, match="right padding"):
        pack_rows(ids, torch.tensor([[1, 0, 1], [1, 1, 1]]))  # a hole
    with pytest.raises(ValueError, match="4-D attention mask"):
        pack_rows(ids, torch.ones(2, 1, 3, 3, dtype=torch.bool))  # SFT's algo.packing rows
    with pytest.raises(ValueError, match="differ in shape"):
        pack_rows(ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="no tokens"):
        pack_rows(ids, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected 6 packed entries, got shape \\(5,\\)"):
        pack_rows(ids, torch.ones(2, 3)).scatter(torch.zeros(5))


# ---- isolation: exact ------------------------------------------------------------------------------


def test_packed_sequences_never_attend_across_boundaries(tok):
    model = _model(tok).eval()
    value = ScalarHeadModel(_model(tok, seed=1), seed=0).eval()
    batch = _lm_batch(tok, n=5)
    mask = batch["attention_mask"]
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    with torch.no_grad():
        base, _ = token_logps(model, batch, packed=True)
        base_v = value(batch["input_ids"], mask, packed=True)
        assert seen[-1] == (1, int(mask.sum()))  # one row of the real tokens: no padding computed
        handle.remove()
        for k in range(mask.shape[0]):
            changed = dict(batch)
            ids = batch["input_ids"].clone()
            real = mask[k].bool()
            ids[k, real] = (ids[k, real] + 11) % len(tok)  # every token of sequence k
            changed["input_ids"] = ids
            got, _ = token_logps(model, changed, packed=True)
            got_v = value(ids, mask, packed=True)
            others = torch.arange(mask.shape[0]) != k
            assert torch.equal(got[others], base[others]), k
            assert torch.equal(got_v[others], base_v[others]), k
            assert not torch.equal(got[k], base[k]) and not torch.equal(got_v[k], base_v[k])  # the check can fail


# ---- packed vs padded: within the measured fp32 error ----------------------------------------------


def _fp64_logps(model64, batch):
    logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != C.IGNORE
    lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.where(mask, lp, torch.zeros_like(lp))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sft_logps_loss_and_grads_packed_equal_padded(tok, attn):
    batch = _lm_batch(tok, n=6)
    sft = get_algorithm("sft")()
    results = {}
    for packed in (False, True):
        model = _model(tok, attn)
        sft.packing = packed
        logps, _ = token_logps(model, batch, packed=packed)
        loss, _ = sft.loss({"policy": model}, batch)
        loss.backward()
        results[packed] = logps.detach(), loss.detach(), {k: p.grad for k, p in model.named_parameters()}
    model64 = _model(tok, attn).double()
    lp64 = _fp64_logps(model64, batch)
    loss64 = -lp64.sum()
    loss64.backward()
    (lp_pad, loss_pad, g_pad), (lp_pack, loss_pack, g_pack) = results[False], results[True]
    assert lp_pack.shape == lp_pad.shape
    assert torch.equal(lp_pack == 0, lp_pad == 0)  # the same masked positions, exactly 0
    assert_within(lp_pack, lp_pad, _measured_bound(lp_pad, lp64), f"{attn}: per-token log-probs")
    assert_within(loss_pack, loss_pad, _measured_bound(loss_pad, loss64), f"{attn}: SFT loss")
    for name, p in model64.named_parameters():
        assert_within(g_pack[name], g_pad[name], _measured_bound(g_pad[name], p.grad), f"{attn}: grad {name}")


def test_dpo_loss_and_grads_packed_equal_padded(tok):
    batch = _pair_batch(tok)
    b = batch["input_ids"].shape[0] // 2
    g = torch.Generator().manual_seed(1)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = (-20 * torch.rand(b, generator=g) for _ in range(2))
    dpo = get_algorithm("dpo")({"beta": 0.5})
    results = {}
    for packed in (False, True):
        model = _model(tok)
        dpo.packing = packed
        loss, metrics = dpo.loss({"policy": model}, batch)
        loss.backward()
        results[packed] = loss.detach(), metrics, {k: p.grad for k, p in model.named_parameters()}
    model64 = _model(tok).double()
    seq = _fp64_logps(model64, batch).sum(1)
    delta = (seq[:b] - batch["ref_chosen_logps"].double()) - (seq[b:] - batch["ref_rejected_logps"].double())
    loss64 = -torch.nn.functional.logsigmoid(0.5 * delta).sum()
    loss64.backward()
    (loss_pad, m_pad, g_pad), (loss_pack, m_pack, g_pack) = results[False], results[True]
    assert_within(loss_pack, loss_pad, _measured_bound(loss_pad, loss64), "DPO loss")
    assert m_pack["rewards/accuracies"] == m_pad["rewards/accuracies"]
    for name, p in model64.named_parameters():
        assert_within(g_pack[name], g_pad[name], _measured_bound(g_pad[name], p.grad), f"grad {name}")


def test_values_and_scores_packed_equal_padded(tok):
    batch = _pair_batch(tok)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = {}
    for packed in (False, True):
        value = ScalarHeadModel(_model(tok), seed=3)
        v = value(ids, mask, packed=packed)
        s = value.score(ids, mask, packed=packed)
        s.sum().backward()
        out[packed] = v.detach(), s.detach(), {k: p.grad for k, p in value.named_parameters()}
    v64m = ScalarHeadModel(_model(tok), seed=3).double()
    v64 = v64m(ids, mask)
    s64 = v64m.score(ids, mask)
    s64.sum().backward()
    real = mask.bool()
    (v_pad, s_pad, g_pad), (v_pack, s_pack, g_pack) = out[False], out[True]
    assert torch.equal(v_pack[~real], torch.zeros(int((~real).sum())))  # nothing computed at the padding
    assert_within(v_pack[real], v_pad[real], _measured_bound(v_pad[real], v64[real]), "values")
    assert_within(s_pack, s_pad, _measured_bound(s_pad, s64), "scores")
    for name, p in v64m.named_parameters():
        assert_within(g_pack[name], g_pad[name], _measured_bound(g_pad[name], p.grad), f"grad {name}")


# ---- refusals ------------------------------------------------------------------------------------


class _NoPositions(torch.nn.Module):
    """A causal LM whose forward takes no position_ids: it cannot be packed."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.config = lm, lm.config

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask)


class _IgnoresPackedPositions(_NoPositions):
    """Takes position_ids but attends over the whole row (an attention that does not read
    sequence boundaries off the positions)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=position_ids)


@pytest.mark.parametrize("wrapper, message", [(_NoPositions, "cannot run packed sequences"),
                                              (_IgnoresPackedPositions, "attend to each other")])
def test_models_that_cannot_pack_are_refused(tok, wrapper, message):
    model = wrapper(_model(tok))
    batch = _lm_batch(tok, n=3)
    with pytest.raises(ConfigError, match=f"data.packing: the model .*{message}"):
        token_logps(model, batch, packed=True)
    token_logps(model, batch)  # padded forwards still work


def test_packing_options_are_checked(tmp_path, monkeypatch):
    from fastalign.data import packing
    from fastalign.trainer.run import load_config, run_training

    common = ["data.train_size=8", "data.eval_size=0", "trainer.max_steps=1", f"trainer.output_dir={tmp_path}",
              "trainer.batch_size=4", "trainer.progress=false", "trainer.plot=false", "model.tiny.hidden_size=32",
              "model.tiny.num_layers=1", "model.tiny.num_heads=2", "model.tiny.intermediate_size=64"]
    calls = []
    real_pack_rows = packing.pack_rows
    monkeypatch.setattr(packing, "pack_rows", lambda *a: calls.append(1) or real_pack_rows(*a))
    run_training("sft", load_config(None, common))
    assert not calls  # off by default
    run_training("sft", load_config(None, common + ["data.packing=true"]))
    assert calls  # the run's config reached the algorithm's forwards
    with pytest.raises(ConfigError, match="data.packing and algo.packing"):
        run_training("sft", load_config(None, common + ["data.packing=true", "algo.packing=true"]))
    with pytest.raises(ConfigError, match="data.packing must be true or false"):
        run_training("sft", load_config(None, common + ["data.packing=3"]))


# ---- every algorithm trains with packing on ---------------------------------------------------------


def _train(alg, models, tok, data, out, steps=3):
    alg.packing = True
    cfg = dict(output_dir=str(out), max_steps=steps, batch_size=4, lr=3e-3, warmup_steps=0, progress=False,
               plot=False, save_final=False)
    before = {r: [p.detach().clone() for p in m.parameters()] for r, m in models.items()}
    tr = Trainer(alg, models, tok, data, None, cfg)
    metrics = tr.fit()["train"]
    assert torch.isfinite(torch.tensor(metrics["loss"])), metrics
    for role in alg.trainable:
        if role in models:
            assert any(not torch.equal(a, b.detach()) for a, b in zip(before[role], models[role].parameters())), role
    return metrics


@pytest.mark.parametrize("name", ["sft", "reward", "dpo"])
def test_offline_algorithms_train_with_packing(tok, tmp_path, name):
    alg = get_algorithm(name)()
    if name == "sft":
        records = SyntheticTask().demonstrations(16, 0)
        models = {"policy": _model(tok)}
    else:
        records, _ = SyntheticTask().preference_pairs(16, seed=0)
        models = ({"reward": ScalarHeadModel(_model(tok), seed=0)} if name == "reward"
                  else {"policy": _model(tok), "reference": _model(tok)})
    _train(alg, models, tok, alg.encode(records, tok, 64, Counter()), tmp_path)


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_online_algorithms_train_with_packing(tok, tmp_path, name):
    opts = {"max_new_tokens": 6, "mini_batches": 2, "ppo_epochs": 1}
    if name == "grpo":
        opts["group_size"] = 2
    alg = get_algorithm(name)(opts)  # scored by a reward model: its forward runs packed too
    models = {"policy": _model(tok), "reference": _model(tok), "reward": ScalarHeadModel(_model(tok, seed=2), seed=1)}
    if name == "ppo":
        models["value"] = ScalarHeadModel(_model(tok, seed=2), seed=1)
    prompts = alg.encode(SyntheticTask().sample(16, seed=0), tok, 64, Counter())
    m = _train(alg, models, tok, prompts, tmp_path, steps=2)
    assert m["optimizer_steps"] == 2
