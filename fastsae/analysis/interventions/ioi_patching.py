"""Fewer-than-rank-one patching (Cunningham et al. 2023, "Sparse Autoencoders Find Highly Interpretable
Features in Language Models", §5: IOI): how few directions of a dictionary, patched from the clean run into
the corrupted one at one site, bring back the clean logit difference, against PCA and the neuron basis
fitted on the same activations.

    prompts = ioi.generate(tokenizer, n=100)
    result = compare(model, "resid_post.6", sae, prompts, max_m=64)       # SAE vs PCA vs neurons
    result["curves"]["sae"]["fraction"][m - 1]   # fraction of the clean logit difference with m latents patched
    write_report(model, tokenizer, {"resid_post.5": sae5, "resid_post.6": sae6}, "runs/patch")   # a layer sweep

For each dictionary at the site:
  1. Choose the order of its latents. "attribution" (default; 2 forwards and 1 backward for any M): a latent's
     attribution is Σ over prompts and positions of (z_clean - z_corrupted) · (∂LD/∂x · d), the first-order
     change of the logit difference LD when its clean value is patched in (attribution patching, Nanda 2023;
     Syed et al. 2023), d its direction; latents are taken in decreasing attribution. "greedy" (exact search,
     expensive): at each step, patch each of the `pool` best-attributed latents not yet chosen on top of the
     chosen ones and keep the one that restores most: about pool forwards per m.
  2. For m = 1..M, patch the first m latents' clean values into the corrupted run at every real non-BOS
     position (the rest of the activation, including the SAE's error, stays corrupted) and measure
     fraction(m) = (LD_m - LD_corrupted) / (LD_clean - LD_corrupted), LD the mean over prompts.
     All prompts go in one batched forward per m.
  3. The edit's size: ||Δx||_F / ||x_corrupted||_F over the patched positions.
  4. KL to clean: KL(clean || patched) of the next-token distribution at the last token, mean over prompts
     ("kl" per m): 0 when the patched run is the clean one, and what a minimum positive KL of SAEs refers to.
Patching every direction of PCA or the neuron basis restores the clean run exactly (fraction 1); patching every
latent of an SAE restores x̂_clean + error_corrupted, short of 1 by what the SAE does not reconstruct: its
ceiling (fastsae.analysis.interventions.ioi_ceiling; "ceilings" per SAE, with its FVU on the name tokens).

Several SAEs at one site (a mapping {label: sae}, e.g. 2-3 sparsities) share one set of runs and one plot.
The baselines are fitted on corpus= activations at the site (the general corpus: ioi_ceiling.corpus_activations,
or rows of an activation store) when given; PCA fitted on the prompts' own clean and corrupted activations is
then kept as an extra row, "pca_prompts". Without corpus= every baseline is fitted on the prompts (the
report's "baselines_fitted_on" and the plot's title say which).

Positions before the first token where clean and corrupted differ have identical activations, so their edit is
zero: with reuse_prefix (default) the forwards of step 2 run only from that column on, reading the rest from
a key-value cache of the corrupted prefix (the numbers of full forwards to float precision; tested).
"""

from __future__ import annotations

import copy
import datetime as dt
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ... import io
from ...evaluation import baselines
from ...model import hook_site, hook_sites, special_token_ids
from .ioi import IOIPrompts, generate, logit_diff
from .ioi_ceiling import ceiling, corpus_activations
from .latent_edits import Intervention, as_dictionary
from .padded_prompts import PromptBatch, last_logits, widen

SELECTIONS = ("attribution", "greedy")


class SiteRuns:
    """The clean and corrupted runs seen at one site: activations (B, T, d), the gradient of the corrupted
    run's mean LD there, the mean LDs, and which positions get patched. Shared by every dictionary."""

    def __init__(self, model: nn.Module, site: str, prompts: IOIPrompts, excluded: Sequence[int]):
        device = next(model.parameters()).device
        self.site = site
        self.keep = prompts.clean.keep(excluded).to(device)  # (B, T) positions that get patched
        self.clean_x, clean_logits = _run(model, site, prompts.clean, grad=False)
        self.clean_logp = torch.log_softmax(widen(clean_logits), dim=-1)  # (B, V): KL to clean is measured against it
        self.corrupted_x, corrupted_logits, self.grad = _run(model, site, prompts.corrupted, grad=True, prompts=prompts)
        self.clean_ld = float(logit_diff(clean_logits, prompts).mean())
        self.corrupted_ld = float(logit_diff(corrupted_logits, prompts).mean())
        self.grad = self.grad * self.keep[..., None]  # only patched positions count
        kept = torch.cat([self.clean_x[self.keep], self.corrupted_x[self.keep]])  # (2·N_kept, d)
        self.fit_activations = kept  # what the PCA and neuron baselines are fitted on
        self.corrupted_norm = self.corrupted_x[self.keep].double().norm()
        self.forwards = 2


