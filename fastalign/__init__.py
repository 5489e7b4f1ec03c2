"""fastalign: fused loss-head kernels for aligning language models.

One Python API over four backends (eager torch, C++ CPU, CUDA, Triton); see DESIGN.md and
`fastalign.backends()`.
"""

from fastalign._backends import backends
from fastalign.ops.gae import gae
from fastalign.ops.kl import kl_penalty, masked_whiten
from fastalign.ops.logprobs import gather_logprobs
from fastalign.ops.ppo import ppo_policy_loss, ppo_value_loss

__version__ = "0.1.0"

__all__ = ["__version__", "backends", "gae", "gather_logprobs", "kl_penalty", "masked_whiten",
           "ppo_policy_loss", "ppo_value_loss"]
