"""Training: the trainer loop, schedules and the decoder-norm constraint."""

from .trainer import TrainConfig, Trainer, TrainResult, fvu, train

__all__ = ["TrainConfig", "Trainer", "TrainResult", "fvu", "train"]
