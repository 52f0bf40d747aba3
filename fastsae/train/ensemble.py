"""Training an `SAEEnsemble`: every member on the same batches, one set of kernels per step.

The schedules, the fused optimizer and the decoder constraint are the
single-SAE trainer's; each member's loss is its own (its L1 coefficient or k),
and the ensemble trains on their sum, whose gradient splits back into exactly
each member's own gradient.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..ensemble import SAEEnsemble
from ..sae import SAE
from .optim import SAEAdam
from .trainer import TrainConfig, fvu, l1_warmup, lr_scale

_UNSUPPORTED = {"resample_every": None, "auxk_coefficient": 0.0, "kl_coefficient": 0.0, "checkpoint_every": None,
                "mixed_precision": None}


@dataclass
class EnsembleResult:
    members: list[SAE]
    history: list[dict] = field(default_factory=list)  # per logged step: lists with one value per member


def train_ensemble(members: list[SAE], batches: Iterable[Tensor], cfg: TrainConfig | None = None) -> EnsembleResult:
    """Train members (same shape; their l1_coefficient, k and initial weights may differ) together.
    The ensemble always uses SAEAdam (its stacked decoder rows need the fused constraint); on CPU each
    member equals a solo run with TrainConfig(optimizer="fused")."""
    cfg = cfg or TrainConfig()
    for name, allowed in _UNSUPPORTED.items():
        if getattr(cfg, name) != allowed:
            raise ValueError(f"train_ensemble does not support TrainConfig.{name}={getattr(cfg, name)!r} yet")
    ens = SAEEnsemble(members)
    opt = SAEAdam(ens, lr=cfg.lr, betas=cfg.adam_betas, state_dtype=getattr(torch, cfg.optimizer_state_dtype))
    total = cfg.total_steps or (len(batches) if hasattr(batches, "__len__") else None)
    history, start, tokens = [], time.perf_counter(), 0
    bar = tqdm(total=total, disable=not cfg.progress, desc=f"train x{ens.n}", unit="step")
    for step, x in enumerate(batches):
        if total is not None and step >= total:
            break
        ens.train()
        x = x.reshape(-1, ens.d_in).to(ens.W_dec.dtype)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_scale(step, total, cfg)
        out = ens(x)
        loss = out.mse
        if out.l1 is not None:
            # coefficient · warm-up in Python floats first, as the single-SAE trainer computes it
            warm = l1_warmup(step, total, cfg)
            loss = loss + torch.tensor([c * warm for c in ens.l1_coefficients], dtype=out.l1.dtype) * out.l1
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        tokens += x.shape[0]
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            with torch.no_grad():
                history.append({
                    "step": step + 1, "tokens": tokens, "loss": loss.tolist(), "mse": out.mse.tolist(),
                    "l1": None if out.l1 is None else out.l1.tolist(),
                    "l0": (out.values > 0).sum(-1).float().mean(-1).tolist(),
                    "fvu": [fvu(x, out.x_hat[e]).item() for e in range(ens.n)],
                    "tokens_per_s": tokens / (time.perf_counter() - start),
                })
    bar.close()
    return EnsembleResult([ens.member(e) for e in range(ens.n)], history)
