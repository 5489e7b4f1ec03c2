"""Eager references of every DPO loss type (fastalign.dpo_loss / dpo_loss_from_tokens with a list
of loss types): plain torch autograd, fp32, one formula per type, the paper named per type.

Notation (per pair i): c, r, ref_c, ref_r are the sequence log-probs; the log-ratios are
cr = c - ref_c, rr = r - ref_r; a = beta cr and b = beta rr are the implicit rewards. The
f-divergence (f-DPO, Wang et al. 2023, arXiv:2309.16240) replaces each log-ratio t by the score
F(t) = f'(exp t):
    reverse_kl  F(t) = t                          (standard DPO)
    forward_kl  F(t) = 1 - exp(-t)
    js          F(t) = log 2 + logsig(t)
    alpha       F(t) = (exp((alpha-1) t) - 1) / (alpha-1)     (alpha == 1 within 1e-6: t)
sc = F(cr), sr = F(rr), d = sc - sr, x = beta d; n_c, n_r are the completions' token counts
(>= 1), eps the label smoothing, tau DiscoPOP's temperature. The exponents of forward_kl and
alpha are clamped at EXP_CLAMP = 80 (TRL clamps alpha's so; fastalign clamps forward_kl's too, so
that |t| up to 1e4 gives finite scores -- TRL's forward_kl overflows to inf below t = -88).

Per-pair types (the fused kernels' ids, FUSED_TYPES order):
    sigmoid      -(1-eps) logsig(x) - eps logsig(-x)           DPO, Rafailov et al. 2023; cDPO for eps > 0
    ipo          (d - 1/(2 beta))^2                              IPO, Azar et al. 2023 (log-probs as given)
    hinge        relu(1 - x)                                     SLiC, Zhao et al. 2023
    robust       (-(1-eps) logsig(x) + eps logsig(-x))/(1-2eps)  rDPO, Chowdhury et al. 2024
    exo_pair     sig(x)(logsig(x) - log(1-eps)) + sig(-x)(logsig(-x) - log eps)   EXO, Ji et al. 2024 (eps > 0)
    nca_pair     -logsig(a) - logsig(-a)/2 - logsig(-b)/2        NCA, Chen et al. 2024
    bco_pair     -logsig(a) - logsig(-b)                         BCO (pair form, as TRL), Jung et al. 2024
    sppo_hard    (cr - 1/(2 beta))^2 + (rr + 1/(2 beta))^2       SPPO hard labels, Wu et al. 2024
    apo_zero     1 - sig(a) + sig(b)                             APO-zero, D'Oosterlinck et al. 2024 eq. 7
    apo_down     sig(a) + 1 - sig(a - b)                         APO-down, eq. 8
    discopop     -logsig(x) sig(-x/tau) + exp(-x) sig(x/tau)     DiscoPOP, Chris Lu et al. 2024 eq. 5
    sigmoid_norm sigmoid of x_n = beta (sc/n_c - sr/n_r)         (TRL's "sigmoid_norm"; eps as sigmoid)
    ipo_norm     (sc/n_c - sr/n_r - 1/(2 beta))^2                (TRL's "ipo": IPO of per-token log-ratios)
The types of cr, rr directly (nca, bco, sppo, apo_*) ignore the f-divergence (TRL rejects the
combination; so does fastalign). exp(-x) sig(x/tau) is evaluated as exp(-x + logsig(x/tau)): the
product, not its inf * 0 factors, so |x| = 1e4 stays finite for tau <= 1.

Batch types (torch composites on the sequence log-probs, also on the fused backends):
    aot          cDPO of the sorted (c - r) minus the sorted (ref_c - ref_r)      AOT, Melnyk et al. 2024
    aot_unpaired cDPO of the sorted cr minus the sorted rr
    sft          -(sum_i c_i) / (sum_i n_c,i), the token-mean NLL of the chosen completions over the
                 batch, the same value for every pair (TRL's "sft"; RPO, Pang et al. 2024, is
                 ["sigmoid", "sft"] with weights [1, alpha])
Their per-pair entries are only meaningful through their mean (aot's are in sorted order).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EXP_CLAMP = 80.0
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the fused kernels' type ids are the positions in this tuple (0..3 are the original four)
FUSED_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
               "apo_down", "discopop", "sigmoid_norm", "ipo_norm")
BATCH_TYPES = ("aot", "aot_unpaired", "sft")
# the types built on the score difference d (TRL's list of f-divergence-compatible types)
F_DIVERGENCE_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "ipo_norm", "exo_pair", "robust", "discopop", "sft")
LENGTH_TYPES = ("sigmoid_norm", "ipo_norm", "sft")  # need the token counts


def f_divergence_scores(t, kind="reverse_kl", alpha=0.5):
    """F(t) of the module docstring, fp32."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return t
    if kind == "forward_kl":
        return 1.0 - torch.exp(torch.clamp(-t, max=EXP_CLAMP))
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(t)
    if kind == "alpha_divergence":
        am1 = alpha - 1.0
        return (torch.exp(torch.clamp(am1 * t, max=EXP_CLAMP)) - 1.0) / am1
    raise ValueError(f"unknown f_divergence_type {kind!r}")


