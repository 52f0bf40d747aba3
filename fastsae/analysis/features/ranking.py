"""A cheap proxy for how interpretable a feature looks, and the table of the best-looking ones.

one-token score: the fraction of a latent's top-context activation mass (the sum of the n peak activations)
that falls on its most common peak-token class, a class being the token's text stripped of whitespace and
lower-cased (" The" and "the" are one class). 1.0: every top context peaks on the same word. It favours
single-token features over contextual ones, which is why it is only a proxy: it is cheap and it finds
features a reader can check at a glance. Latents with fewer than n top contexts get NaN. The ranking
(`ranked_latents`) breaks the many ties at 1.0 toward the sparser feature, and leaves out latents that fire
fewer than 2n times. `fastsae run` prints its first five; `build_feature_cache` measures effects on them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .feature_cache import FeatureCache


def peak_tokens(cache: FeatureCache) -> Tensor:
    """(d_sae, n) token id at the peak of each top context (-1 for empty slots)."""
    t = cache.tensors
    at = (t["top.position"] - t["top.start"]).clamp_min(0)
    ids = t["top.tokens"].gather(2, at[..., None].long())[..., 0]
    return torch.where(t["top.sequence"] >= 0, ids, -1)


def one_token_score(cache: FeatureCache) -> tuple[Tensor, list[str]]:
    """(score (d_sae,) float64, NaN where fewer than n top contexts; the dominant class of each latent)."""
    ids = peak_tokens(cache)
    values = cache.tensors["top.value"].double()
    unique, inverse = torch.unique(ids, return_inverse=True)
    names = [cache.token_str(int(i)).strip().lower() or cache.token_str(int(i)) for i in unique]
    name_ids = {name: k for k, name in enumerate(dict.fromkeys(names))}
    cls = torch.tensor([name_ids[n] for n in names], dtype=torch.int64)[inverse]  # (d_sae, n)
    same = (cls[:, :, None] == cls[:, None, :]).double()  # (d_sae, n, n)
    mass = (same * values[:, None, :]).sum(-1)  # (d_sae, n): activation mass of each context's class
    share, best = (mass / values.sum(-1, keepdim=True).clamp_min(1e-30)).max(-1)
    full = (ids >= 0).all(-1)
    score = torch.where(full, share, math.nan)
    by_id = {k: n for n, k in name_ids.items()}
    dominant = [by_id[int(c)] if f else "" for c, f in zip(cls.gather(1, best[:, None])[:, 0].tolist(),
                                                            full.tolist(), strict=True)]
    return score, dominant


def ranked_latents(cache: FeatureCache) -> list[int]:
    """Latents by one-token score, highest first; ties (many reach 1.0) go to the sparser feature, a specific
    word before the newline that 30% of tokens fire. Only latents firing at least twice per top context
    (2n times) are ranked: fewer firings make a score of chance."""
    score, _ = one_token_score(cache)
    count = cache.tensors["count"]
    n = cache.tensors["top.sequence"].shape[1]
    eligible = ((~torch.isnan(score)) & (count >= 2 * n)).nonzero().squeeze(1).tolist()
    return sorted(eligible, key=lambda j: (-float(score[j]), int(count[j]), j))


def top_features_table(cache: FeatureCache, k: int = 5, browser_dir=None) -> str:
    """A markdown table of the k best latents by `ranked_latents`."""
    score, dominant = one_token_score(cache)
    ranked = ranked_latents(cache)
    lines = ["| latent | one-token score | peak token | density | max act | a top context |",
             "|---:|---:|---|---:|---:|---|"]
    for j in ranked[:k]:
        top = cache.top(j)[0]
        peak = top.meta["position"] - top.start
        text = "".join(f"[{tok}]" if i == peak else tok for i, tok in enumerate(top.tokens))
        text = text.replace("\n", "↵").replace("|", "\\|")
        link = f" ({browser_dir}/feature.html#{j})" if browser_dir else ""
        stats = cache.stats(j)
        lines.append(f"| {j}{link} | {float(score[j]):.2f} | {dominant[j]!r} | {stats['density']:.2e} | "
                     f"{stats['max_activation']:.3g} | {text} |")
    if not ranked:
        lines.append("| – | no latent has a full set of top contexts | | | | |")
    return "\n".join(lines)
