"""Baseline decompositions of the same activations, as in the seed paper (Cunningham et al. 2023):
PCA, ICA (FastICA: scikit-learn's algorithm in PyTorch, fastsae.evaluation.ica), the neuron basis, and random
directions. Each is fitted on x's device.

Each is a dictionary of unit directions D (n, d) with an analysis map A (n, d) (coefficients
c = A (x - μ)) and a sparsity rule matched to the SAE: keep the k coefficients of largest
magnitude, k = the SAE's L0 rounded, then x̂ = μ + Dᵀ c. A basis (PCA, ICA, neurons) has at
most d directions, so asking for more gives d; random directions match the SAE's width
(overcomplete: A is the pseudo-inverse, the minimum-norm coefficients).
"""

from __future__ import annotations

import torch
from torch import Tensor

KINDS = ("pca", "ica", "neurons", "random")
ICA_CPU_DATA_DTYPE = torch.float32  # the ICA fit's iterations on a CPU (see fit); None: float64 throughout


class Decomposition:
    """x -> top-k sparse coefficients over n directions -> x̂. Same encode/decode shape as an SAE."""

    def __init__(self, name: str, directions: Tensor, analysis: Tensor, mean: Tensor, k: int):
        if directions.shape != analysis.shape or directions.shape[1] != mean.shape[0]:
            raise ValueError(f"directions {tuple(directions.shape)}, analysis {tuple(analysis.shape)} and mean "
                             f"{tuple(mean.shape)} do not fit together")
        if not 1 <= k <= directions.shape[0]:
            raise ValueError(f"k must be in [1, {directions.shape[0]}], got {k}")
        self.name, self.k = name, k
        self.directions, self.analysis, self.mean = directions.float(), analysis.float(), mean.float()
        self.dtype = torch.float32

    @property
    def d_codes(self) -> int:
        return self.directions.shape[0]

    def encode(self, x: Tensor) -> Tensor:
        """Dense (…, n) coefficients with all but the k largest in magnitude set to 0."""
        c = (x.float() - self.mean.to(x.device)) @ self.analysis.to(x.device).T
        top = c.abs().topk(self.k, dim=-1).indices
        return torch.zeros_like(c).scatter_(-1, top, c.gather(-1, top))

    def decode(self, codes: Tensor) -> Tensor:
        return self.mean.to(codes.device) + codes @ self.directions.to(codes.device)


def _unit_rows(m: Tensor) -> tuple[Tensor, Tensor]:
    norms = m.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return m / norms, norms


def fit(kind: str, x: Tensor, n: int, k: int, seed: int = 0) -> Decomposition:
    """Fit a baseline of kind on activations x (N, d) with n directions (capped at d for a basis)."""
    if kind not in KINDS:
        raise ValueError(f"baseline kind must be one of {KINDS}, got {kind!r}")
    x = x.double()
    N, d = x.shape
    mu = x.mean(0)
    xc = x - mu
    if kind == "pca":
        n = min(n, d, N)
        _, _, vh = torch.linalg.svd(xc, full_matrices=False)
        D = vh[:n]
        return Decomposition("pca", D, D, mu, min(k, n))
    if kind == "neurons":
        n = min(n, d)
        # the n neurons of largest variance (all d when n >= d); coefficients are the centred neuron values
        order = xc.var(0).argsort(descending=True)[:n].sort().values
        D = torch.eye(d, dtype=x.dtype, device=x.device)[order]
        return Decomposition("neurons", D, D, mu, min(k, n))
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        D, _ = _unit_rows(torch.randn(n, d, generator=gen, dtype=x.dtype).to(x.device))  # the same draw anywhere
        return Decomposition("random", D, torch.linalg.pinv(D.T), mu, min(k, n))
    from .ica import fast_ica

    n = min(n, d, N)
    # scikit-learn's FastICA(n, whiten="unit-variance", random_state=seed, max_iter=400, tol=1e-3), on x's device.
    # On a CPU its iterations' GEMMs run in float32 (whitening and W in float64): 2.9x faster per iteration, to
    # a fixed point about as good as float64's (fast_ica's docstring). Not on CUDA, where a caller's TF32 setting would
    # round them to 10 bits and float64 is fast.
    data_dtype = ICA_CPU_DATA_DTYPE if x.device.type == "cpu" else None
    ica = fast_ica(xc, n, seed=seed, max_iter=400, tol=1e-3, data_dtype=data_dtype)
    return ica_decomposition(ica.mixing, mu, min(k, n))


def ica_decomposition(mixing: Tensor, mean: Tensor, k: int) -> Decomposition:
    """The ICA baseline from a mixing matrix (d, n) (x ≈ mean + mixing s): unit directions, and coefficients
    rescaled by each direction's norm so that x̂ is unchanged."""
    D, norms = _unit_rows(mixing.T)  # (n, d)
    unmixing = torch.linalg.pinv(mixing)  # (n, d): s = unmixing (x - mean)
    return Decomposition("ica", D, unmixing * norms, mean, k)
