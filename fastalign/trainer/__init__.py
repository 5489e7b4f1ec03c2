"""The light trainer: loop, the context algorithms see, checkpoints, metrics, generation helpers."""

from fastalign.algorithms.context import TrainingContext, TrainingDivergedError
from fastalign.trainer.config import TrainerConfig
from fastalign.trainer.loop import Trainer

__all__ = ["Trainer", "TrainerConfig", "TrainingContext", "TrainingDivergedError"]
