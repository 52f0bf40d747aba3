"""What changes with the step: the LR's warm-up and decay, the L1 coefficient's warm-up, a resumed run's
length, and BatchTopK's inference threshold (an average over the training batches). Functions of
(step, total_steps), so a resumed run follows the schedule of an uninterrupted one.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .train_config import ScheduleConfig

# BatchTopK's inference threshold is an exponential moving average of the per-batch thresholds seen in
# training (Bussmann et al. 2024 use their mean).
BATCHTOPK_THRESHOLD_EMA = 0.99


def lr_scale(step: int, total_steps: int | None, cfg: ScheduleConfig) -> float:
    """Linear warm-up over the first lr_warmup_fraction, linear decay to 0 over the last lr_decay_fraction."""
    if total_steps is None:
        return 1.0
    warmup = math.ceil(cfg.lr_warmup_fraction * total_steps)
    decay = math.floor(cfg.lr_decay_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if decay and step >= total_steps - decay:
        return max(0.0, (total_steps - step) / decay)
    return 1.0


def l1_warmup(step: int, total_steps: int | None, cfg: ScheduleConfig) -> float:
    """The fraction of the full L1 coefficient in force at step (linear over l1_warmup_fraction)."""
    warmup = math.ceil(cfg.l1_warmup_fraction * total_steps) if total_steps else 0
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def resumed_total_steps(wanted: int | None, step: int, saved_total: int | None, path: Path) -> int | None:
    """The run's length after resuming from the checkpoint at path, of `step`, that planned `saved_total`
    steps: `wanted` (this run's ScheduleConfig.total_steps) when given (larger extends the run; smaller than
    `step` is an error), else the checkpoint's. The LR and L1 schedules are functions of (step, total_steps),
    so the steps after the resume follow the schedule of a run planned with the new total from the start:
    the warm-up is not repeated, and a run whose LR had decayed towards 0 goes back to the plateau at once."""
    if wanted is None:
        return saved_total
    if wanted < step:
        raise ValueError(f"{path}: ScheduleConfig.total_steps={wanted} is less than the checkpoint's step {step}: "
                         f"a resumed run cannot end before where it already is (pass total_steps >= {step})")
    return wanted


@torch.no_grad()
def record_batch_threshold_(threshold: Tensor, tau: Tensor) -> None:
    """Fold one training batch's BatchTopK threshold tau into the inference threshold (in place): the first
    batch's as it is, then an exponential moving average."""
    if threshold == 0:
        threshold.copy_(tau)
    else:
        threshold.lerp_(tau.to(threshold), 1 - BATCHTOPK_THRESHOLD_EMA)
