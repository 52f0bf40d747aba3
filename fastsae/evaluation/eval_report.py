"""metrics.json and the plots of an evaluation: feature-density histograms, and L0 against FVU and
against CE loss recovered across a sweep, with the Pareto frontier and the baselines beside it."""

from __future__ import annotations

import math
from pathlib import Path

from .. import io
from .metrics import density_histogram


def pareto_frontier(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both L0 (lower) and the metric; sorted by L0."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if higher_is_better
                                                         else points[i][1]))
    best, frontier = None, []
    for i in order:
        y = points[i][1]
        if math.isnan(y):
            continue
        if best is None or (y > best if higher_is_better else y < best):
            frontier.append(i)
            best = y
    return frontier


def to_json(results: dict[str, dict]) -> dict:
    """results from evaluate() with each density tensor replaced by its histogram."""
    out = {}
    for name, m in results.items():
        m = dict(m)
        if "density" in m:
            m["density_histogram"] = density_histogram(m.pop("density"))
        out[name] = m
    return out


def write_report(out: str | Path, results: dict[str, dict], meta: dict | None = None,
                 baselines: tuple[str, ...] = (), extra: dict | None = None, text: str | None = None) -> list[Path]:
    """Write out/metrics.json (atomically) and, when matplotlib is installed, the plots. Returns the files.
    extra: more sections of metrics.json ("absorption", "sparse_probing": fastsae.evaluation.probe_metrics);
    text: the report's text, written to out/report.md."""
    out = Path(out)
    io.write_json(out / "metrics.json", {"meta": meta or {}, "results": to_json(results), **(extra or {})})
    files = [out / "metrics.json"]
    if text is not None:
        io.atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text + "\n"))
        files.append(out / "report.md")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: metrics.json only (pip install 'fastsae[plot]' for the plots)")
        return files
    names = [n for n in results if n != "model"]
    saes = [n for n in names if n not in baselines]

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in saes:  # the baselines' densities are in metrics.json; here they would crowd the SAEs out
        density = results[name]["density"]
        alive = density[density > 0]
        if alive.numel():
            ax.hist(alive.log10().numpy(), bins=40, histtype="step", label=f"{name} ({int((density == 0).sum())} dead)")
    ax.set_xlabel("log10 feature density (fraction of tokens it fires on)")
    ax.set_ylabel("latents")
    ax.legend(fontsize=7)
    fig.tight_layout()
    io.write_figure(out / "density.png", fig)
    plt.close(fig)
    files.append(out / "density.png")

    metrics = [("fvu", False, "FVU (lower is better)")]
    if "ce_loss_recovered" in results[names[0]]:
        metrics.append(("ce_loss_recovered", True, "CE loss recovered (higher is better)"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, (key, higher, label) in zip(axes[0], metrics, strict=True):
        points = [(results[n]["l0"], results[n][key]) for n in saes]
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="C0", label="SAEs", zorder=3)
        for n, p in zip(saes, points, strict=True):
            ax.annotate(n, p, fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_frontier(points, higher)
        if len(front) > 1:
            ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="C0", lw=1,
                    label="Pareto frontier")
        for j, n in enumerate(b for b in baselines if b in results):
            ax.scatter([results[n]["l0"]], [results[n][key]], marker="x", color=f"C{j + 1}", label=n, zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    io.write_figure(out / "pareto.png", fig)
    plt.close(fig)
    files.append(out / "pareto.png")
    return files
