"""The fused advantage estimators: two forward-only ops behind `fastalign.advantages`.

  fastalign::outcome_advantage_fwd(rewards [B, K], mask [B, T], group [B] int64, int kind,
                                   float epsilon, bool norm) -> adv fp32 [B, T]
      kind 0 grpo, 1 rloo, 2 opo, 3 grpo_passk, 4 reinforce_plus_plus_baseline. The score of row i
      is s_i = sum_k rewards[i, k] (K = T: token-level rewards, summed unmasked as verl does;
      K = 1: outcome scores); group holds dense ids in [0, B) (dense_group_ids). Three stages:
      (a) the per-row score (and response length for opo / reinforce_plus_plus_baseline),
      (b) the per-group statistics (count, sum, two-pass sum of squared deviations, length-weighted
      sums, max / first argmax / second max), each group reduced in batch order, so the result is
      deterministic on every backend, (c) the broadcast A_i * m_it. O(B T) work.
  fastalign::return_advantage_fwd(rewards [B, T], mask [B, T], Tensor? baselines [B], float gamma,
                                  int kind) -> (adv, returns) fp32 [B, T]
      kind 0 reinforce_plus_plus (a reverse scan, then the batch whitening over the mask),
      kind 1 remax (a reverse masked cumulative sum minus the baseline).

Kernels: csrc/cpu/advantages.cpp (cpp), csrc/cuda/advantages.cu (cuda),
fastalign/kernels/triton/advantages.py (triton). No gradient: advantages are functions of
rollout data (rewards, masks, group ids), so the ops have no backward and no autograd formula
("forward and backward" is forward only); fastalign.advantages detaches its inputs.

The functions below have the options of the torch estimators of the same kind
(fastalign/ops/advantage_estimators.py), plus the backend; `advantages` calls them instead of
the torch estimators when the backend is a fused one.
"""

from __future__ import annotations

import torch

from fastalign.ops._checks import same_device
from fastalign.ops._fused import FusedOp

OUTCOME_KINDS = {"grpo": 0, "rloo": 1, "opo": 2, "grpo_passk": 3, "reinforce_plus_plus_baseline": 4}
RETURN_KINDS = {"reinforce_plus_plus": 0, "remax": 1}


def _fake_outcome(rewards, mask, group, kind, epsilon, norm):
    same_device("outcome_advantage_fwd", mask=mask, rewards=rewards, group=group)
    return mask.new_empty(mask.shape, dtype=torch.float32)


def _fake_return(rewards, mask, baselines, gamma, kind):
    same_device("return_advantage_fwd", rewards=rewards, mask=mask, baselines=baselines)
    out = rewards.new_empty(rewards.shape, dtype=torch.float32)
    return out, torch.empty_like(out)


OUTCOME_ADVANTAGE = FusedOp(
    name="outcome_advantage",
    fwd_schema="(Tensor rewards, Tensor mask, Tensor group, int kind, float epsilon, bool norm) -> Tensor",
    fake_fwd=_fake_outcome,
    triton="fastalign.kernels.triton.advantages",
)
RETURN_ADVANTAGE = FusedOp(
    name="return_advantage",
    fwd_schema="(Tensor rewards, Tensor mask, Tensor? baselines, float gamma, int kind) -> (Tensor, Tensor)",
    fake_fwd=_fake_return,
    triton="fastalign.kernels.triton.advantages",
)


def _outcome(kind, rewards, mask, group, backend, epsilon=1e-6, norm=True):
    fwd = OUTCOME_ADVANTAGE.kernels(backend)[0]
    if rewards.dim() == 1:  # outcome scores: an empty response scores 0, as on its (absent) last token
        rewards = torch.where(mask.any(-1), rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
        rewards = rewards.unsqueeze(-1)
    adv = fwd(rewards.contiguous(), mask.contiguous(), group, OUTCOME_KINDS[kind], float(epsilon), bool(norm))
    return adv, adv  # verl returns the advantages as the returns too


def grpo(rewards, mask, group, backend, *, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    return _outcome("grpo", rewards, mask, group, backend, epsilon, norm_adv_by_std_in_grpo)


def rloo(rewards, mask, group, backend):
    return _outcome("rloo", rewards, mask, group, backend)


def opo(rewards, mask, group, backend, *, epsilon=1e-6):
    del epsilon  # accepted, unused, as in verl
    return _outcome("opo", rewards, mask, group, backend)


def grpo_passk(rewards, mask, group, backend, *, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    return _outcome("grpo_passk", rewards, mask, group, backend, epsilon, norm_adv_by_std_in_grpo)


def reinforce_plus_plus_baseline(rewards, mask, group, backend, *, epsilon=1e-6):
    del epsilon  # accepted, unused, as in verl (its whitening has its own 1e-8)
    return _outcome("reinforce_plus_plus_baseline", rewards, mask, group, backend)


def _returns(kind, rewards, mask, baselines, gamma, backend):
    fwd = RETURN_ADVANTAGE.kernels(backend)[0]
    return fwd(rewards.contiguous(), mask.contiguous(), baselines, float(gamma), RETURN_KINDS[kind])


def reinforce_plus_plus(rewards, mask, group, backend, *, gamma=1.0):
    del group
    return _returns("reinforce_plus_plus", rewards, mask, None, gamma, backend)


def remax(rewards, mask, group, backend, *, reward_baselines):
    del group
    return _returns("remax", rewards, mask, reward_baselines.float().contiguous(), 1.0, backend)


# kind -> (fused function, whether it takes [B] outcome scores as they are)
FUSED = {
    "grpo": (grpo, True), "rloo": (rloo, True), "opo": (opo, True), "grpo_passk": (grpo_passk, True),
    "reinforce_plus_plus_baseline": (reinforce_plus_plus_baseline, True),
    "reinforce_plus_plus": (reinforce_plus_plus, False), "remax": (remax, False),
}
