"""`fastsae connect` as a function: SAEs at an MLP's input and output + a store holding both sites ->
connectors, how linear each output feature is, sparse linear formulas, SAE on SAE, and a report:

    out/connect.json       losses of the four connectors and why each stopped, per-feature nonlinearity (the
                           seed's: per-layer units), % linear (seed threshold and the CE-based one), the L1 sweep
                           and its elbow, formulas (linear features only by default), the SAE-on-SAE sweep, outliers
    out/checkpoints/       each trained connector (connect_checkpoint.py): a rerun into out resumes
    out/pareto.png         held-out FVU against the L1 norm of the weights, one point per L1 coefficient
    out/nonlinearity.png   histogram of per-feature nonlinearity with the thresholds
    out/formulas.md        the formula table (each input linked to its browser page when --browser-in is given)

The connectors: connections.py and linear_connections.py; the CE-based threshold: linear_substitution.py; the
plots, tables and summary: connect_report.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import torch

from ... import io
from .connect_checkpoint import ConnectorCheckpoints
from .connect_report import (
    formula_table,
    nonlinearity_plot,
    pareto_plot,
    pick_showcase,
    render_context,
    summary_text,
    write_annotations,
)
from .connections import (
    KINDS,
    ConnectConfig,
    ConnectionData,
    evaluate,
    nonlinearity,
    relative_nonlinearity,
)
from .connector_training import train_connector
from .linear_connections import LSTSQ_MAX_INPUTS, elbow, fit_linear, formulas, l1_sweep, normal_equations, refit
from .linear_substitution import ce_threshold, eval_windows

SAE_ON_SAE_MAX_L0 = 30  # the SAE-on-SAE sweep raises its hidden L1 until the hidden L0 is at most this (seed: 25)
SAE_ON_SAE_STEPS = 12  # at most this many hidden L1 coefficients, each 3x the last
# λ on the standardised weights (connections.weight_penalty): at λ the lasso shrinks a standardised weight by about
# λ/2, and real connections have standardised weights of 0.1-1, so 0.01-1 spans "nothing pruned" to "most".
L1_COEFFICIENTS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
MIN_FIRINGS = 20  # held-out firings a feature needs before its nonlinearity is judged (fewer: noise)


def run_connect(sae_in: str, sae_out: str, store: str, out: str | Path, *, site_in: str | None = None,
                site_out: str | None = None, cfg: ConnectConfig | None = None, kinds: tuple[str, ...] = KINDS,
                threshold: float = 0.001, l1_coefficients: tuple[float, ...] = L1_COEFFICIENTS,
                linear_only: bool = True, sae_hidden_l1: float = 1e-3, sae_weight_l1: float = 0.01,
                sae_max_l0: float = SAE_ON_SAE_MAX_L0, resume: bool = True,
                ce: bool = True, ce_budget: float = 0.01,
                eval_tokens: int = 2048, holdout: float = 0.1, max_outputs: int | None = None,
                browser_in: str | None = None, browser_out: str | None = None, cache_out: str | None = None,
                progress: bool = True) -> dict:
    """Train the connectors between SAE features at an MLP's input and output and write the report (module
    docstring). max_outputs: learn only the most frequent output features (for large dictionaries).
    linear_only: the L1 sweep and formulas cover the linear features only (as the seed). sae_hidden_l1: the
    first hidden L1 of the SAE-on-SAE sweep, raised 3x at a time until hidden L0 <= sae_max_l0. resume: load
    the connectors already in out/checkpoints (same settings) instead of training them again."""
    cfg = cfg or ConnectConfig()
    out = Path(out)
    log = print if progress else (lambda *a, **k: None)
    inputs = _Inputs(sae_in, sae_out, store, site_in, site_out)
    f1, f2, data = inputs.encode(holdout, max_outputs, log)
    report: dict = {"sae_in": sae_in, "sae_out": sae_out, "store": str(store), "site_in": inputs.site_in,
                    "site_out": inputs.site_out,
                    "tokens": {"train": data.n_train, "heldout": f1.values.shape[0] - data.n_train},
                    "features": {"in": data.n_in, "out": data.n_out}, "config": dataclasses.asdict(cfg),
                    "normalisation": {"scale_in": data.scale_in, "scale_out": data.scale_out,
                                      "rule": "codes / sqrt(E_tokens ||F||^2) per layer over training tokens"}}
    checkpoints = ConnectorCheckpoints(out / "checkpoints", {
        "sae_in": str(sae_in), "sae_out": str(sae_out), "store": str(store), "sites": [inputs.site_in,
                                                                                       inputs.site_out],
        "n_train": data.n_train, "n_in": data.n_in, "n_out": data.n_out, "scales": [data.scale_in, data.scale_out],
        "outputs": data.out_features.tolist()}, enabled=resume)
    connectors, evals, equations = _fit_connectors(data, cfg, kinds, report, log, progress, checkpoints)
    files = []
    delta = None
    if "linear" in evals and "mlp" in evals:
        delta = _judge_linearity(inputs, data, connectors["linear"], evals, threshold, ce, ce_budget, eval_tokens,
                                 report, files, out, log)
    lin_ids = None
    if linear_only and delta is not None:
        lin_ids = ((delta <= threshold) & ~torch.isnan(delta)).nonzero().squeeze(1)
        if lin_ids.numel() == 0:
            log("no output feature is linear: the L1 sweep and formulas cover every feature")
            lin_ids = None
    best, found = _sparse_connections(data, cfg, l1_coefficients, lin_ids, equations, report, files, out, log,
                                      progress, checkpoints)
    report["sae_on_sae"] = _sae_on_sae(data, cfg, sae_hidden_l1, sae_weight_l1, sae_max_l0, evals, log, progress,
                                       checkpoints)
    report["checkpoints"] = {"directory": str(out / "checkpoints"), "resumed": checkpoints.resumed}
    firings = evals["linear"].firings if "linear" in evals else best.eval.firings
    out_firings = firings if lin_ids is None else firings[lin_ids]
    _examples(inputs, f1, f2, data, found, out_firings, delta, lin_ids, threshold, report)
    report["formulas"] = [{"output": f.output, "terms": f.terms, "heldout_fvu": f.fvu, "text": f.text()}
                          for f in found]
    md = formula_table(found, out_firings, browser_in, browser_out, out)
    io.atomic_write(out / "formulas.md", lambda tmp: Path(tmp).write_text(md))
    files.append(out / "formulas.md")
    if cache_out:
        files.append(write_annotations(cache_out, found, browser_in, best.l1_coefficient))
    io.write_json(out / "connect.json", report)
    files.insert(0, out / "connect.json")
    log(summary_text(report))
    log("written: " + ", ".join(str(f) for f in files))
    return report


class _Inputs:
    """The two SAEs, their sites and the activation store that holds both sites."""

    def __init__(self, sae_in: str, sae_out: str, store: str, site_in: str | None, site_out: str | None):
        from ...harvest import ActivationStore
        from ...sae import SAE

        self.s_in, self.s_out = SAE.load(sae_in), SAE.load(sae_out)
        for name, sae in (("sae_in", self.s_in), ("sae_out", self.s_out)):
            if sae.cfg.kind != "sae":  # its encoder reads its in-site only: it cannot code the other side
                raise ValueError(f"{name}: connect learns the map between an SAE at an MLP's input and one at its "
                                 f"output; {name} is a {sae.cfg.kind}, which is that map already (its latents "
                                 f"read {sae.metadata.get('site')!r} and write {sae.metadata.get('out_site')!r})")
        self.site_in = site_in or self.s_in.metadata.get("site")
        self.site_out = site_out or self.s_out.metadata.get("site")
        if not self.site_in or not self.site_out:
            raise ValueError("the SAEs do not record their sites (metadata): pass --site-in and --site-out")
        self.st = ActivationStore(store)
        for site in (self.site_in, self.site_out):
            if site not in self.st.sites:
                raise ValueError(f"--store {store} holds {sorted(self.st.sites)}, not {site!r}: harvest both sites "
                                 f"in one pass (fastsae harvest --sites {self.site_in} {self.site_out})")

    def encode(self, holdout: float, max_outputs: int | None, log):
        """(F1, F2, ConnectionData): both SAEs' codes over the store, and the data the connectors learn from
        (only the max_outputs most frequent output features, when given)."""
        from ..features.store_contexts import encode_store

        log(f"encoding {self.st.tokens:,} tokens at {self.site_in} and {self.site_out}")
        f1, f2 = encode_store(self.s_in, self.st, self.site_in), encode_store(self.s_out, self.st, self.site_out)
        outputs = None
        if max_outputs is not None:
            counts = f2.fire_counts()
            outputs = torch.argsort(counts, descending=True, stable=True)[:max_outputs]
            outputs = outputs[counts[outputs] > 0].sort().values
        return f1, f2, ConnectionData.from_codes(f1, f2, holdout=holdout, outputs=outputs)


def _fit_connectors(data: ConnectionData, cfg: ConnectConfig, kinds: tuple[str, ...], report: dict, log,
                    progress: bool, checkpoints: ConnectorCheckpoints):
    """(connectors, their held-out evaluations, the normal equations or None), each kind by kind, linear first;
    the linear one by least squares when its inputs are few enough (LSTSQ_MAX_INPUTS), the others with Adam and
    the stopping rule, the MLP kinds from the linear one (skip path, so nonlinearity >= 0 from the start)."""
    connectors, evals, method = {}, {}, {}
    exact = data.n_in + cfg.bias <= LSTSQ_MAX_INPUTS
    equations = normal_equations(data, bias=cfg.bias) if exact else None
    for kind in sorted(kinds, key=lambda k: k != "linear"):
        linear = connectors.get("linear") if kind.startswith("mlp") and cfg.skip else None
        if kind == "linear" and exact:
            log("fitting the linear connector by least squares")
            connectors[kind] = fit_linear(data, cfg, equations=equations)
            connectors[kind].fit_info = {"stopped": "least squares (exact)"}
        else:
            log(f"training the {kind} connector (Adam, at most {cfg.steps} steps)")
            settings = {"kind": kind, "cfg": dataclasses.asdict(cfg), "skip_start": linear is not None,
                        "linear_exact": exact}
            connectors[kind] = checkpoints.fit(kind, settings, lambda kind=kind, linear=linear: train_connector(
                data, kind, cfg, progress=progress, init_linear=linear))
        method[kind] = connectors[kind].fit_info
        evals[kind] = evaluate(connectors[kind], data)
    report["connectors"] = {k: {"heldout_fvu": evals[k].fvu, "hidden_l0": evals[k].hidden_l0, "fit": method[k]}
                            for k in kinds}
    return connectors, evals, equations


def _judge_linearity(inputs: _Inputs, data: ConnectionData, linear, evals: dict, threshold: float, ce: bool,
                     ce_budget: float, eval_tokens: int, report: dict, files: list, out: Path, log):
    """Per-feature nonlinearity (NaN: not judged) with the seed's and the CE-based thresholds, into the report
    and nonlinearity.png."""
    report.update(_linearity(data, evals, threshold))
    delta = torch.tensor([math.nan if v is None else v for v in report["per_feature"]["nonlinearity"]])
    ce_result = None
    if ce:
        ce_result = _ce(inputs.st, inputs.s_in, inputs.s_out, inputs.site_in, inputs.site_out, data, linear, delta,
                        ce_budget, eval_tokens, log)
        report["ce_threshold"] = ce_result
    plot = nonlinearity_plot(out / "nonlinearity.png", delta, {
        "seed threshold": threshold, "CE threshold": ce_result["threshold"] if ce_result else None})
    files += [plot] if plot else []
    return delta


def _sparse_connections(data: ConnectionData, cfg: ConnectConfig, l1_coefficients, lin_ids, equations,
                        report: dict, files: list, out: Path, log, progress: bool, checkpoints):
    """(the sweep's elbow point, its formulas): the L1 sweep (on the linear features only, given lin_ids), its
    elbow refitted by least squares on the inputs L1 kept (the relaxed lasso) when the equations are at hand."""
    log(f"L1 sweep over {len(l1_coefficients)} coefficients"
        + (f", restricted to {lin_ids.shape[0]} linear features" if lin_ids is not None else ""))
    points = l1_sweep(data, l1_coefficients, cfg, outputs=lin_ids, progress=progress, checkpoints=checkpoints)
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
    return best, formulas(sparse, data, sparse_eval, outputs=lin_ids)


def _sae_on_sae(data: ConnectionData, cfg: ConnectConfig, hidden_l1: float, weight_l1: float, max_l0: float,
                evals: dict, log, progress: bool, checkpoints: ConnectorCheckpoints) -> dict:
    """SAE on SAE: the MLP connector (no skip path: all of F2 goes through its hidden layer) with L1 on its hidden
    activations (and, lightly, on its weights), the hidden L1 raised 3x at a time from hidden_l1 until the
    held-out hidden L0 is <= max_l0 (or SAE_ON_SAE_STEPS coefficients are spent). The result is the first point
    that reaches it (else the sparsest), with the whole sweep."""
    points, lam = [], hidden_l1
    for _ in range(SAE_ON_SAE_STEPS):
        sae_cfg = dataclasses.replace(cfg, hidden_l1=lam, weight_l1=weight_l1, skip=False)
        log(f"training the SAE-on-SAE connector, hidden L1 {lam:g}")
        conn = checkpoints.fit(f"sae_on_sae_{lam:g}", {"kind": "mlp", "cfg": dataclasses.asdict(sae_cfg)},
                               lambda sae_cfg=sae_cfg: train_connector(data, "mlp", sae_cfg, progress=progress))
        ev = evaluate(conn, data)
        points.append({"hidden_l1": lam, "hidden_l0": ev.hidden_l0, "heldout_fvu": ev.fvu, "fit": conn.fit_info})
        if ev.hidden_l0 <= max_l0:
            break
        lam *= 3
    chosen = points[-1]
    return {"hidden": cfg.hidden, "weight_l1": weight_l1, "target_hidden_l0": max_l0,
            "reached": chosen["hidden_l0"] <= max_l0, "hidden_l1": chosen["hidden_l1"],
            "hidden_l0": chosen["hidden_l0"], "heldout_fvu": chosen["heldout_fvu"], "sweep": points,
            "dense_mlp_hidden_l0": evals["mlp"].hidden_l0 if "mlp" in evals else None}


def _examples(inputs: _Inputs, f1, f2, data: ConnectionData, found, out_firings, delta, lin_ids, threshold: float,
              report: dict) -> None:
    """The showcase formulas and the most nonlinear features, with their features' top tokens and contexts."""
    from ..features.store_contexts import StoreContexts, top_rows

    contexts = StoreContexts(inputs.st, _tokenizer(inputs.st))

    def top(codes, feature, n=10):
        rows = top_rows(codes, feature, n)
        return {"top_tokens": [t for t, _ in Counter(contexts.token(int(contexts.token_ids[r])) for r in rows)
                               .most_common(5)],
                "examples": [render_context(ex) for ex in contexts.examples(codes, feature, rows[:3])]}

    showcase = pick_showcase(found, out_firings, delta if lin_ids is None else None, threshold)
    report["showcase"] = [{"formula": f.text(), "heldout_fvu": f.fvu, "output": {"feature": f.output,
                                                                                 **top(f2, f.output)},
                           "inputs": [{"feature": i, "weight": w, **top(f1, i)} for i, w in f.terms[:4]]}
                          for f in showcase]
    if delta is not None:
        order = torch.argsort(torch.nan_to_num(delta, nan=-math.inf), descending=True)[:10]
        report["outliers"] = [{"feature": int(data.out_features[j]), "nonlinearity": float(delta[j]),
                               **top(f2, int(data.out_features[j]))} for j in order.tolist()]


def _linearity(data: ConnectionData, evals: dict, threshold: float) -> dict:
    """The seed's % linear: nonlinearity (mse_linear - mse_mlp in per-layer units) <= threshold, over the output
    features with >= MIN_FIRINGS held-out firings; the per-feature-energy variant beside it, labelled."""
    lin, mlp = evals["linear"], evals["mlp"]
    judged = (lin.firings >= MIN_FIRINGS) & (lin.energy > 0)
    delta = torch.where(judged, nonlinearity(lin, mlp), math.nan)
    relative = torch.where(judged, relative_nonlinearity(lin, mlp), math.nan)
    d = delta[judged].double()
    linear = judged & (delta <= threshold)
    n = max(1, int(judged.sum()))
    qs = torch.quantile(d, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)) if d.numel() else None
    return {"linearity": {"rule": "nonlinearity_j = mse_linear_j - mse_mlp_j, codes normalised per layer to "
                                  "E||F2||^2 = 1 (the seed's); linear: nonlinearity <= threshold",
                          "threshold": threshold, "judged": int(judged.sum()), "min_heldout_firings": MIN_FIRINGS,
                          "linear": int(linear.sum()), "fraction_linear": float(linear.sum()) / n,
                          "percent_linear": 100.0 * float(linear.sum()) / n, "negative": int((d < 0).sum()),
                          "fraction_linear_per_feature_energy": float((judged & (relative <= threshold)).sum()) / n,
                          "nonlinearity_quantiles": dict(zip(("10%", "25%", "50%", "75%", "90%"),
                                                             qs.tolist(), strict=True)) if qs is not None else {}},
            "per_feature": {"feature": data.out_features.tolist(),
                            "nonlinearity": [None if math.isnan(v) else round(v, 8) for v in delta.tolist()],
                            "nonlinearity_per_feature_energy": [None if math.isnan(v) else round(v, 6)
                                                                for v in relative.tolist()],
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