def _run(model, site, batch: PromptBatch, grad: bool, prompts: IOIPrompts | None = None):
    """Last-token logits and the activation at site; with grad, also ∂(mean LD)/∂activation."""
    seen = {}

    def grab(x):
        seen["x"] = x.detach().requires_grad_(grad)
        return seen["x"]

    with torch.set_grad_enabled(grad), hook_site(model, site, grab):
        logits = last_logits(model, batch)
        if not grad:
            return seen["x"], logits.detach()
        (g,) = torch.autograd.grad(logit_diff(logits, prompts).mean(), seen["x"])
    return seen["x"].detach(), logits.detach(), g


class Patcher:
    """Runs the corrupted prompts with some latents of a dictionary patched from the clean run: one batched
    forward per call, optionally from the first differing column on, over a cached prefix."""

    def __init__(self, model: nn.Module, state: SiteRuns, dictionary, prompts: IOIPrompts, reuse_prefix: bool):
        self.model, self.state, self.dictionary, self.prompts = model, state, dictionary, prompts
        self.device = next(model.parameters()).device
        with torch.no_grad():
            self.clean_codes = dictionary.codes(state.clean_x)  # encoded once for every m
        self.forwards = 0
        batch = prompts.corrupted.to(self.device)
        differs = (prompts.clean.input_ids != prompts.corrupted.input_ids).to(self.device)
        first = int(differs.float().argmax(-1).min()) if differs.any() else batch.input_ids.shape[1] - 1
        self.start, self.cache = 0, None
        if reuse_prefix and first > 0 and getattr(model.config, "use_cache", True) is not False:
            with torch.no_grad():
                out = model(input_ids=batch.input_ids[:, :first], attention_mask=batch.attention_mask[:, :first],
                            position_ids=batch.position_ids[:, :first], use_cache=True)
            if getattr(out, "past_key_values", None) is not None:
                self.start, self.cache = first, out.past_key_values
                self.forwards += 1
        self.batch = batch

    def __call__(self, latents: Sequence[int], patch_error: bool = False) -> tuple[float, float]:
        """Mean LD with latents (and with patch_error the error term) patched, and the edit's relative size."""
        return self.measure(latents, patch_error)[:2]

    @torch.no_grad()
    def measure(self, latents: Sequence[int], patch_error: bool = False,
                positions: Tensor | None = None) -> tuple[float, float, float]:
        """Mean LD, the edit's relative size, and the mean KL(clean || patched) at the last token. positions:
        (B, T) bool, the patched positions (default every real one, state.keep); the size is over state.keep."""
        s, state, batch = self.start, self.state, self.batch
        where = state.keep if positions is None else positions.to(state.keep.device) & state.keep
        iv = Intervention(self.dictionary, patch=list(latents), source=state.clean_x[:, s:], patch_error=patch_error,
                          positions=where[:, s:], record=True)
        iv.source_codes = _columns(self.clean_codes, s)
        with hook_sites(self.model, {state.site: iv}):
            kwargs = {"input_ids": batch.input_ids[:, s:], "attention_mask": batch.attention_mask,
                      "position_ids": batch.position_ids[:, s:], "logits_to_keep": 1}
            if self.cache is not None:
                kwargs.update(past_key_values=copy.deepcopy(self.cache), use_cache=True)
            logits = widen(self.model(**kwargs).logits[:, -1])
        self.forwards += 1
        ld = float(logit_diff(logits, self.prompts).mean())
        edit = iv.edits[0][state.keep[:, s:]].double().norm()  # columns before s are not edited
        logp = torch.log_softmax(logits, dim=-1)
        clean = state.clean_logp.to(logp.dtype)
        kl = float((clean.exp() * (clean - logp)).sum(-1).mean())
        return ld, float(edit / state.corrupted_norm), max(kl, 0.0)  # KL >= 0: clip float error below zero


def _columns(codes, start: int):
    if start == 0:
        return codes
    if isinstance(codes, Tensor):
        return codes[:, start:]
    return type(codes)(codes.values[:, start:], codes.indices[:, start:], codes.d_sae)


