"""Evaluating crosscoders (SAEConfig.kind "crosscoder", fastsae/crosscoder.py) by splicing all their sites at once.

Per batch, for the crosscoders of one set of sites (from `metadata["sites"]`, in order): one clean forward
records every site and the crosscoder reconstructs them all from those clean activations; a second forward
replaces every site by its reconstruction (fastsae.model.splice_crosscoder). The ablation baselines replace every
site too, by 0 or by that site's mean over the eval tokens, the convention evaluate() uses for one site, so

    ce_loss_recovered   (CE with all sites zeroed - CE with the crosscoder) / (CE with all sites zeroed - clean CE)

The reconstruction metrics (fvu, mse, l0, ...) are those of the sites side by side; `site_fvu` and `site_mse`
give each site's, in the order of `sites`. One whole forward per variant (the straightforward path of
fastsae/evaluation/whole_forward.py, whose per-variant sums these share); the metrics are defined in
fastsae/evaluation/evaluate.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model import Splice, capture, hook_sites, splice_crosscoder
from .metrics import ReconstructionMetrics
from .variant_records import MetricSums, evaluation_results, is_causal_lm, reconstruction_records, scored_positions
from .whole_forward import _add_variant, _ce, _forward


def crosscoder_sites(name: str, crosscoder) -> tuple[str, ...]:
    """The sites a crosscoder reads, in order, from its metadata (what `fastsae train --sites` records)."""
    sites = getattr(crosscoder, "metadata", {}).get("sites")
    if not sites or len(sites) != crosscoder.cfg.n_sites:
        raise ValueError(f"evaluate: {name!r} is a crosscoder over {crosscoder.cfg.n_sites} sites, but its metadata "
                         f"records sites {sites!r}: set metadata['sites'] to its sites, in order")
    return tuple(sites)


@torch.no_grad()
def _site_means(model: nn.Module, sites: tuple[str, ...], windows: Tensor, keep: Tensor, batch_size: int
                ) -> dict[str, Tensor]:
    """Each site's mean activation over the kept positions (d,) float32, one capture per batch for all sites."""
    device = next(model.parameters()).device
    totals, count = dict.fromkeys(sites, 0.0), 0
    for first in range(0, windows.shape[0], batch_size):
        k = keep[first:first + batch_size].to(device)
        acts = capture(model, sites, input_ids=windows[first:first + batch_size].to(device))
        for s in sites:
            totals[s] = totals[s] + acts[s][k].double().sum(0)
        count += int(k.sum())
    return {s: (totals[s] / count).cpu().float() for s in sites}


@torch.no_grad()
def evaluate_crosscoders(model: nn.Module, sites: tuple[str, ...], windows: Tensor, crosscoders: dict, *,
                         batch_size: int = 8, exclude_token_ids: list[int] | None = None,
                         no_error_check: tuple[str, ...] = (), progress: bool = False) -> dict[str, dict]:
    """Metrics of crosscoders (name -> crosscoder over sites) on windows (S, T), as evaluate() returns them plus
    "sites", "site_fvu", "site_mse" per crosscoder; "model" holds the clean and all-sites-ablated numbers."""
    device, causal = next(model.parameters()).device, is_causal_lm(model)
    keep_all = scored_positions(model, windows, exclude_token_ids, causal)
    means = _site_means(model, sites, windows, keep_all, batch_size)
    recon = reconstruction_records(crosscoders)
    per_site = {name: [ReconstructionMetrics(cc.cfg.d_sae) for _ in sites] for name, cc in crosscoders.items()}
    sums = MetricSums()
    for first in range(0, windows.shape[0], batch_size):
        ids, keep = windows[first:first + batch_size].to(device), keep_all[first:first + batch_size].to(device)
        clean = _forward(model, ids, causal)
        mask = keep[:, :-1] if causal else None
        sums.count += int(mask.sum()) if causal else ids.shape[0]
        if causal:
            sums.add("ce_loss_without_sae", _ce(clean, ids, mask))
        for key, replace in (("ablation", dict.fromkeys(sites, "zero")), ("mean_ablation", means)):
            splices = {s: Splice(None, replace[s], False, False) for s in sites}
            for sp in splices.values():
                sp.keep = keep
            with hook_sites(model, splices):
                _add_variant(sums, key, clean, _forward(model, ids, causal), ids, mask)
        for name, cc in crosscoders.items():
            for error in (False, True) if name not in no_error_check else (False,):
                with splice_crosscoder(model, list(sites), cc, error_term=error, record=not error,
                                       input_ids=ids) as sp:
                    sp.keep = keep
                    out = _forward(model, ids, causal)
                _add_variant(sums, f"{name}/", clean, out, ids, mask, sae=True, error=error)
                if not error:
                    _record(recon[name], per_site[name], sp, keep)
    results = evaluation_results(sums, recon, keep_all, windows, causal)
    for name, metrics in per_site.items():
        computed = [m.compute() for m in metrics]
        results[name].update(sites=list(sites), site_fvu=[m["fvu"] for m in computed],
                             site_mse=[m["mse"] for m in computed])
    return results


def _record(recon: ReconstructionMetrics, per_site: list[ReconstructionMetrics], sp, keep: Tensor) -> None:
    """The recording splice's sites side by side into recon, and each site's block into per_site."""
    latents = sp.latents[0]
    codes = (latents.values[keep], latents.indices[keep])
    x, x_hat = sp.activations[0][keep], sp.reconstructions[0][keep]  # (P, L·d)
    recon.add(x, x_hat, codes)
    d = x.shape[-1] // len(per_site)
    for site, metrics in enumerate(per_site):
        metrics.add(x[:, site * d:(site + 1) * d], x_hat[:, site * d:(site + 1) * d], codes)


def evaluate_with_crosscoders(evaluate, model: nn.Module, site: str, windows: Tensor, decompositions: dict,
                              **kwargs) -> dict[str, dict]:
    """evaluate() (passed in) of the other decompositions as usual, and of the crosscoders grouped by their sites;
    "model" is the others' site's numbers, or with crosscoders only, the first group's."""
    groups: dict[tuple[str, ...], dict] = {}
    for name, d in decompositions.items():
        if getattr(d.cfg, "kind", None) == "crosscoder":
            groups.setdefault(crosscoder_sites(name, d), {})[name] = d
    others = {n: d for n, d in decompositions.items() if getattr(getattr(d, "cfg", None), "kind", "") != "crosscoder"}
    results = evaluate(model, site, windows, others, **kwargs) if others else {}
    kwargs = {k: v for k, v in kwargs.items() if k in ("batch_size", "exclude_token_ids", "no_error_check",
                                                       "progress")}
    for sites, group in groups.items():
        part = evaluate_crosscoders(model, sites, windows, group, **kwargs)
        shared = part.pop("model")
        for m in part.values():  # the all-sites ablations its ce_loss_recovered is against
            m.update({k: v for k, v in shared.items() if "ablation" in k})
        results.setdefault("model", shared)
        results.update(part)
    return {name: results[name] for name in ("model", *decompositions)}
