"""`fastsae connect` as a function: SAEs at an MLP's input and output + a store holding both sites ->
connectors, how linear each output feature is, sparse linear formulas, SAE on SAE, and a report:

    out/connect.json       losses of the four connectors, per-feature nonlinearity, fraction linear (seed threshold
                           and the CE-based one), the L1 sweep and its elbow, formulas, SAE-on-SAE, outliers
    out/pareto.png         held-out FVU against the L1 norm of the weights, one point per L1 coefficient
    out/nonlinearity.png   histogram of per-feature nonlinearity with the thresholds
    out/formulas.md        the formula table (each input linked to its browser page when --browser-in is given)

The CE-based threshold ("when is substituting the linear prediction negligible?"): output features are
replaced by their linear predictions in the model's forward at the MLP output site, keeping the SAE's
error and every other feature as they are (x_out + Σ_{j linear} (ŷ_j - f_j) W_dec[j]), for features with
nonlinearity <= t over a grid of t. The threshold is the largest t whose next-token CE increase stays
within ce_budget (default 1%) of the increase from zero-ablating the MLP output: the linear substitution
keeps >= 99% of the CE loss the MLP recovers.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import io
from ..features.browser_links import default_browser, feature_href
from .connections import (
    KINDS,
    LSTSQ_MAX_INPUTS,
    ConnectConfig,
    ConnectionData,
    Connector,
    elbow,
    evaluate,
    fit_linear,
    formulas,
    l1_sweep,
    nonlinearity,
    normal_equations,
    refit,
    train_connector,
)

# λ on the standardised weights (connect.weight_penalty): at λ the lasso shrinks a standardised weight by about
# λ/2, and real connections have standardised weights of 0.1-1, so 0.01-1 spans "nothing pruned" to "most".
L1_COEFFICIENTS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
MIN_FIRINGS = 20  # held-out firings a feature needs before its nonlinearity is judged (fewer: noise)
SHOWCASE = 5  # formulas shown with their features' top tokens


# ---- CE-based threshold ------------------------------------------------------------------------------

def _codes_for(data: ConnectionData, sae, x: Tensor, which: str) -> tuple[Tensor, Tensor]:
    """SAE codes of x (M, d) compacted onto data's input or output features and normalised like data."""
    lat = sae.encode(x.to(sae.dtype))
    feats, scale = (data.in_features, data.scale_in) if which == "in" else (data.out_features, data.scale_out)
    lookup = torch.full((lat.d_sae,), -1, dtype=torch.int64, device=x.device)
    lookup[feats.to(x.device)] = torch.arange(feats.shape[0], device=x.device)
    idx = lookup[lat.indices]
    ok = (idx >= 0) & (lat.values > 0)
    return torch.where(ok, lat.values.float(), 0.0) / scale, torch.where(ok, idx, 0)


@torch.no_grad()
def substitution_ce(model, site_in: str, site_out: str, sae_in, sae_out, data: ConnectionData, linear: Connector,
                    masks: list[Tensor | None], windows: Tensor, keep: Tensor, batch_size: int = 8) -> list[float]:
    """Mean next-token CE over kept positions for each mask (n_out,) bool of output features to replace by
    their linear prediction; None = the clean model, "ablate" = the site's output zeroed."""
    from ...model import hook_sites

    device = next(model.parameters()).device
    w_dec = sae_out.W_dec.detach().float()[data.out_features.to(device)]  # (n_out, d)
    state: dict = {}  # this forward's mask, kept positions and recorded MLP input

    def record(x: Tensor) -> None:
        state["in"] = x

    def replace(x: Tensor) -> Tensor | None:
        mask, keep_here = state["mask"], state["keep"][..., None]
        if mask is None:
            return None
        if isinstance(mask, str):  # "ablate"
            return torch.where(keep_here, torch.zeros_like(x), x)
        x_in = state["in"]
        xv, xi = _codes_for(data, sae_in, x_in.reshape(-1, x_in.shape[-1]), "in")
        pred = linear(xv, xi) * data.scale_out  # (M, n_out) raw units
        yv, yi = _codes_for(data, sae_out, x.reshape(-1, x.shape[-1]), "out")
        actual = torch.zeros_like(pred).scatter_add_(1, yi, yv * data.scale_out)
        delta = ((pred - actual) * mask.to(x.device)) @ w_dec  # (M, d): only the substituted features move
        return torch.where(keep_here, x + delta.reshape(x.shape).to(x.dtype), x)

    totals, count = [0.0] * len(masks), 0
    with hook_sites(model, {site_in: record, site_out: replace}):
        for first in range(0, windows.shape[0], batch_size):
            ids, k = windows[first:first + batch_size].to(device), keep[first:first + batch_size].to(device)
            target, mask_pos = ids[:, 1:], k[:, 1:]  # CE of predicting each kept token from its prefix
            count += int(mask_pos.sum())
            for m, mask in enumerate(masks):
                state.update(mask=mask, keep=k)
                logits = model(input_ids=ids).logits[:, :-1].float()
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
                totals[m] += float(ce.reshape(target.shape)[mask_pos].double().sum())
    return [t / max(1, count) for t in totals]


