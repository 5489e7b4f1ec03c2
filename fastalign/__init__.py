"""fastalign: fused loss-head kernels for aligning language models.

One Python API over four backends (eager torch, C++ CPU, CUDA, Triton); see the README's
architecture section and `fastalign.backends()`. The trainer layer (`Trainer`, the algorithm registry) loads on first use,
so `import fastalign` for the kernels stays light.
"""

import importlib

from fastalign._backends import backends
from fastalign.ops.advantages import advantages, register_advantage_estimator
from fastalign.ops.gae import gae
from fastalign.ops.grpo import group_advantages
from fastalign.ops.kl import kl_penalty, masked_whiten
from fastalign.ops.linear_logprobs import linear_gather_logprobs
from fastalign.ops.logprobs import gather_logprobs
from fastalign.ops.policy_loss import policy_loss
from fastalign.ops.policy_loss_types import register_policy_loss
from fastalign.ops.ppo import ppo_policy_loss, ppo_value_loss
from fastalign.ops.preference import (
    dpo_loss,
    dpo_loss_from_tokens,
    register_dpo_loss_type,
    reward_loss,
    sequence_logps,
)
from fastalign.ops.unpaired import (
    bco_loss,
    bco_loss_from_tokens,
    kto_kl_reference,
    kto_loss,
    kto_loss_from_tokens,
)
from fastalign.ops.ref_free import cpo_loss_from_tokens, orpo_loss_from_tokens, simpo_loss_from_tokens

__version__ = "0.1.0"

_LAZY = {
    "Trainer": "fastalign.trainer",
    "TrainerConfig": "fastalign.trainer",
    "get_algorithm": "fastalign.algorithms",
    "list_algorithms": "fastalign.algorithms",
    "register_algorithm": "fastalign.algorithms",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastalign' has no attribute {name!r}")


__all__ = [
    "__version__",
    "backends",
    # token log-probabilities
    "gather_logprobs",
    "linear_gather_logprobs",
    # RL
    "gae",
    "masked_whiten",
    "kl_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
    "policy_loss",
    "register_policy_loss",
    "group_advantages",
    "advantages",
    "register_advantage_estimator",
    # preference
    "sequence_logps",
    "dpo_loss",
    "dpo_loss_from_tokens",
    "register_dpo_loss_type",
    "reward_loss",
    # unpaired preference (KTO, BCO)
    "kto_loss",
    "kto_loss_from_tokens",
    "kto_kl_reference",
    "bco_loss",
    "bco_loss_from_tokens",
    # reference-free paired preference losses
    "orpo_loss_from_tokens",
    "cpo_loss_from_tokens",
    "simpo_loss_from_tokens",
    *_LAZY,
]
