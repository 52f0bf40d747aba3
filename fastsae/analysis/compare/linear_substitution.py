"""The CE-based threshold of `fastsae connect` ("when is substituting the linear prediction negligible?"):
output features are replaced by their linear predictions in the model's forward at the MLP output site, keeping
the SAE's error and every other feature as they are (x_out + Σ_{j linear} (ŷ_j - f_j) W_dec[j]), for features
with nonlinearity <= t over a grid of t. The threshold is the largest t whose next-token CE increase stays
within ce_budget (default 1%) of the increase from zero-ablating the MLP output: the linear substitution
keeps >= 99% of the CE loss the MLP recovers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .connections import ConnectionData, Connector


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
