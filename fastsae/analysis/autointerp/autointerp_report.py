"""The autointerp report: per-kind summaries (SAE against each baseline), a markdown table, a plot of the
score distributions, and the explanations as feature-browser annotations."""

from __future__ import annotations

import math
from pathlib import Path

from ... import io
from .context_sources import parse_name
from .scoring import summarize

SCORES = (("simulation", "score", "simulation score (correlation)"),
          ("detection", "balanced_accuracy", "detection balanced accuracy"),
          ("fuzzing", "balanced_accuracy", "fuzzing balanced accuracy"))


def _value(result: dict, task: str, key: str) -> float | None:
    v = (result.get(task) or {}).get(key)
    return None if v is None else float(v)


def summarize_kinds(results: dict[str, dict]) -> dict[str, dict]:
    """{kind: {"features": n, "unexplained": dead ones, "<task>": summarize(values), "<task>_accuracy": …}}."""
    kinds: dict[str, list[dict]] = {}
    for name, r in results.items():
        kinds.setdefault(parse_name(name)[0], []).append(r)
    out = {}
    for kind, rs in kinds.items():
        s = {"features": len(rs), "unexplained": sum(r.get("explanation") is None for r in rs),
             "copied_explanations": sum(bool(r.get("explanation_copied")) for r in rs)}
        for task, key, _ in SCORES:
            if any(task in r for r in rs):
                s[task] = summarize([_value(r, task, key) for r in rs if task in r])
        for task in ("detection", "fuzzing"):
            for key in ("accuracy", "auroc"):
                values = [_value(r, task, key) for r in rs if key in (r.get(task) or {})]
                if values:
                    s[f"{task}_{key}"] = summarize(values)["mean"]
        tr = [(r.get("simulation") or {}).get("top_and_random", {}).get("score") for r in rs]
        if any(v is not None for v in tr):  # the seed's protocol, beside the stratified "simulation" above
            s["simulation_top_and_random"] = summarize([v for v in tr if v is not None])
        methods = sorted({r["simulation"]["method"] for r in rs if "simulation" in r})
        if methods:
            s["simulation_method"] = "+".join(methods)
        out[kind] = s
    return out


def _cell(s: dict | None) -> str:
    if not s or not s.get("n"):
        return "–"
    sem = f" ± {s['sem']:.3f}" if not math.isnan(s["sem"]) else ""
    return f"{s['mean']:.3f}{sem}"


def format_table(summary: dict[str, dict]) -> str:
    """Markdown: one row per kind, SAE first. "copied": explanations that repeat a worked example of the
    prompt; "undefined": features whose held-out activations were constant (no simulation score)."""
    order = sorted(summary, key=lambda k: (k != "sae", k))
    lines = ["| features | n | copied | simulation (mean ± sem) | median | undefined | detection acc | "
             "detection bal. acc | detection AUROC | fuzzing acc | fuzzing bal. acc | fuzzing AUROC |",
             "|---" * 12 + "|"]
    f = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
    for kind in order:
        s = summary[kind]
        sim = s.get("simulation") or {}
        lines.append(f"| {kind} | {s['features']} | {s.get('copied_explanations', 0)} | {_cell(sim)} |"
                     f" {f(sim.get('median'))} | {sim.get('undefined', 0)}"
                     f" | {f(s.get('detection_accuracy'))} | {_cell(s.get('detection'))} | "
                     f"{f(s.get('detection_auroc'))} | {f(s.get('fuzzing_accuracy'))} | {_cell(s.get('fuzzing'))} | "
                     f"{f(s.get('fuzzing_auroc'))} |")
    return "\n".join(lines)


def plot_scores(path: str | Path, results: dict[str, dict]) -> Path | None:
    """Box plots with every feature as a dot: one panel per score, one box per kind. None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kinds = sorted({parse_name(n)[0] for n in results}, key=lambda k: (k != "sae", k))
    panels = [(t, k, label) for t, k, label in SCORES if any(t in r for r in results.values())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (task, key, label) in zip(axes[0], panels, strict=True):
        data = []
        for kind in kinds:
            vals = [_value(r, task, key) for n, r in results.items() if parse_name(n)[0] == kind]
            data.append([v for v in vals if v is not None and math.isfinite(v)])
        ax.boxplot([d or [math.nan] for d in data], showfliers=False)
        ax.set_xticks(range(1, len(kinds) + 1), kinds)
        for i, d in enumerate(data, 1):  # every feature, jittered sideways
            ax.scatter([i + 0.12 * ((j * 0.618) % 1 - 0.5) for j in range(len(d))], d, s=8, alpha=0.5, zorder=3)
        if task != "simulation":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")  # chance
        else:
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    io.write_figure(path, fig)
    plt.close(fig)
    return Path(path)


def annotation_text(result: dict, model: str) -> str:
    if result.get("explanation") is None:
        return f"autointerp: {result.get('note', 'not explained')}"
    parts = []
    for task, key, short in (("simulation", "score", "simulation r"), ("detection", "balanced_accuracy", "detection"),
                             ("fuzzing", "balanced_accuracy", "fuzzing")):
        v = _value(result, task, key)
        if v is not None:
            parts.append(f"{short} {v:.2f}" if math.isfinite(v) else f"{short} undefined")
    return f"{result['explanation'] or '(empty explanation)'} — {', '.join(parts)} (explained by {model})"


def write_annotations(feature_cache: str | Path, results: dict[str, dict], model: str, kind: str = "sae",
                      href: str | None = None) -> Path:
    """Add the explanations of `kind` features to <feature_cache>/annotations/autointerp.json (the browser
    shows each entry on its feature's page); entries for other latents already there are kept."""
    path = Path(feature_cache) / "annotations" / "autointerp.json"
    data = {"title": "Autointerp", "features": {}}
    if path.is_file():
        old = io.read_json(path)
        data["features"].update(old.get("features", {}))
    for name, r in results.items():
        k, latent = parse_name(name)
        if k == kind:
            entry = {"text": annotation_text(r, model), "links": []}
            if href:
                entry["links"].append({"text": "autointerp report", "href": href})
            data["features"][str(latent)] = entry
    io.write_json(path, data)
    return path
