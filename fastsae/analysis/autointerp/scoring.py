"""The numbers autointerp reports, as plain functions of true and predicted values (no language model here).

- simulation score (Bills et al. 2023, "Language models can explain neurons in language models"): the
  Pearson correlation between the simulator's predicted activations and the true ones over every token of
  the held-out contexts, top-activating and random together ("all at once" scoring).
- detection and fuzzing (Paulo et al. 2024, "Automatically interpreting millions of features in large
  language models"): binary judgements against known labels, as accuracy, balanced accuracy and, when the
  judge gave probabilities, AUROC (threshold-free, so a judge that says "yes" too often still shows whether
  its confidence ranks the contexts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def simulation_score(true: Sequence[Sequence[float]], simulated: Sequence[Sequence[float]]) -> dict:
    """{"correlation": r, "note": why it is 0 or NaN (absent otherwise), "tokens": n} over all tokens.

    A constant simulation carries no information about which tokens fire: it scores 0 (the correlation
    is undefined, but "explains nothing" is the honest number to average) and says so in "note". True
    activations that are constant (the feature never fires on the held-out contexts) leave the score
    undefined: NaN, with the reason, and the summary counts such features apart.
    """
    if len(true) != len(simulated):
        raise ValueError(f"simulated: expected one list per context ({len(true)}), got {len(simulated)}")
    for i, (t, s) in enumerate(zip(true, simulated, strict=True)):
        if len(t) != len(s):
            raise ValueError(f"simulated[{i}]: expected {len(t)} values (one per token), got {len(s)}")
    t = np.array([v for row in true for v in row], dtype=np.float64)  # (tokens,)
    s = np.array([v for row in simulated for v in row], dtype=np.float64)
    if t.size == 0:
        return {"correlation": math.nan, "note": "no tokens", "tokens": 0}
    if not np.isfinite(s).all():
        raise ValueError("simulated: values must be finite")
    if np.ptp(t) == 0:
        return {"correlation": math.nan, "note": "true activations are constant", "tokens": int(t.size)}
    if np.ptp(s) == 0:
        return {"correlation": 0.0, "note": "constant simulation", "tokens": int(t.size)}
    r = float(np.corrcoef(t, s)[0, 1])
    return {"correlation": r, "tokens": int(t.size)}


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2
    (the Mann-Whitney U statistic over n_pos * n_neg). NaN when a class is missing."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_scores(labels: Sequence[bool], predicted: Sequence[bool],
                  probabilities: Sequence[float | None] | None = None) -> dict:
    """accuracy, balanced accuracy (mean of the true-positive and true-negative rates; NaN when a class is
    missing) and, when every judgement came with a probability, AUROC; n counts the judgements."""
    if len(labels) != len(predicted):
        raise ValueError(f"predicted: expected {len(labels)} judgements, got {len(predicted)}")
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    out = {"n": int(y.size), "accuracy": float((y == p).mean()) if y.size else math.nan}
    if y.any() and (~y).any():
        out["balanced_accuracy"] = float((p[y].mean() + (~p[~y]).mean()) / 2)
    else:
        out["balanced_accuracy"] = math.nan
    if probabilities is not None and len(probabilities) == len(labels) and all(q is not None for q in probabilities):
        out["auroc"] = auroc(y, probabilities)
    return out


def summarize(values: Sequence[float]) -> dict:
    """mean, standard error, median over the finite values, and how many were NaN (undefined)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    finite = v[np.isfinite(v)]
    n = int(finite.size)
    return {"n": n, "undefined": int(v.size - n),
            "mean": float(finite.mean()) if n else math.nan,
            "sem": float(finite.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
            "median": float(np.median(finite)) if n else math.nan}
