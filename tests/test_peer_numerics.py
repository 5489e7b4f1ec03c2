"""Equal numerics: fastalign.integrations.{verl,openrlhf,trl} against each peer's formulas.

The peers are not imported. Each `_peer_*` function below re-derives, in plain eager torch, what
the cited peer source computes (read via the search tool; written anew here, not copied), so these
tests pin down the conventions the adapters claim: epsilons, clamps, masking, variance,
aggregation. Sources (default branches as stored): volcengine/verl verl/trainer/ppo/core_algos.py
and verl/utils/torch_functional.py (Jan 2026); OpenRLHF/OpenRLHF
openrlhf/trainer/ppo_utils/experience_maker.py, openrlhf/models/{loss,utils}.py (Aug 2026);
huggingface/trl trl/trainer/{utils,grpo_trainer,dpo_trainer}.py and
trl/experimental/ppo/ppo_trainer.py (Jul 2026).
Every adapter runs on each usable CPU backend (torch reference and the C++ kernels).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastalign
from fastalign.integrations import openrlhf, trl, verl

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["torch", "cpp"])
def backend(request, monkeypatch):
    if not fastalign.backends()[request.param]["usable"]:
        pytest.skip(f"{request.param}: {fastalign.backends()[request.param]['reason']}")
    monkeypatch.setenv("FASTALIGN_BACKEND", request.param)
    return request.param


def _mask(B, T, seed, holes=True):
    """Responses of different lengths (one empty row), with observation-token holes inside."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0
    m = torch.arange(T)[None, :] < lengths[:, None]
    if holes:
        m &= torch.rand(B, T, generator=g) > 0.25
    m[0, :3] = True  # at least a few valid entries overall
    return m


# ---- shared peer math, re-derived ---------------------------------------------------------------


def _masked_mean(x, m, dim=None, eps=0.0):
    m = m.float()
    if dim is None:
        return (torch.where(m > 0, x, 0.0) * m).sum() / (m.sum() + eps)
    return (torch.where(m > 0, x, 0.0) * m).sum(dim) / (m.sum(dim) + eps)


def _peer_whiten(x, m, shift_mean=True, mean_eps=0.0):
    """TRL / verl masked_whiten: masked mean, unbiased masked variance, rsqrt(var + 1e-8)."""
    mu = _masked_mean(x, m, eps=mean_eps)
    n = m.float().sum()
    var = _masked_mean((x - mu) ** 2, m, eps=mean_eps) * n / (n - 1)
    out = (x - mu) * torch.rsqrt(var + 1e-8)
    return out + mu if not shift_mean else out


def _peer_plain_gae(r, v, gamma, lam):
    """The unmasked GAE loop (TRL; OpenRLHF after masking its inputs)."""
    T = r.shape[1]
    last, out = torch.zeros(r.shape[0]), []
    for t in reversed(range(T)):
        nv = v[:, t + 1] if t + 1 < T else torch.zeros(r.shape[0])
        last = r[:, t] + gamma * nv - v[:, t] + gamma * lam * last
        out.append(last)
    adv = torch.stack(out[::-1], 1)
    return adv, adv + v


# ---- verl ---------------------------------------------------------------------------------------


def _peer_verl_gae(r, v, m, gamma, lam):
    """core_algos.compute_gae_advantage_return: masked steps carry next value and advantage."""
    m = m.float()
    nv, last, out = torch.zeros(r.shape[0]), torch.zeros(r.shape[0]), []
    for t in reversed(range(r.shape[1])):
        cand = r[:, t] + gamma * nv - v[:, t] + gamma * lam * last
        nv = m[:, t] * v[:, t] + (1 - m[:, t]) * nv
        last = m[:, t] * cand + (1 - m[:, t]) * last
        out.append(last)
    adv = torch.stack(out[::-1], 1)
    return _peer_whiten(adv, m, mean_eps=1e-8), adv + v


