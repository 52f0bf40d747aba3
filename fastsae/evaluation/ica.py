"""FastICA in PyTorch, on the data's own device and dtype: scikit-learn's `FastICA(whiten="unit-variance",
whiten_solver="svd", fun="logcosh", algorithm="parallel")` step for step (Hyvärinen 1999, "Fast and robust
fixed-point algorithms for independent component analysis"; Hyvärinen, Karhunen & Oja 2001, table 8.4).

Why not scikit-learn itself: it runs in numpy on the CPU, even when the activations are on a GPU, and its
logcosh step averages g'(wᵀx) in a Python loop over the rows. On the main
job's baseline (32,768 activations × d 640, 640 components, 400 iterations that do not converge) that fit
was 306 s of a 380 s evaluation phase on 2 CPU cores (bench/results/evaluation/eval-speed-cpu-2026-11-21.md). Here each
iteration is two GEMMs, an in-place tanh and a small symmetric eigendecomposition, all on x's device; on a
CPU the GEMMs are most of it (as they are of scikit-learn's), so the gain is there on a GPU.

The same start (scikit-learn's `w_init`: one draw of numpy's RandomState(seed).normal(size=(n, n))), the same
whitening, update, decorrelation, stopping rule and unit-variance rescaling, so the result equals
scikit-learn's up to the order of floating-point sums (bench/ica.py and tests/evaluation/test_ica.py measure how far).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..ops import cpu_gemm


@dataclass
class ICAResult:
    """s = components (x - mean) are the unit-variance sources; x ≈ mean + mixing s."""

    components: Tensor  # (n, d) scikit-learn's components_
    mixing: Tensor  # (d, n) scikit-learn's mixing_: the pseudo-inverse of components
    mean: Tensor  # (d,)
    n_iter: int  # iterations run (max_iter when it did not converge)
    converged: bool


@torch.no_grad()
def fast_ica(x: Tensor, n_components: int, seed: int = 0, max_iter: int = 200, tol: float = 1e-4,
             data_dtype: torch.dtype | None = None) -> ICAResult:
    """FastICA of x (N, d) into n_components sources, as scikit-learn's FastICA(n_components,
    whiten="unit-variance", random_state=seed, max_iter, tol) with its other defaults. Runs on x's device
    in x's dtype (float32 or float64). Warns (RuntimeWarning) when max_iter iterations do not reach tol.

    data_dtype=torch.float32 with float64 x: the iterations' two GEMMs over the whitened data and their tanh
    run in float32 (the GEMMs by oneDNN on a CPU, ops/cpu_gemm.py), while the whitening and W, its update and
    decorrelation stay in float64: 0.204 against 0.600 s per iteration at the main job's 640 × 32,768 on 2 CPU
    cores (0.361 with MKL's GEMM; bench/ica.py). It is then no longer scikit-learn's path to the last digits.
    On small problems it lands 1e-7 from the float64 fit (tests/evaluation/test_ica.py); at the main job's shape it
    converges (113 iterations against 106) to another of FastICA's fixed points, about as good a one
    (held-out FVU 0.20939 against 0.20877; 0.20854 with MKL's GEMM after 111 iterations,
    bench/results/evaluation/ica-cpu-2026-11-21-float32-400-iterations*.md)."""
    if not isinstance(x, Tensor) or x.ndim != 2 or x.dtype not in (torch.float32, torch.float64):
        # as scikit-learn's; torch.linalg has no SVD or eigh in 16-bit types
        raise ValueError(f"x must be a 2-D float32 or float64 tensor (N, d), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
                         f"{' ' + str(x.dtype) if isinstance(x, Tensor) else ''}")
    N, d = x.shape
    if N < 2:
        raise ValueError(f"x needs at least 2 rows (samples), got {N}")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or not 1 <= n_components <= min(N, d):
        raise ValueError(f"n_components must be an int in [1, min(N, d) = {min(N, d)}], got {n_components!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32) (numpy's RandomState seed), got {seed!r}")
    if data_dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"data_dtype must be None, torch.float32 or torch.float64, got {data_dtype!r}")
    if not torch.isfinite(x).all():
        raise ValueError("x has NaN or infinite values")
    n = n_components

    mean = x.mean(0)
    xc = x - mean  # (N, d); scikit-learn's XT is xc.T
    k, x1 = _whiten(xc, n)  # (n, d), (n, N)
    w_init = np.random.RandomState(seed).normal(size=(n, n))  # scikit-learn's w_init, drawn the same way
    w, n_iter, converged = _ica_parallel(x1.to(data_dtype or x.dtype), torch.from_numpy(w_init).to(x.device, x.dtype),
                                         max_iter, tol)
    del x1
    if not converged:
        warnings.warn(f"FastICA did not converge in {max_iter} iterations (tol {tol:g}); consider a larger "
                      f"tol or max_iter", RuntimeWarning, stacklevel=3)  # past no_grad's wrapper
    # whiten="unit-variance": rescale each source to unit variance over x (scikit-learn's S_std, ddof 0)
    s_std = (xc @ (w @ k).T).std(0, correction=0)  # (n,) std of S = xc (W K)ᵀ, (N, n)
    components = (w / s_std[:, None]) @ k  # (n, d)
    return ICAResult(components, torch.linalg.pinv(components), mean, n_iter, converged)


def _whiten(xc: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """PCA whitening by SVD: K (n, d) and the whitened data X1 = K xcᵀ √N (n, N), whose rows have unit
    variance and no correlation (Hyvärinen et al. 2001, (6.33) p. 140 and (13.6) p. 267)."""
    N = xc.shape[0]
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)  # vh (r, d): scikit-learn's u (of xcᵀ) is vhᵀ
    floor = s[0] * max(xc.shape) * torch.finfo(xc.dtype).eps  # torch.linalg.matrix_rank's default tolerance
    if not s[n - 1] > floor:
        raise ValueError(f"x has rank {int((s > floor).sum())} after centring, fewer than n_components = {n}: "
                         f"whitening would divide by a (numerically) zero singular value")
    vh = vh * torch.sign(vh[:, :1])  # scikit-learn's u *= sign(u[0]): each direction's first entry positive
    k = vh[:n] / s[:n, None]  # (n, d)
    x1 = k @ xc.T  # (n, N)
    x1 *= math.sqrt(N)
    return k, x1


def _sym_decorrelation(w: Tensor) -> Tensor:
    """W <- (W Wᵀ)^(-1/2) W, by the eigendecomposition of W Wᵀ (n, n)."""
    s, u = torch.linalg.eigh(w @ w.T)
    # rounding can make an eigenvalue negative; sqrt(tiny) > tiny, so the clip also prevents division by 0
    s = s.clamp_min(torch.finfo(w.dtype).tiny)
    return (u * (1 / s.sqrt())) @ (u.T @ w)


def _tanh_(x: Tensor) -> Tensor:
    """tanh in place. On the CPU through numpy, whose float64 tanh is faster than torch's: 3.3 against 6.4 ms
    for a 640 × 4,096 block on 2 cores (bench/cpu_parts.py); it is also the very function scikit-learn's
    logcosh calls."""
    if x.device.type == "cpu":
        np.tanh(x.numpy(), out=x.numpy())
        return x
    return x.tanh_()


def _ica_parallel(x1: Tensor, w_init: Tensor, max_iter: int, tol: float) -> tuple[Tensor, int, bool]:
    """The symmetric fixed-point iteration with g = tanh (logcosh, alpha 1) on whitened x1 (n, N):
    W <- decorrelate(E[g(W x) xᵀ] - diag(E[g'(W x)]) W) until max_i |1 - |w_i · w_i'|| < tol.
    W (n, n) is kept in w_init's dtype; the products with x1 are in x1's."""
    N = x1.shape[1]
    w = _sym_decorrelation(w_init)
    for it in range(1, max_iter + 1):
        # the two (n, n) × (n, N) products as linears: by oneDNN when x1 is fp32 on CPU (ops/cpu_gemm.py)
        gx = _tanh_(cpu_gemm.linear(w.to(x1.dtype), x1.T))  # g(W x) (n, N)
        g_prime = 1 - torch.einsum("ij,ij->i", gx, gx).to(w.dtype) / N  # (n,) E[1 - tanh²(W x)], no (n, N) temporary
        w1 = _sym_decorrelation(cpu_gemm.linear(gx, x1).to(w.dtype) / N - g_prime[:, None] * w)
        lim = float((w1 * w).sum(1).abs().sub_(1).abs_().max())
        w = w1
        if lim < tol:
            return w, it, True
    return w, max_iter, False
