"""The metrics `fastsae eval --metrics absorption,sparse-probing` adds to the report: feature absorption on the
first-letter task (fastsae.evaluation.absorption) and k-sparse probing on the corpus's labels
(fastsae.evaluation.sparse_probing), each with a line on how it follows SAEBench's definition. They go into
metrics.json under "absorption" and "sparse_probing", and into the report's text (report.md)."""

from __future__ import annotations

import math
import time
from pathlib import Path

from .absorption import run_absorption
from .sparse_probing import run_sparse_probing

METRICS = ("absorption", "sparse-probing")

ABSORPTION_NOTE = (
    "SAEBench's first-letter absorption (Chanin et al. 2024): vocabulary words, ICL prompts '{word} has the first "
    "letter:', class-balanced logistic probes per letter (letters with probe F1 < 0.6 left out), main latents from "
    "k-sparse probes (k grows while F1 rises > 0.03), SAEBench's absorption fraction and full-absorption rules on "
    "the test words the probe gets right, averaged per letter then over letters. Departs: k-sparse latents chosen "
    "by mean activation difference (not an L1 probe), L-BFGS probes with scikit-learn's L2 objective, a seeded "
    "sample of at most max_words words (fastsae.evaluation.absorption).")
SPARSE_PROBING_NOTE = (
    "SAEBench's sparse probing: codes mean-pooled over each window's tokens, one-vs-rest tasks with balanced "
    "negatives, top-k latents by |mean difference| on train, L2 logistic regression (C = 1) on them, test accuracy "
    "averaged over classes; full_probe_accuracy uses every activation dimension. Departs: labels are the corpus's "
    "own (source, kind) instead of SAEBench's downloaded datasets, train/test split by document, fewer texts, and "
    "the baselines' dense coefficients compete too (fastsae.evaluation.sparse_probing).")


def parse_metrics(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The metric names of values, each one name or a comma-separated list; () for none."""
    names = [v.strip() for value in values or () for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"metrics must be among {list(METRICS)}, got {unknown}")
    return tuple(dict.fromkeys(names))


def run_probe_metrics(metrics: tuple[str, ...], lm, tokenizer, site: str, saes: dict, corpus: str | Path,
                      fit_x, baselines: tuple[str, ...], context_size: int, excluded: list[int], batch_size: int,
                      device: str, seed: int = 0, seconds: dict | None = None) -> dict:
    """{"absorption": ..., "sparse_probing": ...} for the names in metrics (module docstring); {} for none.
    seconds: a dict that receives their wall time under "probe_metrics"."""
    out: dict = {}
    if not metrics:
        return out
    start = time.perf_counter()
    if "absorption" in metrics:
        out["absorption"] = {"definition": ABSORPTION_NOTE, **run_absorption(lm, tokenizer, site, saes,
                                                                             batch_size=batch_size * 4,
                                                                             device=device, seed=seed)}
    if "sparse-probing" in metrics:
        from . import baselines as fitted

        decompositions = dict(saes)
        if baselines:
            if fit_x is None:
                raise ValueError("sparse probing against baselines needs fit_x, activations to fit them on")
            width = next(iter(saes.values())).cfg.d_sae
            for kind in baselines:  # k is unused: the probes read every coefficient (sparse_probing.dense_codes)
                decompositions[kind] = fitted.fit(kind, fit_x.to(device), n=width, k=1, seed=seed)
        out["sparse_probing"] = {"definition": SPARSE_PROBING_NOTE, "baselines": list(baselines), **run_sparse_probing(
            lm, tokenizer, site, corpus, decompositions, context_size=context_size, excluded=excluded,
            batch_size=batch_size, device=device, seed=seed)}
    if seconds is not None:
        seconds["probe_metrics"] = time.perf_counter() - start
    return out


def _cell(value) -> str:
    return "" if value is None else "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4g}"


def format_probe_metrics(extra: dict) -> str:
    """The report's text for run_probe_metrics' results: a table per metric and task, and the definitions."""
    lines: list[str] = []
    if "absorption" in extra:
        a = extra["absorption"]
        lines += ["", "## Absorption (first-letter task)", a["definition"], ""]
        if "skipped" in a:
            lines.append(f"skipped: {a['skipped']}")
        else:
            lines.append(f"{a['words']} words ({a['train_words']} train, {a['test_words']} test), letters "
                         f"{''.join(a['letters'])}; left out: {len(a['skipped_letters'])} letters")
            keys = ("mean_absorption_fraction", "mean_full_absorption", "mean_num_split_features", "letters")
            lines += ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for name, r in a["per_sae"].items():
                lines.append(f"| {name} | " + (r["skipped"] if "skipped" in r else
                                               " | ".join(_cell(r[k]) for k in keys)) + " |")
    if "sparse_probing" in extra:
        s = extra["sparse_probing"]
        lines += ["", "## Sparse probing", s["definition"], ""]
        if "skipped" in s:
            lines.append(f"skipped: {s['skipped']}")
        for field, task in s.get("tasks", {}).items():
            lines.append(f"task {field!r}: classes {task['classes']}" +
                         (f", left out {task['dropped_classes']}" if task["dropped_classes"] else ""))
            if "skipped" in task:
                lines += [f"skipped: {task['skipped']}", ""]
                continue
            lines += [f"{task['train_windows']} train / {task['test_windows']} test windows; full probe on every "
                      f"activation dimension: {task['full_probe_accuracy']:.4g}",
                      "| test accuracy | " + " | ".join(f"k={k}" for k in s["ks"]) + " |",
                      "|---" * (len(s["ks"]) + 1) + "|"]
            lines += [f"| {name} | " + " | ".join(_cell(acc[k]) for k in s["ks"]) + " |"
                      for name, acc in task["accuracy"].items()]
            lines.append("")
    return "\n".join(lines)