def _peer_verl_agg(lm, m, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """core_algos.agg_loss (current): global counts times dp_size; empty rows excluded."""
    m = m.float()
    n_b = m.sum(-1)
    if mode == "token-mean":
        count = m.sum() if batch_num_tokens is None else batch_num_tokens
        return (torch.where(m > 0, lm, 0.0) * m).sum() / count * dp_size
    seq = (torch.where(m > 0, lm, 0.0) * m).sum(-1)
    if mode == "seq-mean-token-sum-norm":
        return seq.sum() / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    if mode == "seq-mean-token-mean":
        seq = seq / (n_b + 1e-8)
    nonempty = (n_b > 0).float()
    count = nonempty.sum() if global_batch_size is None else global_batch_size
    return (seq * nonempty).sum() / count * dp_size


def _peer_verl_policy(old, logp, adv, m, low, high, c, mode, **agg):
    """core_algos.compute_policy_loss (dual clip always on for A < 0)."""
    d = torch.clamp(logp - old, -20.0, 20.0)
    ratio = d.exp()
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
    clipped = torch.maximum(l1, l2)
    l3 = -adv * c
    per_tok = torch.where(adv < 0, torch.minimum(l3, clipped), clipped)
    return (_peer_verl_agg(per_tok, m, mode, **agg), _masked_mean((l2 > l1).float(), m, eps=1e-8),
            _masked_mean(-d, m, eps=1e-8), _masked_mean(((clipped > l3) & (adv < 0)).float(), m, eps=1e-8))


def _peer_verl_kl(lp, ref, kind):
    base = kind.rstrip("+")
    if base in ("kl", "k1"):
        fwd = lp - ref
    elif base == "abs":
        fwd = (lp - ref).abs()
    elif base in ("mse", "k2"):
        fwd = 0.5 * (lp - ref) ** 2
    else:
        x = torch.clamp(ref - lp, -20, 20)
        fwd = torch.clamp(x.exp() - x - 1, -10, 10)
    if kind.endswith("+") and base not in ("mse", "k2"):
        k2 = 0.5 * (lp - ref) ** 2
        return k2 - k2.detach() + fwd.detach()
    return fwd


def test_verl_gae_and_whitening(backend):
    torch.manual_seed(0)
    B, T = 5, 37
    m = _mask(B, T, 1)
    m[1, 4] = True  # keep all rows non-degenerate for the whitening
    r, v = torch.randn(B, T), torch.randn(B, T)
    adv, ret = verl.compute_gae_advantage_return(r, v, m, gamma=0.99, lam=0.95)
    want_adv, want_ret = _peer_verl_gae(r, v, m, 0.99, 0.95)
    # equal wherever verl's consumers read them (response_mask); see the module docstring
    torch.testing.assert_close(adv[m], want_adv[m], **TOL)
    torch.testing.assert_close(ret[m], want_ret[m], **TOL)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("agg", [{}, dict(dp_size=4, batch_num_tokens=173, global_batch_size=19, loss_scale_factor=64)])
def test_verl_policy_loss_dual_clip(backend, mode, agg):
    torch.manual_seed(1)
    B, T = 6, 29
    m = _mask(B, T, 2)
    old = torch.randn(B, T) * 0.3 - 1
    logp = (old + torch.randn(B, T) * 0.4).requires_grad_(True)
    adv = torch.randn(B, T) * 2
    low, high, c = 0.2, 0.28, 3.0
    got = verl.compute_policy_loss(old, logp, adv, m, cliprange=0.2, cliprange_low=low, cliprange_high=high,
                                   clip_ratio_c=c, loss_agg_mode=mode, **agg)
    want = _peer_verl_policy(old, logp, adv, m, low, high, c, mode, **agg)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), **TOL)
    (g_got,) = torch.autograd.grad(got[0], logp)
    (g_want,) = torch.autograd.grad(want[0], logp)
    torch.testing.assert_close(g_got, g_want, **TOL)