def ce_threshold(model, site_in: str, site_out: str, sae_in, sae_out, data: ConnectionData, linear: Connector,
                 delta: Tensor, windows: Tensor, keep: Tensor, *, budget: float = 0.01, grid: list[float] | None = None,
                 batch_size: int = 8) -> dict:
    """The largest nonlinearity threshold t whose linear substitution costs <= budget of the MLP-ablation CE
    increase (see the module docstring). delta (n_out,): per-feature nonlinearity (NaN: not judged)."""
    judged = ~torch.isnan(delta)
    if grid is None:  # quantiles of the judged features' nonlinearity: every step adds ~10% of them
        qs = torch.quantile(delta[judged].double(), torch.linspace(0, 1, 11, dtype=torch.float64))
        grid = sorted(set(round(float(q), 6) for q in qs))
    masks: list = [None, "ablate"] + [judged & (delta <= t) for t in grid]
    ce = substitution_ce(model, site_in, site_out, sae_in, sae_out, data, linear, masks, windows, keep, batch_size)
    clean, ablated = ce[0], ce[1]
    allowed = budget * (ablated - clean)
    curve = [{"threshold": t, "features_substituted": int(m.sum()), "ce": c, "ce_increase": c - clean}
             for t, m, c in zip(grid, masks[2:], ce[2:], strict=True)]
    ok = [p for p in curve if p["ce_increase"] <= allowed]
    chosen = max(ok, key=lambda p: p["threshold"]) if ok else None
    return {"ce_clean": clean, "ce_mlp_out_ablated": ablated, "budget": budget, "allowed_increase": allowed,
            "threshold": chosen["threshold"] if chosen else None,
            "fraction_linear": (chosen["features_substituted"] / max(1, int(judged.sum()))) if chosen else 0.0,
            "curve": curve}


