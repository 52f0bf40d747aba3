"""Reconstruction and sparsity metrics, accumulated over batches in float64.

Names and formulas follow SAELens's evals where it has the metric, so numbers compare.
x is an input vector, x̂ its reconstruction, z its latent codes; E[·] averages over eval tokens.

    mse                           E ||x - x̂||²                        (summed over d, mean over tokens)
    explained_variance            1 - E||x - x̂||² / (E||x||² - ||E x||²)   (variance of the centred inputs)
    fvu                           1 - explained_variance               (fastsae.losses.variance_unexplained)
    cossim                        E cos(x, x̂)
    l2_ratio                      E ||x̂|| / ||x||                      (||x|| < 1e-4 counts as 1, as SAELens)
    relative_reconstruction_bias  E||x̂||² / E<x, x̂>                   (Wright & Sharkey's γ; 1 = no shrinkage)
    l0                            E #{i : z_i != 0}
    l1                            E Σ_i |z_i|
    dead_fraction                 fraction of latents that never fire over the eval tokens
    dense_fraction                fraction of latents that fire on more than 10% of the eval tokens
    feature_density               per latent, the fraction of eval tokens it fires on (histogram of log10)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..losses import variance_unexplained

DENSE_THRESHOLD = 0.1


class ReconstructionMetrics:
    """Feed (x, x̂, z) batch by batch; `compute()` gives the metrics above. z may be dense codes (N, n)
    or (values, indices) of a sparse form whose padding has value 0; d_codes is the number of latents."""

    def __init__(self, d_codes: int):
        self.d_codes = d_codes
        self.n = 0
        self.sum_x: Tensor | None = None
        self.sums = dict.fromkeys(("sq_norm", "sq_resid", "cos", "l2_ratio", "xhat_sq", "x_dot_xhat", "l0", "l1"),
                                  0.0)
        self.fires = torch.zeros(d_codes, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, codes: Tensor | tuple[Tensor, Tensor]) -> None:
        x, x_hat = x.reshape(-1, x.shape[-1]).double(), x_hat.reshape(-1, x_hat.shape[-1]).double()
        if x.shape != x_hat.shape:
            raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must have the same shape")
        norm, norm_hat = x.norm(dim=1), x_hat.norm(dim=1)
        s = self.sums
        self.sum_x = x.sum(0).cpu() if self.sum_x is None else self.sum_x + x.sum(0).cpu()
        s["sq_norm"] += float(norm.square().sum())
        s["sq_resid"] += float((x - x_hat).square().sum())
        s["cos"] += float(((x * x_hat).sum(1) / (norm * norm_hat).clamp_min(1e-30)).sum())
        s["l2_ratio"] += float((norm_hat / torch.where(norm < 1e-4, torch.ones_like(norm), norm)).sum())
        s["xhat_sq"] += float(norm_hat.square().sum())
        s["x_dot_xhat"] += float((x * x_hat).sum())
        if isinstance(codes, tuple):
            values, indices = codes
            values, indices = values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1])
            active = values != 0
            s["l0"] += float(active.sum())
            s["l1"] += float(values.double().abs().sum())
            self.fires += torch.bincount(indices[active].cpu(), minlength=self.d_codes).double()
        else:
            codes = codes.reshape(-1, codes.shape[-1])
            active = codes != 0
            s["l0"] += float(active.sum())
            s["l1"] += float(codes.double().abs().sum())
            self.fires += active.sum(0).cpu().double()
        self.n += x.shape[0]

    def compute(self) -> dict:
        if self.n == 0:
            raise ValueError("no tokens were added")
        n, s = self.n, self.sums
        fvu = variance_unexplained(s["sq_resid"], s["sq_norm"], self.sum_x, n)
        density = self.fires / n
        return {"tokens": n, "mse": s["sq_resid"] / n, "fvu": fvu, "explained_variance": 1.0 - fvu,
                "cossim": s["cos"] / n,
                "l2_ratio": s["l2_ratio"] / n,
                "relative_reconstruction_bias": s["xhat_sq"] / s["x_dot_xhat"] if s["x_dot_xhat"] else math.nan,
                "l0": s["l0"] / n, "l1": s["l1"] / n, "dead_fraction": float((density == 0).double().mean()),
                "dense_fraction": float((density > DENSE_THRESHOLD).double().mean())}

    def feature_density(self) -> Tensor:
        """Per latent, the fraction of eval tokens it fired on."""
        return self.fires / max(self.n, 1)


def density_histogram(density: Tensor, bins: int = 40) -> dict:
    """Histogram of log10(feature density) over latents that fired; dead latents counted apart."""
    alive = density[density > 0]
    if alive.numel() == 0:
        return {"dead": int(density.numel()), "edges": [], "counts": []}
    logd = alive.log10()
    lo, hi = math.floor(float(logd.min())), max(0.0, math.ceil(float(logd.max())))
    counts = torch.histc(logd, bins=bins, min=lo, max=hi if hi > lo else lo + 1)
    edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    return {"dead": int((density == 0).sum()), "edges": edges.tolist(), "counts": counts.long().tolist()}