def test_verl_policy_loss_vanilla_config(backend):
    torch.manual_seed(2)
    m = _mask(4, 16, 3)
    old, logp, adv = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 16)
    config = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.3, "clip_ratio_c": 2.5,
              "global_batch_info": {"dp_size": 2, "batch_num_tokens": 50}}
    loss, metrics = verl.compute_policy_loss_vanilla(old, logp, adv, m, "token-mean", config)
    want = _peer_verl_policy(old, logp, adv, m, 0.2, 0.3, 2.5, "token-mean", dp_size=2, batch_num_tokens=50)
    torch.testing.assert_close(loss, want[0], **TOL)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(want[1].item(), abs=1e-6)
    assert metrics["actor/ppo_kl"] == pytest.approx(want[2].item(), abs=1e-5)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(want[3].item(), abs=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl_agg_loss_modes(mode):
    torch.manual_seed(3)
    m = _mask(7, 20, 4)
    lm = torch.randn(7, 20)
    lm[~m] = float("nan")  # verl's masked_sum ignores NaN outside the mask; so must we
    for kw in ({}, dict(dp_size=8, batch_num_tokens=300, global_batch_size=40, loss_scale_factor=128)):
        torch.testing.assert_close(verl.agg_loss(lm, m, mode, **kw), _peer_verl_agg(lm, m, mode, **kw), **TOL)


def test_verl_value_loss(backend):
    torch.manual_seed(4)
    m = _mask(5, 24, 5)
    vpred = torch.randn(5, 24, requires_grad=True)
    values, returns = torch.randn(5, 24), torch.randn(5, 24)
    loss, clipfrac = verl.compute_value_loss(vpred, returns, values, m, cliprange_value=0.3)
    vclip = torch.maximum(torch.minimum(vpred, values + 0.3), values - 0.3)
    l1, l2 = (vpred - returns) ** 2, (vclip - returns) ** 2
    want = 0.5 * _peer_verl_agg(torch.maximum(l1, l2), m, "token-mean")
    torch.testing.assert_close(loss, want, **TOL)
    torch.testing.assert_close(clipfrac, _masked_mean((l2 > l1).float(), m, eps=1e-8), **TOL)
    torch.testing.assert_close(torch.autograd.grad(loss, vpred)[0], torch.autograd.grad(want, vpred)[0], **TOL)


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+"])
def test_verl_kl_penalty(kind):
    torch.manual_seed(5)
    lp = (torch.randn(4, 33) * 3).requires_grad_(True)
    ref = torch.randn(4, 33) * 3
    ref[0, 0], lp.data[0, 0] = 30.0, -0.5  # large log-ratio: the clamps act
    got, want = verl.kl_penalty(lp, ref, kind), _peer_verl_kl(lp, ref, kind)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), lp)[0], torch.autograd.grad(want.sum(), lp)[0], **TOL)


def test_verl_whiten_logprobs_entropy(backend):
    torch.manual_seed(6)
    x, m = torch.randn(6, 10), _mask(6, 10, 6)
    for shift in (True, False):
        torch.testing.assert_close(verl.masked_whiten(x, m, shift), _peer_whiten(x, m, shift, mean_eps=1e-8), **TOL)
    logits, labels = torch.randn(3, 7, 50), torch.randint(0, 50, (3, 7))
    lsm = logits.log_softmax(-1)
    want_lp = lsm.gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(verl.logprobs_from_logits(logits, labels), want_lp, **TOL)
    p = logits.softmax(-1)
    want_ent = torch.logsumexp(logits, -1) - (p * logits).sum(-1)
    torch.testing.assert_close(verl.entropy_from_logits(logits), want_ent, **TOL)


def _peer_verl_grpo(token_rewards, m, index, eps, norm):
    """compute_grpo_outcome_advantage: per-id mean and unbiased std; a lone sample: mean 0, std 1."""
    scores = token_rewards.sum(-1)
    out = scores.clone()
    for i in range(len(scores)):
        members = torch.stack([scores[j] for j in range(len(scores)) if index[j] == index[i]])
        mean, std = (members.mean(), members.std()) if len(members) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        out[i] = (scores[i] - mean) / (std + eps) if norm else scores[i] - mean
    return out[:, None] * m


