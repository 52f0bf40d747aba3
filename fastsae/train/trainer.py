"""A first trainer: Adam, LR warm-up and decay, L1 warm-up, the unit-norm decoder constraint.

Trains on any iterable of activation batches (tensors of shape (..., d_in)).
The recipe follows Anthropic's April 2024 update (Adam, β = (0.9, 0.999), L1
coefficient warmed up over the first 5% of steps, LR decayed linearly to zero
over the last 20%), with the decoder kept on the unit sphere as in Bricken et
al. 2023 when `normalize_decoder` is set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..sae import SAE


@dataclass
class TrainConfig:
    lr: float = 4e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # Fractions of the total steps (total_steps, or len(batches) when it has one).
    lr_warmup_fraction: float = 0.01
    lr_decay_fraction: float = 0.2
    l1_warmup_fraction: float = 0.05
    total_steps: int | None = None
    # A latent is dead when it has not fired on any of the last dead_window_tokens rows.
    dead_window_tokens: int = 1_000_000
    log_every: int = 50
    progress: bool = True

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        for name in ("lr_warmup_fraction", "lr_decay_fraction", "l1_warmup_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1.0:
            raise ValueError("TrainConfig.lr_warmup_fraction + lr_decay_fraction must be <= 1")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"TrainConfig.total_steps must be >= 1, got {self.total_steps}")
        if self.dead_window_tokens < 1 or self.log_every < 1:
            raise ValueError("TrainConfig.dead_window_tokens and log_every must be >= 1")


@dataclass
class TrainResult:
    sae: SAE
    history: list[dict] = field(default_factory=list)


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: Σ||x - x_hat||² / Σ||x - mean(x)||² over the rows of the batch."""
    x, x_hat = x.reshape(-1, x.shape[-1]).float(), x_hat.reshape(-1, x.shape[-1]).float()
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)


class Trainer:
    def __init__(self, sae: SAE, cfg: TrainConfig | None = None):
        self.sae = sae
        self.cfg = cfg or TrainConfig()
        params = [p for p in sae.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=self.cfg.lr, betas=self.cfg.adam_betas)
        self.step_count = 0
        self.total_steps: int | None = self.cfg.total_steps
        self.tokens_seen = 0
        # Rows since each latent last fired: a latent is dead past dead_window_tokens.
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=sae.device)

    # ---- schedules ---------------------------------------------------------------------------------

    def lr_scale(self, step: int) -> float:
        if self.total_steps is None:
            return 1.0
        warmup = math.ceil(self.cfg.lr_warmup_fraction * self.total_steps)
        decay = math.floor(self.cfg.lr_decay_fraction * self.total_steps)
        if step < warmup:
            return (step + 1) / warmup
        if decay and step >= self.total_steps - decay:
            return max(0.0, (self.total_steps - step) / decay)
        return 1.0

    def l1_coefficient(self, step: int) -> float:
        full = self.sae.cfg.l1_coefficient
        warmup = math.ceil(self.cfg.l1_warmup_fraction * self.total_steps) if self.total_steps else 0
        return full * min(1.0, (step + 1) / warmup) if warmup else full

    # ---- one step ----------------------------------------------------------------------------------

    def step(self, x: Tensor) -> dict:
        sae, cfg = self.sae, self.cfg
        sae.train()
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * self.lr_scale(self.step_count)
        out = sae(x)
        l1_coef = self.l1_coefficient(self.step_count)
        loss = out.mse if out.l1 is None else out.mse + l1_coef * out.l1
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sae.cfg.normalize_decoder:
            sae.remove_parallel_decoder_grad_()
        self.optimizer.step()
        if sae.cfg.normalize_decoder:
            sae.normalize_decoder_()

        with torch.no_grad():
            rows = out.latents.values.numel() // out.latents.width
            fired = out.latents.fire_counts() > 0
            self.tokens_since_fired += rows
            self.tokens_since_fired[fired] = 0
            self.tokens_seen += rows
            self.step_count += 1
            return {
                "step": self.step_count,
                "tokens": self.tokens_seen,
                "loss": loss.item(),
                "mse": out.mse.item(),
                "l1": None if out.l1 is None else out.l1.item(),
                "l1_coefficient": l1_coef,
                "l0": out.latents.l0.float().mean().item(),
                "fvu": fvu(x, out.x_hat).item(),
                "dead_fraction": self.dead_fraction(),
                "lr": self.optimizer.param_groups[0]["lr"],
            }

    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired in the last dead_window_tokens rows (0 until a window has passed)."""
        if self.tokens_seen < self.cfg.dead_window_tokens:
            return 0.0
        return (self.tokens_since_fired >= self.cfg.dead_window_tokens).float().mean().item()

    # ---- the loop ----------------------------------------------------------------------------------

    def fit(self, batches: Iterable[Tensor]) -> TrainResult:
        if self.total_steps is None and hasattr(batches, "__len__"):
            self.total_steps = len(batches)
        history: list[dict] = []
        start, start_tokens = time.perf_counter(), self.tokens_seen
        bar = tqdm(total=self.total_steps, disable=not self.cfg.progress, desc="train", unit="step")
        for x in batches:
            if self.total_steps is not None and self.step_count >= self.total_steps:
                break
            metrics = self.step(x)
            bar.update(1)
            last = self.total_steps is not None and self.step_count == self.total_steps
            if self.step_count % self.cfg.log_every == 0 or last:
                metrics["tokens_per_s"] = (self.tokens_seen - start_tokens) / (time.perf_counter() - start)
                history.append(metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", l0=f"{metrics['l0']:.1f}",
                                fvu=f"{metrics['fvu']:.3f}", dead=f"{metrics['dead_fraction']:.2f}")
        bar.close()
        return TrainResult(self.sae, history)


def train(sae: SAE, batches: Iterable[Tensor], cfg: TrainConfig | None = None) -> TrainResult:
    """Train sae on batches; returns the trained SAE and its metrics history."""
    return Trainer(sae, cfg).fit(batches)
