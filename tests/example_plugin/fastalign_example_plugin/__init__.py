"""A third-party fastalign plugin: two DPO loss variants that are not in the kernel, each in a
few lines, and an online algorithm in one short file (rloo.py). Installed, they are found
through the `fastalign.algorithms` entry-point group:

    pip install --no-build-isolation -e tests/example_plugin
    fastalign list          # shows simpo-example, ln-dpo and rloo-example

(Entry-point names of their own: fastalign has built-in `simpo` and `rloo`.)
"""

from dataclasses import dataclass

import torch.nn.functional as F

from fastalign.algorithms.dpo import DPO, DPOConfig


@dataclass
class SimPOConfig(DPOConfig):
    beta: float = 2.0
    gamma: float = 0.5  # target reward margin


class SimPO(DPO):
    """SimPO: reference-free, length-normalised log-probs, target margin gamma."""

    config_class = SimPOConfig
    models = ("policy",)
    needs_reference = False
    logp_reduce = "mean"

    def pair_loss(self, chosen, rejected, ref_chosen, ref_rejected):
        b, g = self.config.beta, self.config.gamma
        return -F.logsigmoid(b * (chosen - rejected) - g), (b * chosen).detach(), (b * rejected).detach()


class LengthNormalizedDPO(DPO):
    """DPO on per-token mean log-probs (length-normalised DPO)."""

    logp_reduce = "mean"
