"""Binary logistic-regression probes in torch, for the SAEBench-style metrics (fastsae.evaluation.absorption,
fastsae.evaluation.sparse_probing), and the scores they are judged by.

`fit_logistic` minimises scikit-learn's `LogisticRegression(penalty="l2", C=C)` objective,

    C · Σ_i s_i · log(1 + exp(-y_i (w·x_i + b))) + ½ ||w||²        (y_i ∈ {-1, +1}, b not penalised)

with s_i = 1, or n / (2 n_class(y_i)) for class_weight="balanced" (scikit-learn's formula), by L-BFGS in
float64. The loss is convex, so the minimiser is scikit-learn's to the solver's tolerance
(tests/evaluation/test_logistic_probe.py checks it against scikit-learn where that is installed). scikit-learn
is only a dev dependency, so the library does not call it.
"""

from __future__ import annotations

import torch
from torch import Tensor

LBFGS_ITERATIONS = 500  # scikit-learn's SAEBench setting max_iter=500..1000; these problems converge in < 100


def _check(x: Tensor, y: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be (N, n) features, got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must be ({x.shape[0]},) labels in {{0, 1}}, got shape {tuple(y.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x holds NaN or Inf")


def fit_logistic(x: Tensor, y: Tensor, C: float = 1.0, balanced: bool = False) -> tuple[Tensor, float]:
    """(w (n,) float64, b) of the L2 logistic regression of labels y (N,) in {0, 1} on features x (N, n).
    A constant y (one class only) gets w = 0 and b = +10 or -10: it predicts that class."""
    _check(x, y)
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    x, pos = x.detach().double().cpu(), y.detach().cpu().bool()
    n_pos = int(pos.sum())
    if n_pos in (0, x.shape[0]):
        return torch.zeros(x.shape[1], dtype=torch.float64), 10.0 if n_pos else -10.0
    sign = pos.double() * 2 - 1  # (N,)
    weight = torch.ones(x.shape[0], dtype=torch.float64)
    if balanced:
        weight = torch.where(pos, x.shape[0] / (2 * n_pos), x.shape[0] / (2 * (x.shape[0] - n_pos)))
    # rescale the features by one scalar so that L-BFGS starts well conditioned (activations may have norms in
    # the hundreds); the penalty is rescaled to match, so the minimiser is the same in the original units
    scale = float(x.abs().max().clamp_min(1e-12))
    xs = x / scale
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1, max_iter=LBFGS_ITERATIONS, tolerance_grad=1e-10,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        w, b = params[:-1], params[-1]
        margins = sign * (xs @ w + b)
        # w here is scale · w_original, so ½||w_original||² = ½||w||² / scale²
        loss = C * (weight * torch.nn.functional.softplus(-margins)).sum() + 0.5 * (w @ w) / scale ** 2
        loss.backward()
        return loss

    opt.step(closure)
    w = params.detach()[:-1] / scale
    return w, float(params.detach()[-1])


def logits(x: Tensor, w: Tensor, b: float) -> Tensor:
    """(N,) w·x + b."""
    return x.double().cpu() @ w + b


def accuracy(pred: Tensor, y: Tensor) -> float:
    """Fraction of predictions (bool) equal to the labels."""
    return float((pred.bool() == y.bool().cpu()).double().mean()) if y.numel() else float("nan")


def f1(pred: Tensor, y: Tensor) -> float:
    """F1 of bool predictions against labels; 0 where there are no true positives (scikit-learn's zero_division=0)."""
    pred, y = pred.bool(), y.bool().cpu()
    tp = int((pred & y).sum())
    if tp == 0:
        return 0.0
    return 2 * tp / (2 * tp + int((pred & ~y).sum()) + int((~pred & y).sum()))


def top_mean_diff(x: Tensor, y: Tensor, k: int, absolute: bool = True) -> Tensor:
    """Indices (k,) of the features of x (N, n) whose mean differs most between y = 1 and y = 0 (SAEBench's
    sparse-probing selection, `get_top_k_mean_diff_mask`: |difference| when absolute, else the largest
    positive difference: features that fire more on the class)."""
    _check(x, y)
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"k must be in [1, {x.shape[1]}], got {k}")
    y = y.bool().to(x.device)
    diff = x[y].double().mean(0) - x[~y].double().mean(0)
    # stable: ties (e.g. latents silent on every example) keep the lower index
    order = torch.sort(diff.abs() if absolute else diff, descending=True, stable=True).indices
    return order[:k]
