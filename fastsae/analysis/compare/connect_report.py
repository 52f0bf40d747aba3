"""The report files of `fastsae connect`: the Pareto and nonlinearity plots, the formula table (formulas.md), the
annotations of the output SAE's feature cache, and the summary printed at the end."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ... import io
from ..features.browser_links import default_browser, feature_href

SHOWCASE = 5  # formulas shown with their features' top tokens


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> Path:
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


def pareto_plot(path: Path, points, chosen: int) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs, ys = [p.l1_norm for p in points], [p.eval.fvu for p in points]
    ax.plot(xs, ys, "o-", color="C0")
    for p, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(f"λ={p.l1_coefficient:g}\n{p.connections:.1f} terms", (x, y), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.plot([xs[chosen]], [ys[chosen]], "o", ms=12, mfc="none", color="C3", label="elbow")
    ax.set_xlabel("L1 norm of the weights per output feature (normalised units)")
    ax.set_ylabel("held-out FVU of F2")
    ax.set_title("Sparse linear connectors: error against weight L1")
    ax.legend()
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def nonlinearity_plot(path: Path, delta: Tensor, thresholds: dict[str, float | None]) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    d = delta[~torch.isnan(delta)].double()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    floor = 1e-5  # symmetric log: |Δ| below this is drawn at ±floor
    signed = d.sign() * d.abs().clamp_min(floor).log10().sub(math.log10(floor))
    ax.hist(signed.numpy(), bins=60, color="C0")
    for (name, t), color in zip(thresholds.items(), ("C3", "C2"), strict=False):
        if t is not None:
            pos = math.copysign(math.log10(max(abs(t), floor)) - math.log10(floor), t)
            ax.axvline(pos, color=color, ls="--", label=f"{name}: {t:g}")
    ticks = [-4, -2, 0, 2, 4]
    ax.set_xticks(ticks, [("−" if v < 0 else "") + (f"1e{int(math.log10(floor)) + abs(v)}" if v else "0")
                          for v in ticks])
    ax.set_xlabel("nonlinearity = mse_linear − mse_mlp per output feature (held out; per-layer units, E‖F2‖² = 1)")
    ax.set_ylabel("output features")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def _formula_md(formula, browser_in, browser_out, from_dir: Path, max_terms: int = 6) -> str:
    """The formula with each feature linked to its browser page (markdown, links relative to from_dir)."""
    def feat(prefix, i, browser):
        href = feature_href(browser, from_dir, i)
        return f"[{prefix} {i}]({href})" if href else f"{prefix} {i}"

    parts = []
    for n, (i, w) in enumerate(formula.terms[:max_terms]):
        sign = ("− " if n else "−") if w < 0 else ("+ " if n else "")
        parts.append(f"{sign}{abs(w):.2f}·{feat('IF', i, browser_in)}")
    more = f" + … ({len(formula.terms) - max_terms} more)" if len(formula.terms) > max_terms else ""
    return f"{feat('OF', formula.output, browser_out)} ≈ " + (" ".join(parts) + more if parts else "0")


def render_context(ex) -> str:
    """A context as text with the peak token in [[ ]]."""
    peak = max(range(len(ex.activations)), key=ex.activations.__getitem__)
    return "".join(f"[[{t}]]" if i == peak else t for i, t in enumerate(ex.tokens))


def pick_showcase(found, firings: Tensor, delta: Tensor | None, threshold: float) -> list:
    """Five readable formulas: linear output features (when judged) with 1-4 terms, the most frequent first."""
    def ok(j, f):
        linear = delta is None or (not math.isnan(float(delta[j])) and float(delta[j]) <= threshold)
        return linear and 1 <= len(f.terms) <= 4 and f.fvu < 0.5
    ranked = sorted((j for j, f in enumerate(found) if ok(j, f)), key=lambda j: -int(firings[j]))
    return [found[j] for j in ranked[:SHOWCASE]]


def formula_table(found, firings: Tensor, browser_in, browser_out, from_dir: Path) -> str:
    lines = ["# Sparse linear connections", "",
             "Weights are relative: w · (input's mean activation when on) / (output's mean activation when on);",
             "0.80·IF i reads \"at its typical activation input i supplies 80% of the output's typical activation\".",
             "+ terms are OR-like (any of them drives the output), − terms AND-NOT-like (they hold it down).", "",
             "| output | held-out firings | held-out FVU | formula |", "|---:|---:|---:|---|"]
    order = sorted(range(len(found)), key=lambda j: -int(firings[j]))
    for j in order:
        f = found[j]
        formula = _formula_md(f, browser_in, browser_out, from_dir)
        lines.append(f"| {f.output} | {int(firings[j])} | {f.fvu:.3f} | {formula} |")
    return "\n".join(lines) + "\n"


def write_annotations(cache_out: str | Path, found, browser_in, lam: float) -> Path:
    """<cache_out>/annotations/connect.json: each output feature's formula, inputs linked (from its browser)."""
    features = {}
    here = default_browser(cache_out)
    for f in found:
        links = [{"text": f"IF {i} ({w:+.2f})", "href": feature_href(browser_in, here, i)} for i, w in f.terms[:6]
                 if browser_in]
        entry = {"text": f"{f.text()} (sparse linear connector, L1 {lam:g}; held-out FVU {f.fvu:.3f})"}
        if links:
            entry["links"] = links
        features[str(f.output)] = entry
    path = Path(cache_out) / "annotations" / "connect.json"
    io.write_json(path, {"title": "Computed from the MLP's input features", "features": features})
    return path


def summary_text(report: dict) -> str:
    lines = ["connectors (held-out FVU of F2): " + ", ".join(f"{k} {v['heldout_fvu']:.4f}"
                                                          for k, v in report["connectors"].items())]
    if "linearity" in report:
        lin = report["linearity"]
        lines.append(f"linear features (nonlinearity <= {lin['threshold']:g}, per-layer units as the seed): "
                     f"{lin['linear']} of {lin['judged']} judged ({lin['fraction_linear']:.1%}; "
                     f"{lin.get('negative', 0)} below 0)")
    stops = {k: v["fit"].get("stopped") for k, v in report["connectors"].items() if isinstance(v.get("fit"), dict)}
    lines += [f"  {k}: {why}" for k, why in stops.items()]
    ce = report.get("ce_threshold")
    if ce:
        t = ce["threshold"]
        lines.append(f"CE-based threshold: {t if t is None else f'{t:g}'} -> {ce['fraction_linear']:.1%} linear "
                     f"(CE clean {ce['ce_clean']:.4f}, MLP out ablated {ce['ce_mlp_out_ablated']:.4f})")
    sweep = report["l1_sweep"]
    p = sweep["points"][sweep["elbow"]]
    lines.append(f"elbow of the L1 sweep: λ = {p['l1_coefficient']:g}, FVU {p['heldout_fvu']:.4f}, "
                 f"{p['terms_per_output']:.2f} terms per output feature")
    sos = report["sae_on_sae"]
    reached = "" if sos.get("reached", True) else f" (target <= {sos['target_hidden_l0']:g} not reached)"
    lines.append(f"SAE on SAE: hidden L0 {sos['hidden_l0']:.1f} of {sos['hidden']} at hidden L1 "
                 f"{sos.get('hidden_l1', 0):g}{reached} (dense MLP: {sos['dense_mlp_hidden_l0']}), "
                 f"FVU {sos['heldout_fvu']:.4f}")
    lines += [f"  {s['formula']}   [OF top tokens {s['output']['top_tokens']}]" for s in report["showcase"]]
    return "\n".join(lines)
