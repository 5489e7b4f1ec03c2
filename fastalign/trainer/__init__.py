"""The light trainer: loop, checkpoints, metrics, generation helpers."""

from fastalign.trainer.config import TrainerConfig
from fastalign.trainer.loop import Trainer, TrainingDivergedError

__all__ = ["Trainer", "TrainerConfig", "TrainingDivergedError"]