def _f32(t):
    """fp32 math; fp64 stays fp64 (the tests' exact evaluations run these formulas in fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def _cdpo(x, eps):
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def pair_type_losses(name, cr, rr, nc, nr, beta, eps=0.0, f_divergence="reverse_kl", f_alpha=0.5, tau=0.05):
    """Per-pair losses [B] of one per-pair type (FUSED_TYPES) from the fp32 log-ratios cr, rr [B]
    and the token counts nc, nr [B] (only the *_norm types read them)."""
    sc, sr = f_divergence_scores(cr, f_divergence, f_alpha), f_divergence_scores(rr, f_divergence, f_alpha)
    d = sc - sr
    x = beta * d
    a, b = beta * cr, beta * rr
    if name == "sigmoid":
        return _cdpo(x, eps)
    if name == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return torch.relu(1 - x)
    if name == "robust":
        return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    if name == "exo_pair":
        return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
                + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
    if name == "nca_pair":
        return -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
    if name == "bco_pair":
        return -F.logsigmoid(a) - F.logsigmoid(-b)
    if name == "sppo_hard":
        return (cr - 0.5 / beta) ** 2 + (rr + 0.5 / beta) ** 2
    if name == "apo_zero":
        return 1 - torch.sigmoid(a) + torch.sigmoid(b)
    if name == "apo_down":
        return torch.sigmoid(a) + 1 - torch.sigmoid(a - b)
    if name == "discopop":
        return -F.logsigmoid(x) * torch.sigmoid(-x / tau) + torch.exp(-x + F.logsigmoid(x / tau))
    if name in ("sigmoid_norm", "ipo_norm"):
        dn = sc / nc.clamp(min=1) - sr / nr.clamp(min=1)
        return _cdpo(beta * dn, eps) if name == "sigmoid_norm" else (dn - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown per-pair DPO loss type {name!r}")


def batch_type_losses(name, c, r, rc, rr, nc, beta, eps=0.0):
    """Per-pair entries [B] of a batch type (BATCH_TYPES) from the fp32 sequence log-probs."""
    if name == "aot":
        delta = torch.sort(c - r, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
        return _cdpo(beta * delta, eps)
    if name == "aot_unpaired":
        delta = torch.sort(c - rc, dim=0)[0] - torch.sort(r - rr, dim=0)[0]
        return _cdpo(beta * delta, eps)
    if name == "sft":
        return (-c.sum() / nc.clamp(min=1).sum()).expand(c.shape[0])
    raise ValueError(f"unknown batch DPO loss type {name!r}")


def dpo_type_losses(c, r, rc, rr, loss_types, loss_weights, beta, eps=0.0, f_divergence="reverse_kl", f_alpha=0.5,
                    tau=0.05, chosen_lengths=None, rejected_lengths=None, pair_weights=None):
    """sum_k w_k L_k [B] over the types (fp32), times pair_weights (detached) if given; with
    (losses, chosen_rewards, rejected_rewards) as fastalign.dpo_loss returns them."""
    c, r, rc, rr = (_f32(t) for t in (c, r, rc, rr))
    cr, rr_ = c - rc, r - rr
    ones = torch.ones_like(c)
    nc = ones if chosen_lengths is None else chosen_lengths.to(c.dtype)
    nr = ones if rejected_lengths is None else rejected_lengths.to(c.dtype)
    total = None
    for name, w in zip(loss_types, loss_weights):
        if name in BATCH_TYPES:
            term = batch_type_losses(name, c, r, rc, rr, nc, beta, eps)
        else:
            term = pair_type_losses(name, cr, rr_, nc, nr, beta, eps, f_divergence, f_alpha, tau)
        term = term if w == 1.0 else w * term
        total = term if total is None else total + term
    if pair_weights is not None:
        total = total * pair_weights.detach().to(total.dtype)
    return total, (beta * cr).detach(), (beta * rr_).detach()


def wpo_pair_weights(policy_token_logps, log_sum_sq_probs, mask):
    """WPO (Zhou et al. 2024, eq. 2, as TRL 1.16 computes it): per row j of [chosen; rejected],
    w_j = exp(masked mean over tokens of (logp - log sum_v p_v^2)); the pair weight is
    w_chosen * w_rejected [B], detached (no gradient)."""
    with torch.no_grad():
        valid = mask != 0
        aligned = torch.where(valid, policy_token_logps.float() - log_sum_sq_probs.float(), 0.0)
        w = torch.exp(aligned.sum(-1) / valid.sum(-1).clamp(min=1))
        b = w.shape[0] // 2
        return w[:b] * w[b:]


def ld_token_weights(mask, ld_alpha):
    """LD-DPO (Liu et al. 2024) token weights [2B, T] fp32 for a [chosen; rejected] mask: 1 on each
    row's first min(n_chosen, n_rejected) valid tokens (the pair's shared length), ld_alpha on the
    valid tokens beyond, 0 on masked positions. sum_t w_t logp_t = shared + ld_alpha * tail."""
    valid = mask != 0
    pos = valid.to(torch.int64).cumsum(-1)
    n = valid.sum(-1)
    b = n.shape[0] // 2
    shared = torch.minimum(n[:b], n[b:]).repeat(2).unsqueeze(-1)
    w = torch.where(pos <= shared, 1.0, float(ld_alpha))
    return torch.where(valid, w, 0.0).to(torch.float32)
