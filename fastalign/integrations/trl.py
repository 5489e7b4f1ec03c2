"""TRL's numerics computed with fastalign ops, and a drop-in patch of TRL's trainers.

Two parts:

1. Adapters named and called like TRL's own functions (`selective_log_softmax`,
   `entropy_from_logits`, `masked_whiten`, `compute_gae`, `grpo_advantages`, `dpo_losses`),
   mirroring trl/trainer/utils.py, the PPO trainer's whitening and GAE loop
   (trl/experimental/ppo/ppo_trainer.py), the GRPO trainer's group advantages and the DPO
   trainer's sigmoid / IPO / hinge / robust losses (`dpo_losses`), and all fifteen of its loss types
   with its options (`dpo_loss_like_trl`, `dpo_config_from_trl`). Differences from fastalign's defaults,
   reproduced here:
   - GAE: TRL's loop has no mask; values are zero-filled past the response end -> fastalign.gae
     with an all-ones mask; advantages then whitened over the response and zero-filled outside.
   - GRPO: std eps 1e-4 (added to the unbiased std); scale_rewards "group", "batch" or "none".
   - DPO "sigmoid" ignores label_smoothing in current TRL; "ipo" averages each sequence's
     log-ratio over its completion tokens.
   - TRL's KL estimators are not clamped (fastalign.kl_penalty k3 clamps as verl/OpenRLHF do), so
     no KL adapter is offered here.

2. `patch_trl()` / `unpatch_trl()` / `with use_fastalign():` -- make an installed TRL (checked
   against trl 1.16.0) compute its per-token log-probabilities and entropies with fastalign.
   In TRL 1.16 every trainer that scores tokens (DPOTrainer, GRPOTrainer, RLOOTrainer,
   SFTTrainer) goes through `add_fused_lm_head`, whose forward calls the module global
   `trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight, bias, targets, ...)` at each
   call; that global is replaced by `linear_gather_logprobs` (log-probs + entropy, gradients to
   hidden, weight and bias). The experimental trainers (ORPO, CPO, A2PO, SDFT, SDPO, TPO) call
   `selective_log_softmax` / `selective_log_softmax_and_entropy` on full logits; those names are
   replaced wherever a loaded `trl.*` module holds them, by `gather_logprobs`. The losses are
   NOT patched: TRL 1.16 computes every loss inline inside the trainers' `_compute_loss` /
   `compute_loss` (no function to swap), and they are O(batch) elementwise work next to the
   O(tokens x vocab) head. The reward trainer has no LM head (a scalar score head) and its
   Bradley-Terry loss is inline too: nothing to patch there. See docs/integrations.md.
"""

from __future__ import annotations

import torch

import fastalign
from fastalign.integrations.trl_grpo_loss import grpo_loss  # noqa: F401  (part of this adapter)

__all__ = ["compute_gae", "dpo_losses", "dpo_loss_like_trl", "dpo_config_from_trl", "TRL_DPO_LOSS_TYPES", "entropy_from_logits", "grpo_advantages", "grpo_loss", "masked_whiten",
           "selective_log_softmax", "selective_log_softmax_and_entropy", "patch_trl", "unpatch_trl", "unpatch",
           "use_fastalign", "is_patched", "call_counts"]


def _check_temperature(temperature):
    if not temperature > 0:
        raise ValueError("temperature must be positive")


def _row_labels(index, row_mask):
    # Rows TRL skips (row_mask == 0) become ignore_index: fastalign returns 0 there and no gradient,
    # which is what TRL's masked_fill(row_mask == 0, 0.0) gives.
    return index if row_mask is None else index.masked_fill(row_mask == 0, -100)