@pytest.mark.parametrize("layout", ["contiguous", "shuffled", "uneven"])
@pytest.mark.parametrize("norm", [True, False])
def test_verl_grpo_advantage(layout, norm):
    torch.manual_seed(7)
    index = np.repeat(np.array(["a", "b", "c", "d"]), 4)
    if layout == "shuffled":
        index = np.random.default_rng(0).permutation(index)
    elif layout == "uneven":
        index = np.array(["a", "a", "b", "c", "c", "c", "d", "a", "e", "e", "c", "b", "f", "f", "f", "f"])
    rew = torch.zeros(16, 9)
    rew[torch.arange(16), torch.randint(0, 9, (16,))] = torch.randint(0, 3, (16,)).float()  # outcome reward
    rew[3, 2] += 0.5
    m = _mask(16, 9, 8, holes=False)
    adv, ret = verl.compute_grpo_outcome_advantage(rew, m, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(adv, _peer_verl_grpo(rew, m, index, 1e-6, norm), **TOL)
    assert adv is ret or torch.equal(adv, ret)


# ---- TRL ----------------------------------------------------------------------------------------


def test_trl_masked_whiten(backend):
    torch.manual_seed(8)
    x, m = torch.randn(5, 21) * 4 + 1, _mask(5, 21, 9)
    for shift in (True, False):
        torch.testing.assert_close(trl.masked_whiten(x, m, shift), _peer_whiten(x, m, shift), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_selective_log_softmax(backend, dtype):
    torch.manual_seed(9)
    logits = (torch.randn(3, 6, 101) * 2).to(dtype).requires_grad_(True)
    idx = torch.randint(0, 101, (3, 6))
    # TRL: gather(logits) - logsumexp for fp32; log_softmax per row for bf16 (computed in bf16 there)
    want = logits.float().log_softmax(-1).gather(-1, idx[..., None])[..., 0]
    got = trl.selective_log_softmax(logits, idx)
    tol = TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    g1 = torch.autograd.grad(got.sum(), logits)[0].float()
    g2 = torch.autograd.grad(want.sum(), logits)[0].float()
    torch.testing.assert_close(g1, g2, **tol)
    idx_k = torch.randint(0, 101, (3, 6, 4))  # top-K style index
    want_k = logits.float().log_softmax(-1).gather(-1, idx_k)
    torch.testing.assert_close(trl.selective_log_softmax(logits, idx_k), want_k, **tol)


def test_trl_entropy(backend):
    logits = torch.randn(4, 5, 64)
    p = logits.softmax(-1)
    torch.testing.assert_close(trl.entropy_from_logits(logits), -(p * logits.log_softmax(-1)).sum(-1), **TOL)


def test_trl_ppo_gae(backend):
    """PPO trainer: values zero-filled past the end, unmasked loop, whiten over the response."""
    torch.manual_seed(10)
    B, T = 4, 23
    m = _mask(B, T, 11, holes=False)
    m[1, :2] = True
    r, v = torch.randn(B, T) * (m.float()), torch.where(m, torch.randn(B, T), 0.0)
    adv, ret = trl.compute_gae(r, v, m, gamma=1.0, lam=0.95)
    want_adv, want_ret = _peer_plain_gae(r, v, 1.0, 0.95)
    torch.testing.assert_close(ret, want_ret, **TOL)
    torch.testing.assert_close(adv, torch.where(m, _peer_whiten(want_adv, m), 0.0), **TOL)


def _peer_trl_grpo(rewards, G, scale):
    grouped = rewards.view(-1, G)
    mean = grouped.mean(1).repeat_interleave(G)
    if scale == "none":
        return rewards - mean
    if scale == "group":
        std = grouped.std(1).repeat_interleave(G)  # nanstd: Bessel-corrected
    else:
        std = rewards.std().expand_as(rewards)
    return (rewards - mean) / (std + 1e-4)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_trl_grpo_advantages(scale):
    torch.manual_seed(12)
    rewards = torch.randint(0, 2, (24,)).float()
    rewards[:6] = 1.0  # one group with zero std: eps decides the value
    torch.testing.assert_close(trl.grpo_advantages(rewards, 6, scale), _peer_trl_grpo(rewards, 6, scale), **TOL)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_trl_dpo_losses(backend, loss_type):
    torch.manual_seed(13)
    c, r = (torch.randn(8) * 5 - 40).requires_grad_(True), (torch.randn(8) * 5 - 40).requires_grad_(True)
    rc, rr = torch.randn(8) * 5 - 40, torch.randn(8) * 5 - 40
    nc, nr = torch.randint(1, 30, (8,)), torch.randint(1, 30, (8,))
    beta, ls = 0.1, 0.1
    losses, cw, rw = trl.dpo_losses(c, r, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls,
                                    chosen_lengths=nc, rejected_lengths=nr)
    d = (c - rc) - (r - rr)
    if loss_type == "sigmoid":  # current TRL: label smoothing not applied to sigmoid
        want = -F.logsigmoid(beta * d)
    elif loss_type == "hinge":
        want = torch.relu(1 - beta * d)
    elif loss_type == "ipo":  # log-ratios averaged over completion tokens
        want = (((c - rc) / nc) - ((r - rr) / nr) - 1 / (2 * beta)) ** 2
    else:
        want = (-(1 - ls) * F.logsigmoid(beta * d) + ls * F.logsigmoid(-beta * d)) / (1 - 2 * ls)
    torch.testing.assert_close(losses, want, **TOL)
    torch.testing.assert_close(cw, beta * (c - rc).detach(), **TOL)
    torch.testing.assert_close(rw, beta * (r - rr).detach(), **TOL)
    g = torch.autograd.grad(losses.sum(), (c, r))
    gw = torch.autograd.grad(want.sum(), (c, r))
    for a, b in zip(g, gw):
        torch.testing.assert_close(a, b, **TOL)


# ---- OpenRLHF -----------------------------------------------------------------------------------


def test_openrlhf_gae(backend):
    """experience_maker.get_advantages_and_returns: mask values and rewards, then the plain loop."""
    torch.manual_seed(14)
    B, T = 5, 31
    m = _mask(B, T, 15)  # holes too: OpenRLHF does not skip them, it zeroes them
    r, v = torch.randn(B, T), torch.randn(B, T)
    adv, ret = openrlhf.get_advantages_and_returns(v, r, m.float(), 0.99, 0.9)
    want_adv, want_ret = _peer_plain_gae(r * m, v * m, 0.99, 0.9)
    torch.testing.assert_close(adv, want_adv, **TOL)
    torch.testing.assert_close(ret, want_ret, **TOL)


def test_openrlhf_normalize_advantages():
    """Global over all experiences, biased variance, rsqrt(max(var, 1e-8))."""
    torch.manual_seed(16)
    advs = [torch.randn(3, 11) * 2 + 1, torch.randn(2, 7)]
    masks = [_mask(3, 11, 17).float(), _mask(2, 7, 18, holes=False).float()]
    got = openrlhf.normalize_advantages(advs, masks)
    a, mm = torch.cat([x.flatten() for x in advs]), torch.cat([x.flatten() for x in masks])
    mean = (a * mm).sum() / mm.sum()
    var = ((a - mean) ** 2 * mm).sum() / mm.sum()
    for g, x in zip(got, advs):
        torch.testing.assert_close(g, (x - mean) * var.clamp(min=1e-8).rsqrt(), **TOL)
    const = [torch.full((2, 4), 3.0)]  # zero variance: the 1e-8 floor, not +eps
    torch.testing.assert_close(openrlhf.normalize_advantages(const, [torch.ones(2, 4)])[0], torch.zeros(2, 4))
    no_std = openrlhf.normalize_advantages(advs[0], masks[0], std_norm=False)
    torch.testing.assert_close(no_std, advs[0] - (advs[0] * masks[0]).sum() / masks[0].sum(), **TOL)


@pytest.mark.parametrize("estimator", ["group_norm", "dr_grpo", "reinforce_baseline", "rloo"])
def test_openrlhf_group_rewards(estimator):
    torch.manual_seed(19)
    n = 4
    rewards = torch.randn(20)
    rewards[4:8] = 0.5  # constant group
    g = rewards.reshape(-1, n)
    if estimator == "group_norm":
        want = (g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + 1e-9)
    elif estimator == "rloo":
        want = g - (g.sum(-1, keepdim=True) - g) / (n - 1)
    else:
        want = g - g.mean(-1, keepdim=True)
    torch.testing.assert_close(openrlhf.shape_group_rewards(rewards, n, estimator), want.reshape(-1), **TOL)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_openrlhf_approx_kl(est):
    torch.manual_seed(20)
    lp, base = torch.randn(3, 40) * 6, torch.randn(3, 40) * 6
    lr = lp - base
    want = {"k1": lr, "k2": lr ** 2 / 2, "k3": (-lr).exp() - 1 + lr}[est].clamp(-10, 10)
    torch.testing.assert_close(openrlhf.compute_approx_kl(lp, base, est), want, **TOL)


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_openrlhf_policy_and_value_loss(backend, token_level, dual_clip):
    torch.manual_seed(21)
    B, T = 6, 18
    m = _mask(B, T, 22)
    mf = m.float()
    old = torch.randn(B, T) * 0.3
    lp = (old + torch.randn(B, T) * 0.5).requires_grad_(True)
    adv = torch.randn(B, T)
    loss, clip_ratio, ppo_kl = openrlhf.policy_loss(lp, old, adv, mf, 0.2, 0.27, dual_clip, token_level)
    ratio = (lp - old).clamp(-20, 20).exp()
    s1, s2 = ratio * adv, ratio.clamp(1 - 0.2, 1 + 0.27) * adv
    if dual_clip is None:
        tok = -torch.min(s1, s2)
    else:
        c1 = torch.min(s1, s2)
        tok = -torch.where(adv < 0, torch.max(c1, dual_clip * adv), c1)

    def aggregate(x):
        if token_level:
            return (x * mf).sum() / mf.sum()
        n = mf.sum(-1)
        seq, keep = (x * mf).sum(-1) / (n + 1e-8), (n > 0).float()
        return (seq * keep).sum() / keep.sum()

    want = aggregate(tok)
    torch.testing.assert_close(loss, want, **TOL)
    torch.testing.assert_close(clip_ratio, (torch.lt(s2, s1).float() * mf).sum() / mf.sum(), **TOL)
    torch.testing.assert_close(ppo_kl, (-(lp - old).detach() * mf).sum() / mf.sum(), **TOL)
    torch.testing.assert_close(torch.autograd.grad(loss, lp)[0], torch.autograd.grad(want, lp)[0], **TOL)

    v = torch.randn(B, T, requires_grad=True)
    vo, ret = torch.randn(B, T), torch.randn(B, T)
    vclip = vo + (v - vo).clamp(-0.2, 0.2)
    want_v = 0.5 * aggregate(torch.max((vclip - ret) ** 2, (v - ret) ** 2))
    got_v = openrlhf.value_loss(v, vo, ret, mf, clip_eps=0.2, token_level_loss=token_level)
    torch.testing.assert_close(got_v, want_v, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got_v, v)[0], torch.autograd.grad(want_v, v)[0], **TOL)


def test_openrlhf_global_counts(backend):
    """dp_size / batch_num_tokens / global_batch_size: sum / global count * dp_size."""
    torch.manual_seed(23)
    m = _mask(4, 12, 24).float()
    old, lp, adv = torch.randn(4, 12), torch.randn(4, 12), torch.randn(4, 12)
    tok = -torch.min((lp - old).exp() * adv, (lp - old).exp().clamp(0.8, 1.2) * adv)
    loss, _, _ = openrlhf.policy_loss(lp, old, adv, m, dp_size=4, batch_num_tokens=100)
    torch.testing.assert_close(loss, (tok * m).sum() / 100 * 4, **TOL)
    loss, _, _ = openrlhf.policy_loss(lp, old, adv, m, token_level_loss=False, dp_size=2, global_batch_size=10)
    n = m.sum(-1)
    torch.testing.assert_close(loss, ((tok * m).sum(-1) / (n + 1e-8) * (n > 0)).sum() / 10 * 2, **TOL)


@pytest.mark.parametrize("ipo", [False, True])
def test_openrlhf_dpo(backend, ipo):
    torch.manual_seed(25)
    c, r = (torch.randn(10) * 4 - 30).requires_grad_(True), (torch.randn(10) * 4 - 30).requires_grad_(True)
    rc, rr = torch.randn(10) * 4 - 30, torch.randn(10) * 4 - 30
    beta, ls = 0.2, 0.15
    loss, cw, rw = openrlhf.dpo_loss(c, r, rc, rr, beta, label_smoothing=ls, ipo=ipo)
    x = (c - r) - (rc - rr)  # summed log-probs under IPO too
    if ipo:
        want = ((x - 1 / (2 * beta)) ** 2).mean()
    else:  # conservative DPO
        want = (-F.logsigmoid(beta * x) * (1 - ls) - F.logsigmoid(-beta * x) * ls).mean()
    torch.testing.assert_close(loss, want, **TOL)
    torch.testing.assert_close(cw, beta * (c - rc).detach(), **TOL)
    torch.testing.assert_close(rw, beta * (r - rr).detach(), **TOL)
    for a, b in zip(torch.autograd.grad(loss, (c, r)), torch.autograd.grad(want, (c, r))):
        torch.testing.assert_close(a, b, **TOL)


# ---- group_advantages (the shared op) -----------------------------------------------------------


def test_group_advantages_contract():
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    a = fastalign.group_advantages(s, 3, eps=1e-3)
    torch.testing.assert_close(a[:3], torch.tensor([-1.0, 0.0, 1.0]) / 1.001)  # eps outside the sqrt
    assert torch.equal(a[3:], torch.zeros(3))  # equal scores: 0 / (0 + eps), never NaN
    torch.testing.assert_close(fastalign.group_advantages(s, 3, scale="batch", eps=1e-3)[:3],
                               torch.tensor([-1.0, 0.0, 1.0]) / (s.std() + 1e-3))
    tok = torch.zeros(6, 4)
    tok[:, -1] = s
    torch.testing.assert_close(fastalign.group_advantages(tok, 3), fastalign.group_advantages(s, 3))
    assert fastalign.group_advantages(torch.zeros(0), 4).shape == (0,)
    with pytest.raises(ValueError, match="multiple of group_size"):
        fastalign.group_advantages(s, 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        fastalign.group_advantages(s, 1)
    with pytest.raises(ValueError, match="scale must be one of"):
        fastalign.group_advantages(s, 3, scale="rows")
    with pytest.raises(ValueError, match="eps"):
        fastalign.group_advantages(s, 3, eps=float("nan"))
    with pytest.raises(ValueError, match="eps"):
        fastalign.group_advantages(s, 3, eps=0.0)
    with pytest.raises(TypeError, match="float tensor"):
        fastalign.group_advantages(torch.arange(6), 3)
    with pytest.raises(ValueError, match="group_size must be an integer"):
        fastalign.group_advantages(s, True)
    torch.testing.assert_close(fastalign.group_advantages(s, 1, scale="none"), torch.zeros(6))