@torch.no_grad()
def attribution(dictionary, state: SiteRuns) -> Tensor:
    """(n_latents,) Σ (z_clean - z_corrupted) · (∂LD/∂x · d_i) over prompts and patched positions."""
    dictionary = as_dictionary(dictionary)
    clean = dictionary.contributions(dictionary.codes(state.clean_x), state.grad)
    corrupted = dictionary.contributions(dictionary.codes(state.corrupted_x), state.grad)
    return clean - corrupted


def patching_curve(model: nn.Module, state: SiteRuns, dictionary, prompts: IOIPrompts, *, max_m: int = 64,
                   select: str = "attribution", pool: int | None = None, reuse_prefix: bool = True,
                   ms: Sequence[int] | None = None) -> dict:
    """The curve m -> fraction restored for one dictionary at state's site (see the module docstring).
    ms: the m at which to measure it (default every m in 1..max_m; attribution only, greedy needs every step)."""
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    dictionary = as_dictionary(dictionary)
    max_m = min(max_m, dictionary.size)
    if max_m < 1:
        raise ValueError(f"max_m must be >= 1, got {max_m}")
    start = time.perf_counter()
    scores = attribution(dictionary, state)
    order = scores.argsort(descending=True).tolist()
    patcher = Patcher(model, state, dictionary, prompts, reuse_prefix)
    chosen, lds, sizes, kls = [], [], [], []
    ms = sorted({int(m) for m in ms if 1 <= m <= max_m}) if ms is not None and select == "attribution" else None
    ms = ms or list(range(1, max_m + 1))
    if select == "attribution":
        chosen = order[:max_m]
        for m in ms:
            ld, size, kl = patcher.measure(chosen[:m])
            lds.append(ld)
            sizes.append(size)
            kls.append(kl)
    else:
        pool = max(max_m, pool or 2 * max_m)
        candidates = order[:pool]
        for _ in range(max_m):
            best = None
            for c in candidates:
                if c in chosen:
                    continue
                ld, size, kl = patcher.measure([*chosen, c])
                if best is None or ld > best[0]:
                    best = (ld, size, c, kl)
            chosen.append(best[2])
            lds.append(best[0])
            sizes.append(best[1])
            kls.append(best[3])
    gap = state.clean_ld - state.corrupted_ld
    return {"select": select, "m": ms, "latents": chosen,
            "attribution": [float(scores[i]) for i in chosen], "logit_diff": lds,
            "fraction": [(ld - state.corrupted_ld) / gap for ld in lds], "kl": kls, "relative_edit": sizes,
            "forwards": patcher.forwards, "seconds": time.perf_counter() - start}


def compare(model: nn.Module, site: str, sae, prompts: IOIPrompts, *, max_m: int = 64,
            against: Sequence[str] = ("pca", "neurons"), select: str = "attribution", pool: int | None = None,
            reuse_prefix: bool = True, excluded: Sequence[int] | None = None, ms: Sequence[int] | None = None,
            corpus: Tensor | None = None) -> dict:
    """Curves for the SAE (or each SAE of a mapping {label: sae}) and each baseline (fitted on corpus (N, d)
    when given, else on this site's clean and corrupted activations of the prompts; all d directions), the
    clean and corrupted LD, and each SAE's ceiling (see the module docstring)."""
    start = time.perf_counter()
    saes = dict(sae) if isinstance(sae, Mapping) else {"sae": sae}
    for label, one in saes.items():
        kind = getattr(getattr(one, "cfg", None), "kind", "sae")
        if kind != "sae":  # its codes are read at one site and its edits land at another, the baselines' at one
            raise ValueError(f"sae {label!r}: the IOI patching curves compare dictionaries of one site, and this is "
                             f"a {kind} (reads {site}, writes its out-site); patch its latents with intervene(..., "
                             f"patch=, source=<the clean run's in-site activations>)")
    if excluded is None:
        excluded = special_token_ids(model)
    state = SiteRuns(model, site, prompts, excluded)
    if abs(state.clean_ld - state.corrupted_ld) < 1e-6:
        raise ValueError(f"clean and corrupted prompts have the same logit difference ({state.clean_ld:.4g}): "
                         "nothing to restore")
    d = state.fit_activations.shape[1]
    if corpus is not None and (corpus.dim() != 2 or corpus.shape[1] != d):
        raise ValueError(f"corpus must be (N, {d}) activations at {site}, got shape {tuple(corpus.shape)}")
    dictionaries = dict(saes)
    fit_on = state.fit_activations if corpus is None else corpus.to(state.fit_activations.device)
    for kind in against:
        dictionaries[kind] = baselines.fit(kind, fit_on, d, d)
    if corpus is not None and "pca" in against:  # the prompt-fitted PCA, kept as a labelled extra row
        dictionaries["pca_prompts"] = baselines.fit("pca", state.fit_activations, d, d)
    curves = {name: patching_curve(model, state, dic, prompts, max_m=max_m, select=select, pool=pool,
                                   reuse_prefix=reuse_prefix, ms=ms) for name, dic in dictionaries.items()}
    forwards = state.forwards + sum(c["forwards"] for c in curves.values())
    ceilings = {}
    for label, one in saes.items():
        patcher = Patcher(model, state, as_dictionary(one), prompts, reuse_prefix)
        ceilings[label] = ceiling(patcher, state, one, prompts)
        forwards += patcher.forwards
    first = ceilings[next(iter(saes))]  # the top-level keys of one SAE's report, kept for a single SAE
    return {"site": site, "prompts": len(prompts), "forwards": forwards, "clean_logit_diff": state.clean_ld,
            "corrupted_logit_diff": state.corrupted_ld, "saes": list(saes), "ceilings": ceilings,
            "baselines_fitted_on": "prompts" if corpus is None else f"corpus ({corpus.shape[0]} activations)",
            **{k: first[k] for k in ("all_latents_fraction", "all_latents", "error_only_fraction",
                                     "error_only_relative_edit")},
            "curves": curves, "seconds": time.perf_counter() - start}


