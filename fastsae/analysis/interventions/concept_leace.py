"""LEACE (LEAst-squares Concept Erasure; Belrose et al. 2023, arXiv:2306.03819): the affine edit of least
mean squared change after which no linear classifier predicts the concept better than a constant. It is the
comparator of concept erasure (fastsae.analysis.interventions.erasure) beside PCA.

    eraser = fit_leace(x, labels)              # x (N, d) activations, labels (N,) int classes or (N, k) floats
    x_erased = erase(eraser, x)                # x - L R (x - μ): a rank-r edit, r = rank of Cov(x, z)
    as_dictionary(eraser)                      # a BasisDictionary of r directions: zeroing all r erases

The fit is EleutherAI's concept-erasure `LeaceFitter` (method "leace") in float64, with its two options that
are not LEACE itself turned off: shrinkage of Σ_xx (off: our fits have N >> d) and the trace constraint (off: it mixes
in the orthogonal projection only when LEACE would raise the total variance). With
W = Σ_xx^{-1/2} (pseudo-inverse on the eigenvalues above pinv's threshold), U_r the left singular vectors of
W Σ_xz with singular value > svd_tol: L = W⁺ U_r (d, r), R = U_rᵀ W (r, d). For a one-hot concept of k classes
Σ_xz has rank ≤ k - 1 (its columns sum to zero), so r ≤ k - 1: one direction for a binary concept.

As a dictionary the eraser is a baselines.Decomposition named "leace": directions Lᵀ, analysis R, mean μ, so
the latent edit "zero every coefficient" is x -> x - (R (x - μ))ᵀ Lᵀ, exactly the eraser, and the erasure
tool applies it at the same site and positions as the SAE's ablations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...evaluation.baselines import Decomposition

SVD_TOL = 0.01  # concept-erasure's default: singular values of the whitened cross-covariance below it are dropped


def one_hot(labels: Tensor) -> Tensor:
    """(N,) integer or bool classes -> (N, k) float64 one-hot (k = largest class + 1, at least 2);
    (N, k) float labels pass through as float64."""
    if labels.dim() == 2:
        return labels.double()
    if labels.dim() != 1:
        raise ValueError(f"labels must be (N,) classes or (N, k) values, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError("labels: (N,) labels must be integer or bool classes; give (N, k) for real values")
    labels = labels.long()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels: classes must be >= 0, got {int(labels.min())}")
    k = max(2, int(labels.max()) + 1 if labels.numel() else 2)
    return torch.nn.functional.one_hot(labels, k).double()


@torch.no_grad()
def fit_leace(x: Tensor, labels: Tensor, svd_tol: float = SVD_TOL) -> Decomposition:
    """The LEACE eraser of the concept labels (see the module docstring) from activations x (N, d), as a
    Decomposition of r directions (k = r). Raises ValueError when no direction of x is correlated with z."""
    if x.dim() != 2:
        raise ValueError(f"x must be (N, d) activations, got shape {tuple(x.shape)}")
    z = one_hot(labels.to(x.device))
    if z.shape[0] != x.shape[0] or x.shape[0] < 2:
        raise ValueError(f"x and labels need the same number N >= 2 of rows, got {x.shape[0]} and {z.shape[0]}")
    if svd_tol <= 0:
        raise ValueError(f"svd_tol must be > 0, got {svd_tol}")
    from concept_erasure import LeaceFitter  # EleutherAI's concept-erasure: LEACE itself, not a copy of it

    fitter = LeaceFitter(x.shape[1], z.shape[1], "leace", dtype=torch.float64, device=x.device, shrinkage=False,
                         constrain_cov_trace=False, svd_tol=svd_tol)
    fitter.update(x.double(), z)
    eraser = fitter.eraser  # proj_left (d, k), proj_right (k, d); the directions below svd_tol are zeroed
    kept = eraser.proj_right.norm(dim=1) > 0
    if not kept.any():
        raise ValueError(f"the concept is not linearly correlated with x (every singular value of the whitened "
                         f"cross-covariance <= svd_tol={svd_tol}): nothing for LEACE to erase")
    left, right, mu = eraser.proj_left[:, kept], eraser.proj_right[kept], eraser.bias
    return Decomposition("leace", left.T.contiguous(), right.contiguous(), mu, int(kept.sum()))


def erase(eraser: Decomposition, x: Tensor) -> Tensor:
    """x (…, d) with the concept erased: x - (x - μ) Rᵀ L (the eraser's own arithmetic, in float32 or wider)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    mean, right = eraser.mean.to(x.device, acc), eraser.analysis.to(x.device, acc)
    left = eraser.directions.to(x.device, acc)  # (r, d): Lᵀ
    return (x.to(acc) - ((x.to(acc) - mean) @ right.T) @ left).to(x.dtype)