def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """TRL's selective_log_softmax: log_softmax(logits / temperature)[index] for index `[...]` or
    `[..., K]` (row_mask: same shape as index, 0 -> 0), without materialising log_softmax.
    fp32 result (as TRL's GPU kernel; TRL's eager fallback returns the logits' dtype)."""
    _check_temperature(temperature)
    labels = _row_labels(index, row_mask)
    if index.dim() == logits.dim() - 1:
        return fastalign.gather_logprobs(logits, labels, temperature=temperature)
    if index.dim() == logits.dim():  # K labels per position: one fused pass each
        return torch.stack([fastalign.gather_logprobs(logits, labels[..., k], temperature=temperature)
                            for k in range(index.shape[-1])], -1)
    raise ValueError(f"index must have shape logits.shape[:-1] or [..., K], got {tuple(index.shape)}")


def entropy_from_logits(logits, chunk_size=128):
    """TRL's entropy_from_logits: per-position entropy of softmax(logits), fp32 (no chunking needed)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return fastalign.gather_logprobs(logits, labels, return_entropy=True)[1]


def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None):
    """TRL's selective_log_softmax_and_entropy: (log-probs, entropy) of softmax(logits / temperature)
    in one fused pass; index `[...]`; rows with row_mask == 0 give 0 for both. fp32 results."""
    _check_temperature(temperature)
    if index.dim() != logits.dim() - 1:
        raise ValueError(f"index must have shape logits.shape[:-1], got {tuple(index.shape)}")
    logps, entropy = fastalign.gather_logprobs(logits, _row_labels(index, row_mask), temperature=temperature,
                                               return_entropy=True)
    if row_mask is not None:
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    return logps, entropy if entropy_requires_grad else entropy.detach()


def masked_whiten(values, mask, shift_mean=True):
    """TRL's masked_whiten: unbiased variance, rsqrt(var + 1e-8)."""
    return fastalign.masked_whiten(values, mask, shift_mean=shift_mean, eps=1e-8)


def compute_gae(rewards, values, response_mask, gamma, lam, whiten=True):
    """The PPO trainer's advantage computation: the unmasked GAE loop over all T steps (values
    and rewards as given: TRL zero-fills values past the end beforehand), returns = advantages +
    values, then (whiten=True) advantages whitened over response_mask and zero-filled outside.
    Returns (advantages, returns)."""
    ones = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    adv, ret = fastalign.gae(rewards, values, ones, gamma=float(gamma), lam=float(lam))
    if whiten:
        adv = torch.where(response_mask.bool(), masked_whiten(adv, response_mask), 0.0)
    return adv, ret


def grpo_advantages(rewards, num_generations, scale_rewards="group"):
    """GRPOTrainer's advantages of the [N] summed rewards: (r - group mean) / (std + 1e-4), std
    per group ("group"), over the batch ("batch"), or no scaling ("none")."""
    return fastalign.group_advantages(rewards, num_generations, eps=1e-4, scale=scale_rewards)


def dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, loss_type="sigmoid",
               label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
    """DPOTrainer's per-pair losses for loss_type "sigmoid" (label_smoothing ignored, as TRL does),
    "hinge", "robust" and "ipo" (pass the completion token counts: TRL averages over them).
    Returns (losses, chosen_rewards, rejected_rewards) like fastalign.dpo_loss."""
    c, r, rc, rr = chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    eps = 0.0
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (TRL averages over tokens)")
        nc, nr = chosen_lengths.float().clamp(min=1), rejected_lengths.float().clamp(min=1)
        c, rc, r, rr = c / nc, rc / nc, r / nr, rr / nr
    elif loss_type == "robust":
        eps = label_smoothing
    elif loss_type not in ("sigmoid", "hinge"):
        raise ValueError(f"loss_type must be sigmoid, hinge, ipo or robust, got {loss_type!r}")
    losses, _, _ = fastalign.dpo_loss(c, r, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    # TRL's rewards are beta * (logp - ref) of the summed log-probs, also under IPO
    return losses, (beta * (chosen_logps - ref_chosen_logps)).detach().float(), \
        (beta * (rejected_logps - ref_rejected_logps)).detach().float()


# TRL 1.16 DPOConfig.loss_type name -> fastalign's loss type. TRL's "ipo" divides each log-ratio by
# its completion's token count: fastalign's "ipo_norm" (fastalign's "ipo" takes the log-probs as given).
TRL_DPO_LOSS_TYPES = {"sigmoid": "sigmoid", "hinge": "hinge", "ipo": "ipo_norm", "exo_pair": "exo_pair",
                      "nca_pair": "nca_pair", "robust": "robust", "bco_pair": "bco_pair", "sppo_hard": "sppo_hard",
                      "aot": "aot", "aot_unpaired": "aot_unpaired", "apo_zero": "apo_zero", "apo_down": "apo_down",
                      "discopop": "discopop", "sigmoid_norm": "sigmoid_norm", "sft": "sft"}
# TRL ignores label_smoothing in these (fastalign's apply it: conservative DPO)
_TRL_NO_SMOOTHING = ("sigmoid", "sigmoid_norm")


def _trl_names(loss_type):
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    unknown = [n for n in names if n not in TRL_DPO_LOSS_TYPES]
    if unknown:
        raise ValueError(f"loss_type: {unknown} are not TRL 1.16 DPO loss types ({', '.join(TRL_DPO_LOSS_TYPES)})")
    return names


def dpo_loss_like_trl(policy_token_logps, ref_token_logps, completion_mask, *, beta=0.1, loss_type="sigmoid",
                      loss_weights=None, label_smoothing=0.0, f_divergence_type="reverse_kl",
                      f_alpha_divergence_coef=0.5, discopop_tau=0.05, ld_alpha=None, use_weighting=False,
                      log_sum_sq_probs=None, backend="auto"):
    """TRL 1.16 DPOTrainer._compute_loss's loss, sum_k w_k mean_i(L_k,i [* WPO weight_i]), from the
    shifted per-token log-probs of a [chosen; rejected] batch [2B, T] and their completion mask,
    with TRL's names and options (DPOConfig fields), computed by fastalign.dpo_loss_from_tokens.
    Differences reproduced: TRL's "ipo" is fastalign's "ipo_norm"; TRL's "sigmoid" and
    "sigmoid_norm" ignore label_smoothing (computed here in a second call with 0 where it is > 0)."""
    names = _trl_names(loss_type)
    weights = [1.0] * len(names) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(names):
        raise ValueError(f"loss_weights must have one weight per loss type ({len(names)}), got {loss_weights!r}")
    groups = {}  # label smoothing -> [(fastalign name, weight)]
    for n, w in zip(names, weights):
        eps = 0.0 if n in _TRL_NO_SMOOTHING else label_smoothing
        groups.setdefault(eps, []).append((TRL_DPO_LOSS_TYPES[n], w))
    total = None
    for eps, items in groups.items():
        losses, _, _ = fastalign.dpo_loss_from_tokens(
            policy_token_logps, ref_token_logps, completion_mask, beta=beta, loss_type=[n for n, _ in items],
            loss_weights=[w for _, w in items], label_smoothing=eps, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, ld_alpha=ld_alpha,
            use_weighting=use_weighting, log_sum_sq_probs=log_sum_sq_probs, backend=backend)
        total = losses if total is None else total + losses
    return total.mean()


def dpo_config_from_trl(args) -> dict:
    """fastalign's `dpo` algorithm options from a TRL DPOConfig (or anything with its fields). The
    label smoothing TRL's sigmoid ignores is refused (fastalign's sigmoid is conservative DPO), as
    is use_weighting (WPO; the trainer has no log sum of squared probabilities)."""
    names = _trl_names(args.loss_type)
    if float(args.label_smoothing) > 0 and any(n in _TRL_NO_SMOOTHING for n in names):
        raise ValueError("label_smoothing > 0 with TRL's sigmoid / sigmoid_norm (which ignore it) has no single "
                         "fastalign config: fastalign's sigmoid applies it (conservative DPO)")
    if getattr(args, "use_weighting", False):
        raise ValueError("use_weighting (WPO) is not available in fastalign's trainer; see dpo_loss_like_trl")
    return {"beta": float(args.beta), "loss_type": tuple(TRL_DPO_LOSS_TYPES[n] for n in names),
            "loss_weights": None if args.loss_weights is None else tuple(float(w) for w in args.loss_weights),
            "label_smoothing": float(args.label_smoothing), "f_divergence_type": args.f_divergence_type,
            "f_alpha_divergence_coef": float(args.f_alpha_divergence_coef),
            "discopop_tau": float(getattr(args, "discopop_tau", 0.05)), "ld_alpha": args.ld_alpha}


# ---- drop-in patch of TRL's trainers ----------------------------------------------------------------------------

# How often each patched seam ran through fastalign, and how often it handed a call back to TRL's own code
# (see `call_counts`). Tests use it to prove the patch is live.
_COUNTS: dict[str, int] = {}
# (module name, attribute) -> TRL's original object, for everything patch_trl replaced
_ORIGINALS: dict[tuple[str, str], object] = {}
_UTILS = "trl.trainer.utils"
_FUNCTIONS = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
_EXTRA_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")  # metrics-only fields of TRL's fused head


def _count(key: str) -> None:
    _COUNTS[key] = _COUNTS.get(key, 0) + 1


def call_counts() -> dict[str, int]:
    """Calls served by fastalign since the last patch_trl() (keys: "lm_head", "lm_head_extras_via_trl",
    "lm_head_fallback", "selective_log_softmax", ...)."""
    return dict(_COUNTS)


class FusedLMHead:
    """Stands in for `trl.kernels.ChunkedLogProbFunction` inside TRL's `add_fused_lm_head` forward: same
    `apply(hidden [N, H], weight [V, H], bias, targets [N], temperature, chunk_size, final_logit_softcapping,
    logit_scale, outputs)` returning `(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`.

    log_probs and entropy (with gradients to hidden, weight, bias) come from
    `fastalign.linear_gather_logprobs`; TRL's `logit_scale` z = s * (h W^T + b) / T is the temperature T / s.
    The metrics-only fields (no gradient: `log_sum_sq_probs`, `mean_logits`, `is_top1`, asked for by DPO's and
    SFT's logging) are not fastalign outputs: they come from one forward-only pass of TRL's own kernel.
    Handed back to TRL whole: final-logit soft-capping (Gemma 2/3; fastalign has no soft-cap), a
    non-positive logit scale, DeepSpeed ZeRO-3 partitioned weights (TRL re-gathers them in its backward),
    and an up-cast head (cast_lm_head_to_fp32 with a bf16/fp16 head: the whole head would be copied to fp32,
    where TRL casts one vocabulary chunk at a time).
    """

    def __init__(self, original):
        self.original = original

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        device = hidden.device
        autocast = torch.is_autocast_enabled(device.type)
        compute_dtype = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype
        if (final_logit_softcapping is not None or not logit_scale > 0 or hasattr(weight, "ds_id")
                or not weight.is_floating_point()
                or torch.finfo(compute_dtype).bits > torch.finfo(weight.dtype).bits):
            _count("lm_head_fallback")
            return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       final_logit_softcapping, logit_scale, outputs)
        _count("lm_head")
        # Same operand dtypes as TRL's tiles (the autocast dtype, else the hidden states'); autocast off
        # inside, the op itself keeps fp32 statistics and returns fp32.
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        with torch.autocast(device.type, enabled=False):
            res = fastalign.linear_gather_logprobs(h, w, targets, bias=b, return_entropy="entropy" in outputs,
                                                   temperature=float(temperature) / float(logit_scale))
        logps, entropy = res if "entropy" in outputs else (res, None)
        extras = tuple(name for name in _EXTRA_OUTPUTS if name in outputs)
        lss = mean = top1 = None
        if extras:
            _count("lm_head_extras_via_trl")
            with torch.no_grad():
                _, _, lss, mean, top1 = self.original.apply(hidden.detach(), weight.detach(),
                                                            None if bias is None else bias.detach(), targets,
                                                            temperature, chunk_size, None, logit_scale, extras)
        return logps, entropy, lss, mean, top1