def plot(results: Mapping[str, dict], path) -> None:
    """One column per site: fraction of the clean logit difference restored (top), KL to clean (middle) and the
    edit's relative size (bottom) against m, each SAE beside the baselines, each SAE's ceiling dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = list(results)
    fig, axes = plt.subplots(3, len(sites), figsize=(4.2 * len(sites), 9), squeeze=False, sharex=True)
    for col, site in enumerate(sites):
        result = results[site]
        top, middle, bottom = axes[0][col], axes[1][col], axes[2][col]
        colors = {name: f"C{i}" for i, name in enumerate(result["curves"])}
        for name, curve in result["curves"].items():
            top.plot(curve["m"], curve["fraction"], "-", color=colors[name], label=name)
            if "kl" in curve:
                middle.plot(curve["m"], curve["kl"], "-", color=colors[name], label=name)
            bottom.plot(curve["m"], curve["relative_edit"], "-", color=colors[name], label=name)
        ceilings = result.get("ceilings", {"sae": result})
        for label, c in ceilings.items():
            top.axhline(c["all_latents_fraction"], color=colors.get(label, "C0"), linestyle=":", linewidth=1,
                        label=f"{label}: all {c['all_latents']} active latents")
            top.axhline(c["error_only_fraction"], color=colors.get(label, "C0"), linestyle="-.", linewidth=1,
                        label=f"{label}: its error term alone")
        top.axhline(1.0, color="0.5", linewidth=0.8)
        top.set_title(f"{site}  (LD clean {result['clean_logit_diff']:.2f}, corrupted "
                      f"{result['corrupted_logit_diff']:.2f})", fontsize=9)
        top.set_ylabel("fraction of clean logit diff restored")
        middle.set_ylabel("KL(clean || patched), nats")
        bottom.set_ylabel("||edit|| / ||activation||")
        bottom.set_xlabel("directions patched (m)")
        top.legend(fontsize=6)
    first = next(iter(results.values()))
    fig.suptitle(f"IOI patching, {first['prompts']} prompts (directions chosen by "
                 f"{next(iter(first['curves'].values()))['select']}; baselines fitted on "
                 f"{first.get('baselines_fitted_on', 'prompts')})", fontsize=10)
    fig.tight_layout()
    io.write_figure(path, fig)
    plt.close(fig)


def summary(results: Mapping[str, dict], ms: Sequence[int] = (1, 4, 16, 64)) -> str:
    """A markdown table: fraction restored and KL to clean at a few m, per site and dictionary, and each SAE's
    ceiling (every latent patched) with its FVU on the name tokens."""
    lines = ["| site | dictionary | " + " | ".join(f"m={m}" for m in ms) + " | KL at " + " / ".join(map(str, ms))
             + " | edit size at m=16 | ceiling | FVU names |", "|---|---|" + "---:|" * (len(ms) + 4)]
    for site, result in results.items():
        ceilings = result.get("ceilings", {})
        for name, curve in result["curves"].items():
            fraction = dict(zip(curve["m"], curve["fraction"], strict=True))
            kl = dict(zip(curve["m"], curve.get("kl", [None] * len(curve["m"])), strict=True))
            size = dict(zip(curve["m"], curve["relative_edit"], strict=True)).get(16)
            cells = [f"{fraction[m]:.3f}" if m in fraction else "" for m in ms]
            kls = " / ".join(f"{kl[m]:.3f}" if kl.get(m) is not None else "-" for m in ms)
            c = ceilings.get(name)
            tail = f"{c['all_latents_fraction']:.3f} | {c['fvu_names']:.3f}" if c else " | "
            lines.append(f"| {site} | {name} | " + " | ".join(cells) + f" | {kls} | "
                         f"{'' if size is None else f'{size:.3f}'} | {tail} |")
    return "\n".join(lines)


def run_patch(model_name: str, sae_paths: Sequence[str], out, *, sites: Sequence[str] | None = None,
              device: str = "cpu", **kwargs) -> dict:
    """`fastsae patch`: load the model and the SAEs (one per site), then write_report()."""
    from ...model import load
    from ..sae_dirs import load_saes

    model, tokenizer = load(model_name, device=device)
    return write_report(model, tokenizer, load_saes(sae_paths, sites, device=device), out, model_name=model_name,
                        **kwargs)


def write_report(model: nn.Module, tokenizer, saes: Mapping[str, object], out, *, model_name: str = "", n: int = 100,
                 seed: int = 0, max_m: int = 64, select: str = "attribution", pool: int | None = None,
                 against: Sequence[str] = ("pca", "neurons"), ms: Sequence[int] | None = None,
                 full_site: str | None = None, corpus: Tensor | None = None) -> dict:
    """The IOI patching curves of saes ({site: sae}: a layer sweep) against the baselines on n generated prompts,
    measured at ms (default every m) except at full_site (every m there: the detailed curve of a cheaper sweep),
    written as out/patch.json (with the environment) and out/patch.png.
    Resumable: patch.json is rewritten after every site, and a site already there with the same settings and
    the same SAE is not measured again. saes' values may be mappings {label: sae} (SAEs of several sparsities
    at one site, one curve each). corpus: (S, T) token windows of the general corpus the baselines are fitted
    on (their activations at each site; see compare), the prompt-fitted PCA kept as "pca_prompts"."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": model_name, "prompts": n, "seed": seed, "max_m": max_m, "select": select, "pool": pool,
                "against": list(against), "ms": None if ms is None else list(ms), "full_site": full_site,
                "corpus_windows": None if corpus is None else list(corpus.shape)}
    paths = {site: ({k: str(getattr(v, "path", "")) for k, v in sae.items()} if isinstance(sae, Mapping)
                    else str(getattr(sae, "path", ""))) for site, sae in saes.items()}
    done = {}
    if (out / "patch.json").is_file():
        old = io.read_json(out / "patch.json")
        if old.get("meta", {}).get("settings") == settings:
            done = {site: r for site, r in old["results"].items() if old["meta"]["saes"].get(site) == paths.get(site)}
    prompts = generate(tokenizer, n=n, seed=seed)
    results = {}
    for site, sae in saes.items():
        if site in done:
            results[site] = done[site]
            continue
        acts = None if corpus is None else corpus_activations(model, site, corpus, special_token_ids(model))
        results[site] = compare(model, site, sae, prompts, max_m=max_m, select=select, pool=pool, against=against,
                                ms=None if site == full_site else ms, corpus=acts)
        report = _report(results, settings, paths, model, prompts, max_m)
        io.write_json(out / "patch.json", report)
    report = _report(results, settings, paths, model, prompts, max_m)
    io.write_json(out / "patch.json", report)
    plot(results, out / "patch.png")
    return report


def _report(results: dict, settings: dict, paths: dict, model: nn.Module, prompts: IOIPrompts, max_m: int) -> dict:
    meta = {"settings": settings, **settings, "saes": {site: paths[site] for site in results},
            "seconds": sum(r["seconds"] for r in results.values()), "device": str(next(model.parameters()).device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "date": dt.date.today().isoformat(), "example_prompt": prompts.texts[0],
            "example_corrupted": prompts.corrupted_texts[0]}
    return {"meta": meta, "summary": summary(results, [m for m in (1, 4, 16, 64) if m <= max_m]), "results": results}
