"""Training: the trainer loop, schedules, the fused optimizer, dead latents, checkpoints."""

from .optim import SAEAdam
from .trainer import TrainConfig, Trainer, TrainResult, fvu, train

__all__ = ["SAEAdam", "TrainConfig", "Trainer", "TrainResult", "fvu", "train"]