def eval_windows(store, tokenizer, tokens: int) -> tuple[Tensor, Tensor]:
    """Held-out windows: from the test split when the store was harvested from a built-in corpus's train split
    ("english:train" -> "english:test"), else the far end of the harvest's shuffled window order (as
    fastsae eval takes them)."""
    from ...harvest.corpus import read_documents, token_windows
    from ...model import keep_mask

    source = store.meta.get("source", {})
    context = source.get("context_size", store.meta["context_size"])
    corpus = str(source.get("corpus", "english-classics"))
    held_out = corpus.endswith(":train")
    if held_out:
        corpus = corpus.removesuffix(":train") + ":test"
    windows = token_windows(tokenizer, read_documents(corpus, source.get("text_field", "text")), context,
                            seed=source.get("window_seed", 0))
    n = max(1, tokens // context)
    windows = windows[:n] if held_out else windows[-n:]
    return windows, keep_mask(windows, store.meta["excluded_token_ids"])


# ---- plots ---------------------------------------------------------------------------------------------

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
    ax.set_xlabel("nonlinearity = (mse_linear − mse_mlp) / energy, per output feature (held out)")
    ax.set_ylabel("output features")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


# ---- the report ---------------------------------------------------------------------------------------

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


def run_connect(sae_in: str, sae_out: str, store: str, out: str | Path, *, site_in: str | None = None,
                site_out: str | None = None, cfg: ConnectConfig | None = None, kinds: tuple[str, ...] = KINDS,
                threshold: float = 0.001, l1_coefficients: tuple[float, ...] = L1_COEFFICIENTS,
                linear_only: bool = False, sae_hidden_l1: float = 1e-3, sae_weight_l1: float = 0.01,
                ce: bool = True, ce_budget: float = 0.01,
                eval_tokens: int = 2048, holdout: float = 0.1, max_outputs: int | None = None,
                browser_in: str | None = None, browser_out: str | None = None, cache_out: str | None = None,
                progress: bool = True) -> dict:
    """Train the connectors between SAE features at an MLP's input and output and write the report (module
    docstring). max_outputs: learn only the most frequent output features (for large dictionaries)."""
    from ...harvest import ActivationStore
    from ...sae import SAE
    from ..features.store_contexts import StoreContexts, encode_store, top_rows

    cfg = cfg or ConnectConfig()
    out = Path(out)
    s_in, s_out = SAE.load(sae_in), SAE.load(sae_out)
    site_in = site_in or s_in.metadata.get("site")
    site_out = site_out or s_out.metadata.get("site")
    if not site_in or not site_out:
        raise ValueError("the SAEs do not record their sites (metadata): pass --site-in and --site-out")
    st = ActivationStore(store)
    for site in (site_in, site_out):
        if site not in st.sites:
            raise ValueError(f"--store {store} holds {sorted(st.sites)}, not {site!r}: harvest both sites in one "
                             f"pass (fastsae harvest --sites {site_in} {site_out})")
    log = print if progress else (lambda *a, **k: None)
    log(f"encoding {st.tokens:,} tokens at {site_in} and {site_out}")
    f1, f2 = encode_store(s_in, st, site_in), encode_store(s_out, st, site_out)
    outputs = None
    if max_outputs is not None:
        counts = f2.fire_counts()
        outputs = torch.argsort(counts, descending=True, stable=True)[:max_outputs]
        outputs = outputs[counts[outputs] > 0].sort().values
    data = ConnectionData.from_codes(f1, f2, holdout=holdout, outputs=outputs)
    report: dict = {"sae_in": sae_in, "sae_out": sae_out, "store": str(store), "site_in": site_in,
                    "site_out": site_out,
                    "tokens": {"train": data.n_train, "heldout": f1.values.shape[0] - data.n_train},
                    "features": {"in": data.n_in, "out": data.n_out}, "config": dataclasses.asdict(cfg),
                    "normalisation": {"scale_in": data.scale_in, "scale_out": data.scale_out,
                                      "rule": "codes / sqrt(E_tokens ||F||^2) per layer over training tokens"}}
    connectors, evals, method = {}, {}, {}
    exact = data.n_in + cfg.bias <= LSTSQ_MAX_INPUTS
    equations = normal_equations(data, bias=cfg.bias) if exact else None
    for kind in kinds:
        if kind == "linear" and exact:
            log("fitting the linear connector by least squares")
            connectors[kind], method[kind] = fit_linear(data, cfg, equations=equations), "least squares"
        else:
            log(f"training the {kind} connector ({cfg.steps} Adam steps)")
            connectors[kind] = train_connector(data, kind, cfg, progress=progress)
            method[kind] = f"Adam, {cfg.steps} steps"
        evals[kind] = evaluate(connectors[kind], data)
    report["connectors"] = {k: {"heldout_fvu": e.fvu, "hidden_l0": e.hidden_l0, "fit": method[k]}
                            for k, e in evals.items()}
    files = []
    if "linear" in evals and "mlp" in evals:
        report.update(_linearity(data, evals, threshold))
        delta = torch.tensor([math.nan if v is None else v for v in report["per_feature"]["nonlinearity"]])
        ce_result = None
        if ce:
            ce_result = _ce(st, s_in, s_out, site_in, site_out, data, connectors["linear"], delta, ce_budget,
                            eval_tokens, log)
            report["ce_threshold"] = ce_result
        plot = nonlinearity_plot(out / "nonlinearity.png", delta, {
            "seed threshold": threshold, "CE threshold": ce_result["threshold"] if ce_result else None})
        files += [plot] if plot else []
    else:
        delta = None
    # sparse linear connections
    lin_ids = None
    if linear_only and delta is not None:
        lin_ids = ((delta <= threshold) & ~torch.isnan(delta)).nonzero().squeeze(1)
    log(f"L1 sweep over {len(l1_coefficients)} coefficients"
        + (f", restricted to {lin_ids.shape[0]} linear features" if lin_ids is not None else ""))
    points = l1_sweep(data, l1_coefficients, cfg, outputs=lin_ids, progress=progress)
    knee = elbow(points)
    report["l1_sweep"] = {"points": [{"l1_coefficient": p.l1_coefficient, "heldout_fvu": p.eval.fvu,
                                      "l1_norm_per_output": p.l1_norm, "terms_per_output": p.connections}
                                     for p in points],
                          "elbow": knee, "restricted_to_linear": lin_ids is not None}
    plot = pareto_plot(out / "pareto.png", points, knee)
    files += [plot] if plot else []
    best = points[knee]
    sparse = best.connector
    if equations is not None:  # relaxed lasso: least squares on the inputs L1 kept (undoes the shrinkage)
        sub = equations if lin_ids is None else (equations[0], equations[1][:, lin_ids])
        sparse = refit(best.connector, data, outputs=lin_ids, equations=sub)
    sparse_eval = evaluate(sparse, data, outputs=lin_ids)
    report["l1_sweep"]["elbow_refit"] = {"applied": equations is not None, "heldout_fvu": sparse_eval.fvu}
    found = formulas(sparse, data, sparse_eval, outputs=lin_ids)
    # SAE on SAE: the MLP connector with L1 on its hidden activations (and, lightly, on its weights)
    log("training the SAE-on-SAE connector")
    sae_cfg = dataclasses.replace(cfg, hidden_l1=sae_hidden_l1, weight_l1=sae_weight_l1)
    sos = evaluate(train_connector(data, "mlp", sae_cfg, progress=progress), data)
    report["sae_on_sae"] = {"hidden": cfg.hidden, "hidden_l1": sae_hidden_l1, "weight_l1": sae_cfg.weight_l1,
                            "hidden_l0": sos.hidden_l0, "heldout_fvu": sos.fvu,
                            "dense_mlp_hidden_l0": evals["mlp"].hidden_l0 if "mlp" in evals else None}
    # contexts for the showcase and the outliers
    tokenizer = _tokenizer(st)
    contexts = StoreContexts(st, tokenizer)

    def top(codes, feature, n=10):
        rows = top_rows(codes, feature, n)
        return {"top_tokens": [t for t, _ in Counter(contexts.token(int(contexts.token_ids[r])) for r in rows)
                               .most_common(5)],
                "examples": [_render(ex) for ex in contexts.examples(codes, feature, rows[:3])]}

    firings = evals["linear"].firings if "linear" in evals else best.eval.firings
    out_firings = firings if lin_ids is None else firings[lin_ids]
    showcase = _showcase(found, out_firings, delta if lin_ids is None else None, threshold)
    report["showcase"] = [{"formula": f.text(), "heldout_fvu": f.fvu, "output": {"feature": f.output,
                                                                                 **top(f2, f.output)},
                           "inputs": [{"feature": i, "weight": w, **top(f1, i)} for i, w in f.terms[:4]]}
                          for f in showcase]
    if delta is not None:
        order = torch.argsort(torch.nan_to_num(delta, nan=-math.inf), descending=True)[:10]
        report["outliers"] = [{"feature": int(data.out_features[j]), "nonlinearity": float(delta[j]),
                               **top(f2, int(data.out_features[j]))} for j in order.tolist()]
    report["formulas"] = [{"output": f.output, "terms": f.terms, "heldout_fvu": f.fvu, "text": f.text()}
                          for f in found]
    md = _formula_table(found, out_firings, browser_in, browser_out, out)
    io.atomic_write(out / "formulas.md", lambda tmp: Path(tmp).write_text(md))
    files.append(out / "formulas.md")
    if cache_out:
        files.append(_annotate(cache_out, found, browser_in, best.l1_coefficient))
    io.write_json(out / "connect.json", report)
    files.insert(0, out / "connect.json")
    log(summary_text(report))
    log("written: " + ", ".join(str(f) for f in files))
    return report


def _linearity(data: ConnectionData, evals: dict, threshold: float) -> dict:
    lin, mlp = evals["linear"], evals["mlp"]
    delta = nonlinearity(lin, mlp)
    judged = (lin.firings >= MIN_FIRINGS) & ~torch.isnan(delta)
    delta = torch.where(judged, delta, math.nan)
    d = delta[judged].double()
    linear = judged & (delta <= threshold)
    qs = torch.quantile(d, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)) if d.numel() else None
    return {"linearity": {"threshold": threshold, "judged": int(judged.sum()), "min_heldout_firings": MIN_FIRINGS,
                          "linear": int(linear.sum()), "fraction_linear": float(linear.sum() / max(1, judged.sum())),
                          "nonlinearity_quantiles": dict(zip(("10%", "25%", "50%", "75%", "90%"),
                                                             qs.tolist(), strict=True)) if qs is not None else {}},
            "per_feature": {"feature": data.out_features.tolist(),
                            "nonlinearity": [None if math.isnan(v) else round(v, 6) for v in delta.tolist()],
                            "heldout_firings": lin.firings.tolist(),
                            "mse_linear": [round(v, 8) for v in lin.mse.tolist()],
                            "mse_mlp": [round(v, 8) for v in mlp.mse.tolist()],
                            "energy": [round(v, 8) for v in lin.energy.tolist()]}}


