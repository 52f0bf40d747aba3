"""Where training metrics go: JSON lines always (with a run directory), TensorBoard or wandb when installed."""

from __future__ import annotations

import json
from pathlib import Path

from .. import io


class MetricSinks:
    def __init__(self, run_dir: Path | None, tensorboard: bool = False, wandb_project: str | None = None,
                 config: dict | None = None):
        # whole lines or none: a full disk cuts off the line it could not finish and names the file
        self.jsonl = io.AppendLog(run_dir / "metrics.jsonl") if run_dir else None
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("TrainConfig.tensorboard needs the tensorboard package") from err
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard") if run_dir else None)
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("TrainConfig.wandb_project needs the wandb package") from err
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir) if run_dir else None, config=config)

    def write(self, metrics: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(metrics) + "\n")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for key, value in numbers.items():
                self.tb.add_scalar(f"train/{key}", value, metrics["step"])
        if self.wandb:
            self.wandb.log(numbers, step=metrics["step"])

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
