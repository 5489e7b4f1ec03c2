"""Algorithm plugin registry and the built-in algorithms (sft, reward, dpo, ppo, grpo)."""

from fastalign.algorithms.base import Algorithm, AlgorithmConfig, token_logps
from fastalign.algorithms.registry import (
    ENTRY_POINT_GROUP,
    UnknownAlgorithmError,
    get_algorithm,
    list_algorithms,
    load_plugins,
    register_algorithm,
)

# built-ins register themselves on import
from fastalign.algorithms import dpo, grpo, ppo, reward, sft  # noqa: E402,F401

__all__ = ["Algorithm", "AlgorithmConfig", "ENTRY_POINT_GROUP", "UnknownAlgorithmError", "get_algorithm",
           "list_algorithms", "load_plugins", "register_algorithm", "token_logps"]