def _ce(st, s_in, s_out, site_in, site_out, data, linear, delta, budget, eval_tokens, log) -> dict | None:
    from ...model import load

    try:
        model, tokenizer = load(st.meta["model"])
    except Exception as err:  # noqa: BLE001 — the report goes on without the model
        log(f"CE threshold skipped: cannot load {st.meta['model']!r} ({err})")
        return None
    if not getattr(model, "can_generate", lambda: False)():
        log("CE threshold skipped: the model has no next-token loss")
        return None
    windows, keep = eval_windows(st, tokenizer, eval_tokens)
    log(f"CE threshold: substituting linear predictions on {windows.numel():,} held-out tokens")
    return ce_threshold(model, site_in, site_out, s_in, s_out, data, linear, delta, windows, keep, budget=budget)


def _tokenizer(st):
    from ...model import load

    try:
        return load(st.meta["model"])[1]
    except Exception:  # noqa: BLE001 — tokens are then shown as ids
        return None


def _render(ex) -> str:
    """A context as text with the peak token in [[ ]]."""
    peak = max(range(len(ex.activations)), key=ex.activations.__getitem__)
    return "".join(f"[[{t}]]" if i == peak else t for i, t in enumerate(ex.tokens))


def _showcase(found, firings: Tensor, delta: Tensor | None, threshold: float) -> list:
    """Five readable formulas: linear output features (when judged) with 1-4 terms, the most frequent first."""
    def ok(j, f):
        linear = delta is None or (not math.isnan(float(delta[j])) and float(delta[j]) <= threshold)
        return linear and 1 <= len(f.terms) <= 4 and f.fvu < 0.5
    ranked = sorted((j for j, f in enumerate(found) if ok(j, f)), key=lambda j: -int(firings[j]))
    return [found[j] for j in ranked[:SHOWCASE]]


def _formula_table(found, firings: Tensor, browser_in, browser_out, from_dir: Path) -> str:
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


def _annotate(cache_out: str | Path, found, browser_in, lam: float) -> Path:
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
        lines.append(f"linear features (nonlinearity <= {lin['threshold']:g}): {lin['linear']} of {lin['judged']} "
                     f"judged ({lin['fraction_linear']:.1%})")
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
    lines.append(f"SAE on SAE: hidden L0 {sos['hidden_l0']:.1f} of {sos['hidden']} (dense MLP: "
                 f"{sos['dense_mlp_hidden_l0']}), FVU {sos['heldout_fvu']:.4f}")
    lines += [f"  {s['formula']}   [OF top tokens {s['output']['top_tokens']}]" for s in report["showcase"]]
    return "\n".join(lines)
