"""Training: the trainer loop, schedules, the fused optimizer, dead latents, checkpoints."""

from ..losses import fvu
from .optim import SAEAdam, build_optimizer
from .train_config import (
    CheckpointConfig,
    DeadLatentConfig,
    LoggingConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
)
from .trainer import Trainer, TrainingDivergedError, TrainResult, train

__all__ = ["CheckpointConfig", "DeadLatentConfig", "LoggingConfig", "OptimizerConfig", "SAEAdam", "ScheduleConfig",
           "TrainConfig", "Trainer", "TrainingDivergedError", "TrainResult", "build_optimizer", "fvu", "train"]