def _counted(name, fn):
    def wrapper(*args, **kwargs):
        _count(name)
        return fn(*args, **kwargs)

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


def _trl_modules():
    import sys

    return [(n, m) for n, m in list(sys.modules.items()) if m is not None and (n == "trl" or n.startswith("trl."))]


def is_patched() -> bool:
    return bool(_ORIGINALS)


def patch_trl(*, lm_head: bool = True, functions: bool = True, compact: bool = True) -> list[str]:
    """Make the installed TRL use fastalign for its log-prob / entropy head. Idempotent; undo with
    `unpatch_trl()`. Returns the patched names ("module.attr").

    - lm_head: `trl.trainer.utils._ChunkedLogProbFunction` (the fused LM head of DPO, GRPO, RLOO and SFT)
      -> `FusedLMHead` (`linear_gather_logprobs`).
    - functions: `selective_log_softmax`, `entropy_from_logits`, `selective_log_softmax_and_entropy`, in
      trl.trainer.utils and in every loaded trl.* module that imported them by name (the experimental
      trainers), -> `gather_logprobs`. Modules imported later pick up the patched names from utils.
    - compact: on CPU, TRL's fused head scores every position (labels of prompt / padding clamped to 0, the
      results masked afterwards); with compact=True only the positions with a label are scored, as TRL
      already does on CUDA (`trl.trainer.utils._use_triton` answers True for cpu too). Same results.

    Must be called before the trainer's first step; trainers built before the call are covered too (the
    names are looked up at call time).
    """
    import importlib

    try:
        utils = importlib.import_module(_UTILS)
    except ImportError as e:
        raise ImportError(f"patch_trl needs TRL installed (checked with trl==1.16.0): {e}") from e
    if is_patched():
        return [f"{m}.{a}" for m, a in _ORIGINALS]
    _COUNTS.clear()
    done = []

    def put(module_name, attr, new):
        mod = importlib.import_module(module_name)
        _ORIGINALS[(module_name, attr)] = getattr(mod, attr)
        setattr(mod, attr, new)
        done.append(f"{module_name}.{attr}")

    if lm_head and hasattr(utils, "_ChunkedLogProbFunction"):
        put(_UTILS, "_ChunkedLogProbFunction", FusedLMHead(utils._ChunkedLogProbFunction))
    if compact and hasattr(utils, "_use_triton"):
        original = utils._use_triton
        put(_UTILS, "_use_triton", lambda device: device.type == "cpu" or original(device))
    if functions:
        replacements = {selective_log_softmax: "selective_log_softmax", entropy_from_logits: "entropy_from_logits",
                        selective_log_softmax_and_entropy: "selective_log_softmax_and_entropy"}
        for fn, name in replacements.items():
            original = getattr(utils, name, None)
            if original is None:
                continue
            new = _counted(name, fn)
            for module_name, mod in _trl_modules():
                if getattr(mod, name, None) is original:
                    put(module_name, name, new)
    return done


def unpatch_trl() -> None:
    """Restore every TRL name patch_trl replaced (also in trl.* modules imported while patched)."""
    if not _ORIGINALS:
        return
    patched = {}
    for (module_name, attr), original in _ORIGINALS.items():
        import sys

        mod = sys.modules.get(module_name)
        if mod is not None:
            patched[(attr, id(getattr(mod, attr, None)))] = original
            setattr(mod, attr, original)
    # modules imported after patch_trl copied the patched objects: give them TRL's originals too
    for _, mod in _trl_modules():
        for attr in _FUNCTIONS:
            key = (attr, id(getattr(mod, attr, None)))
            if key in patched:
                setattr(mod, attr, patched[key])
    _ORIGINALS.clear()


unpatch = unpatch_trl


class use_fastalign:
    """`with use_fastalign(): trainer.train()` -- patch_trl() for the block, unpatch_trl() after (only if this
    block did the patching)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.owner = False

    def __enter__(self):
        self.owner = not is_patched()
        patch_trl(**self.kwargs)
        return self

    def __exit__(self, *exc):
        if self.owner:
            unpatch_trl()
        return False
