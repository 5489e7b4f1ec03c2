"""Algorithm plugin registry, the Algorithm interface, the online-RL base classes and the
built-in algorithms (sft, reward, dpo, kto, bco, ppo, grpo and its family: rloo, reinforce_pp, remax, dapo). docs/algorithms.md explains how to write one."""

from fastalign.algorithms.base import Algorithm, AlgorithmConfig, token_logps
from fastalign.algorithms.critic_free import CriticFreeAlgorithm, CriticFreeConfig
from fastalign.algorithms.online import OnlineAlgorithm, OnlineConfig
from fastalign.algorithms.registry import (
    ENTRY_POINT_GROUP,
    UnknownAlgorithmError,
    get_algorithm,
    list_algorithms,
    load_plugins,
    register_algorithm,
)

# built-ins register themselves on import
from fastalign.algorithms import dpo, grpo, kto, online_dpo, ppo, presets, reward, sft  # noqa: E402,F401
from fastalign.algorithms import prm  # noqa: E402,F401
from fastalign.algorithms import ref_free  # noqa: E402,F401  (orpo, cpo, simpo)

__all__ = ["Algorithm", "AlgorithmConfig", "CriticFreeAlgorithm", "CriticFreeConfig", "ENTRY_POINT_GROUP",
           "OnlineAlgorithm", "OnlineConfig", "UnknownAlgorithmError", "get_algorithm", "list_algorithms",
           "load_plugins", "register_algorithm", "token_logps"]
