"""Training an `SAEEnsemble`: every member on the same batches, one optimizer pass per step.

The schedules, the fused optimizer and the decoder constraint are the
single-SAE trainer's; each member's loss is its own (its L1 coefficient or k),
and the ensemble trains on their sum, whose gradient splits back into exactly
each member's own gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..ensemble import SAEEnsemble
from ..losses import fvu
from ..sae import SAE
from .inputs import check_batch
from .optim import SAEAdam
from .schedules import l1_warmup, lr_scale, record_batch_threshold_
from .train_config import TrainConfig
from .trainer import TrainingDivergedError

# (concern, field) -> the only value train_ensemble supports yet
_UNSUPPORTED = {("dead_latents", "resample_every"): None, ("dead_latents", "resample_at"): None,
                ("dead_latents", "auxk_coefficient"): 0.0,
                (None, "kl_coefficient"): 0.0, ("checkpoints", "every"): None,
                ("optimizer", "mixed_precision"): None}


@dataclass
class EnsembleResult:
    members: list[SAE]
    history: list[dict] = field(default_factory=list)  # per logged step: lists with one value per member


def train_ensemble(members: list[SAE], batches: Iterable[Tensor], cfg: TrainConfig | None = None) -> EnsembleResult:
    """Train members (same shape; their l1_coefficient, k and initial weights may differ) together.
    The ensemble always uses SAEAdam (its stacked decoder rows need the fused constraint); on CPU each
    member equals a solo run with OptimizerConfig(kind="fused")."""
    cfg = cfg or TrainConfig()
    for (part, name), allowed in _UNSUPPORTED.items():
        value = getattr(cfg if part is None else getattr(cfg, part), name)
        if value != allowed:
            where = "TrainConfig" if part is None else type(getattr(cfg, part)).__name__
            raise ValueError(f"train_ensemble does not support {where}.{name}={value!r} yet")
    ens = SAEEnsemble(members)
    opt = SAEAdam(ens, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas,
                  state_dtype=getattr(torch, cfg.optimizer.state_dtype))
    total = cfg.schedule.total_steps or (len(batches) if hasattr(batches, "__len__") else None)
    history, start, tokens = [], time.perf_counter(), 0
    bar = tqdm(total=total, disable=not cfg.logging.progress, desc=f"train x{ens.n}", unit="step")
    for step, x in enumerate(batches):
        if total is not None and step >= total:
            break
        ens.train()
        x = check_batch(x, step).reshape(-1, ens.d_in).to(ens.W_dec.dtype)
        for group in opt.param_groups:
            group["lr"] = cfg.optimizer.lr * lr_scale(step, total, cfg.schedule)
        # coefficient · warm-up in Python floats, as the single-SAE trainer computes it
        warm = l1_warmup(step, total, cfg.schedule)
        out = ens(x, l1_coefficients=[c * warm for c in ens.l1_coefficients])
        if not torch.isfinite(out.loss).all():  # one host sync a step, as the single-SAE trainer's check
            bar.close()
            raise _diverged(ens, out.loss, step, cfg)
        opt.zero_grad(set_to_none=True)
        out.loss.sum().backward()
        opt.step()
        if out.threshold is not None:
            for e in range(ens.n):
                record_batch_threshold_(ens.threshold[e], out.threshold[e])
        tokens += x.shape[0]
        bar.update(1)
        if (step + 1) % cfg.logging.log_every == 0 or step + 1 == total:
            with torch.no_grad():
                history.append({
                    "step": step + 1, "tokens": tokens, "loss": out.loss.tolist(), "mse": out.mse.tolist(),
                    "l1": None if out.l1 is None else out.l1.tolist(),
                    "l0": (out.values > 0).sum(-1).float().mean(-1).tolist(),
                    "fvu": [fvu(x, out.x_hat[e]) for e in range(ens.n)],
                    "tokens_per_s": tokens / (time.perf_counter() - start),
                })
    bar.close()
    return EnsembleResult([ens.member(e) for e in range(ens.n)], history)


def _diverged(ens: SAEEnsemble, loss: Tensor, step: int, cfg: TrainConfig) -> TrainingDivergedError:
    """The error for a step whose loss is not finite for some member, raised before its update: it names the
    members and carries all of them as they were after the last finite step (`.members`), since
    train_ensemble writes no checkpoints and the caller's SAEs are not the ensemble's weights."""
    bad = [e for e, value in enumerate(loss.tolist()) if not math.isfinite(value)]
    return TrainingDivergedError(
        f"the loss of member{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} at step {step + 1} is not "
        f"finite; the error's .members hold every member's weights after step {step} (train_ensemble writes no "
        f"checkpoints)", step + 1, None, cfg.optimizer.lr, members=[ens.member(e) for e in range(ens.n)])

