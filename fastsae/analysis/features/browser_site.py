"""The feature browser: a static site written from a feature cache, opened from the file system (no server,
no network, nothing from a CDN).

    <out>/index.html             every latent: search by id or by top token / annotation text, sort by
                                 density, max or mean activation, one-token score
    <out>/feature.html#<latent>  one latent (the contract other tools link to): histogram split by token,
                                 top contexts highlighted by activation (hover for values), ablation effects
                                 and context attribution per token, promoted/suppressed tokens, the
                                 histogram of logit changes over the vocabulary when it is ablated, neighbours
                                 by decoder cosine, and every annotation of <cache>/annotations/*.json
                                 (shared files, so untrusted: only their http:, https: and relative links
                                 are live, any other — javascript:, data:, file: … — is shown as text)
    <out>/assets/                the CSS and JS, copied from fastsae/analysis/features/assets
    <out>/data/meta.js, index.js, vocab.js, search.js, shard-NNNNN.js

Pages opened from file:// may not fetch JSON, so the data are JavaScript files that call a setter
(`fastsae.setShard(k, {...})`); a feature page loads only the shard of `shard_size` latents that holds
its latent, so a dictionary of any width opens at once. Annotations written after the browser need a
rebuild (`fastsae browse`), which is cheap.
"""

from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ... import io
from .cache_effects import load_effects
from .feature_cache import NO_EXPONENT, FeatureCache
from .ranking import one_token_score, peak_tokens

SHARD_SIZE = 64
PAGES = ("index.html", "feature.html")
SCRIPTS = ("browser.css", "common.js", "index.js", "feature.js")
SPLIT_TOKENS = 5  # tokens the histogram is split by
NOTE_CHARS = 100  # annotation text shown in the index


def read_annotations(cache_dir: str | Path) -> list[dict]:
    """Every <cache>/annotations/*.json, sorted by file name, checked against the format
    {"title": str, "features": {"<latent>": {"text": str, "links": [{"text": str, "href": str}]}}}."""
    found = []
    for path in sorted((Path(cache_dir) / "annotations").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("title"), str) \
                or not isinstance(data.get("features"), dict):
            raise ValueError(f'{path}: expected {{"title": str, "features": {{"<latent>": {{"text": ..., '
                             f'"links": [...]}}}}}}')
        for key, entry in data["features"].items():
            if not key.isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("text", ""), str) \
                    or not isinstance(entry.get("links", []), list):
                raise ValueError(f"{path}: feature {key!r} must be a latent id mapping to "
                                 f'{{"text": str, "links": [{{"text": str, "href": str}}]}}')
        found.append(data)
    return found


def _rounded(x: Tensor, scale: Tensor) -> list:
    """x (..., W) rounded to about 4 significant digits of scale (one per leading row), NaN as null."""
    a = x.double().numpy()
    digits = np.clip(3 - np.floor(np.log10(np.maximum(scale.double().numpy(), 1e-30))), 0, 12).astype(int)
    out = np.empty_like(a)
    for i, d in enumerate(digits):
        out[i] = np.round(a[i], d)
    listed = out.tolist()
    return _nan_to_none(listed) if np.isnan(out).any() else listed


def _nan_to_none(value):
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _js(path: Path, call: str, *args) -> None:
    text = f"fastsae.{call}(" + ",".join(json.dumps(a, separators=(",", ":")) for a in args) + ");\n"
    io.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _token_split(cache: FeatureCache, latents: range) -> list[dict | None]:
    """For each latent, its SPLIT_TOKENS commonest tokens in the token sample and their per-bin counts."""
    t = cache.tensors
    if "token_sample.token" not in t:
        return [None] * len(latents)
    B = t["histogram"].shape[1]
    out = []
    for j in latents:
        tokens, values = t["token_sample.token"][j], t["token_sample.value"][j]
        on = tokens >= 0
        tokens, values = tokens[on].long(), values[on]
        e = int(t["histogram_exponent"][j])
        if not tokens.numel() or e == NO_EXPONENT:
            out.append(None)
            continue
        bins = (values * 2.0 ** -e * B).floor().long().clamp(0, B - 1)
        ids, counts = torch.unique(tokens, return_counts=True)
        order = sorted(range(ids.numel()), key=lambda i: (-int(counts[i]), int(ids[i])))[:SPLIT_TOKENS]
        chosen = [int(ids[i]) for i in order]
        out.append({"t": chosen, "c": [torch.bincount(bins[tokens == i], minlength=B).tolist() for i in chosen],
                    "n": torch.bincount(bins, minlength=B).tolist(), "total": int(tokens.numel())})
    return out


def _shard(cache: FeatureCache, effects: dict | None, annotations: list[dict], latents: range) -> dict:
    t = cache.tensors
    measured = {} if effects is None else {int(j): i for i, j in enumerate(effects["measured.latent"].tolist())}
    split = _token_split(cache, latents)
    maxima = t["max"][latents.start:latents.stop]
    features = {}
    for k, j in enumerate(latents):
        hist = t["histogram"][j]
        nonzero = hist.nonzero()
        f = {"c": int(t["count"][j]), "mean": float(t["mean"][j]), "max": float(t["max"][j]),
             "h": hist[:int(nonzero[-1]) + 1].tolist() if nonzero.numel() else [],
             "he": int(t["histogram_exponent"][j]), "hs": split[k]}
        for prefix, key in (("top", "top"), ("samples", "smp")):
            valid = (t[f"{prefix}.sequence"][j] >= 0).nonzero().squeeze(1)
            acts = _rounded(t[f"{prefix}.acts"][j, valid], maxima[k].expand(valid.numel()))
            rows = []
            for r, slot in enumerate(valid.tolist()):
                row = {"s": int(t[f"{prefix}.sequence"][j, slot]), "b": int(t[f"{prefix}.start"][j, slot]),
                       "p": int(t[f"{prefix}.position"][j, slot]), "t": t[f"{prefix}.tokens"][j, slot].tolist(),
                       "a": acts[r]}
                if prefix == "samples":
                    row["q"] = int(t["samples.quantile"][j, slot])
                elif j in measured:
                    i = measured[j]
                    ab, at = effects["ablation"][i, slot], effects["attribution"][i, slot]
                    one = torch.ones(1)
                    row["ab"] = None if torch.isnan(ab).all() else _rounded(ab[None], one)[0]
                    row["at"] = None if torch.isnan(at).all() else _rounded(at[None], one)[0]
                rows.append(row)
            f[key] = rows
        if effects is not None and "logits.top_ids" in effects:
            summary = "logits.mean" in effects  # not in caches measured before the z-scores were kept
            mean = float(effects["logits.mean"][j]) if summary else 0.0
            std = max(float(effects["logits.std"][j]), 1e-30) if summary else math.nan
            for key, name in (("lp", "top"), ("ln", "bottom")):  # [token, logit change, its z-score or null]
                f[key] = [[int(i), float(f"{v:.4g}"), round((v - mean) / std, 2) if summary else None]
                          for i, v in zip(effects[f"logits.{name}_ids"][j].tolist(),
                                          effects[f"logits.{name}_values"][j].tolist(), strict=True)]
        if effects is not None and "logits.hist" in effects:  # the logit-drop histogram, over the vocabulary
            lo, hi = (float(effects[f"logits.hist_{end}"][j]) for end in ("lo", "hi"))
            f["lh"] = {"c": effects["logits.hist"][j].tolist(), "lo": float(f"{lo:.4g}"), "hi": float(f"{hi:.4g}")}
        f["nb"] = [[i, round(c, 4)] for i, c in cache.neighbours(j)]
        f["ann"] = [{"title": a["title"], **a["features"][str(j)]} for a in annotations if str(j) in a["features"]]
        features[str(j)] = f
    return features


def write_browser(cache_dir: str | Path, out: str | Path | None = None, *, shard_size: int = SHARD_SIZE,
                  progress: bool = True) -> Path:
    """Write the browser for the feature cache in cache_dir into out (default <cache_dir>/browser) and
    return the path of its index.html."""
    from tqdm.auto import tqdm

    cache = FeatureCache.load(cache_dir)
    out = Path(out) if out is not None else cache.path / "browser"
    effects = load_effects(cache.path)
    annotations = read_annotations(cache.path)
    _copy_assets(out)
    d_sae = cache.d_sae
    source = cache.meta.get("source", {})
    score, _ = one_token_score(cache)
    notes, full_text = _annotation_text(annotations, d_sae)
    n_shards = -(-d_sae // shard_size)
    _js(out / "data" / "meta.js", "setMeta", {
        "d_sae": d_sae, "shard_size": shard_size, "n_shards": n_shards, "tokens": cache.tokens_seen,
        "model": source.get("model") or cache.meta.get("meta", {}).get("model"),
        "site": source.get("site"), "window": cache.meta["window"], "bins": int(cache.tensors["histogram"].shape[1]),
        "has_effects": effects is not None, "has_search": bool(full_text),
        "annotations": [a["title"] for a in annotations]})
    one = torch.ones(1)
    _js(out / "data" / "index.js", "setIndex", {
        "count": cache.tensors["count"].tolist(), "max": _rounded(cache.tensors["max"][None], one)[0],
        "mean": _rounded(cache.tensors["mean"][None], one)[0],
        "score": [None if math.isnan(s) else round(s, 3) for s in score.tolist()], "tokens": _peak_labels(cache),
        "note": notes})
    _js(out / "data" / "search.js", "setSearch", {"text": full_text})
    _js(out / "data" / "vocab.js", "setVocab", {str(i): cache.token_str(i) for i in _shown_token_ids(cache, effects)})
    for k in tqdm(range(n_shards), disable=not progress, desc="browser", unit="shard"):
        latents = range(k * shard_size, min((k + 1) * shard_size, d_sae))
        _js(out / "data" / f"shard-{k:05d}.js", "setShard", k, _shard(cache, effects, annotations, latents))
    for stale in (out / "data").glob("shard-*.js"):  # a previous, wider dictionary's
        if int(stale.stem.split("-")[1]) >= n_shards:
            stale.unlink()
    return out / "index.html"


def _copy_assets(out: Path) -> None:
    """The pages into out and the CSS and JS into out/assets (out/data made for the data)."""
    (out / "assets").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    assets = resources.files("fastsae") / "analysis" / "features" / "assets"
    for name, dst in [*((n, out / n) for n in PAGES), *((n, out / "assets" / n) for n in SCRIPTS)]:
        with resources.as_file(assets / name) as src:  # whole or not at all, a full disk named
            io.atomic_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))


def _peak_labels(cache: FeatureCache) -> list[str]:
    """Per latent, its distinct peak tokens, commonest first (at most 3, joined by U+001F)."""
    peaks = peak_tokens(cache)
    tokens = []
    for j in range(cache.d_sae):
        ids = [i for i in peaks[j].tolist() if i >= 0]
        ranked = sorted(dict.fromkeys(ids), key=lambda i: -ids.count(i))[:3]
        tokens.append("\u001f".join(cache.token_str(i) for i in ranked))
    return tokens


def _annotation_text(annotations: list[dict], d_sae: int) -> tuple[list[str], dict[str, str]]:
    """(the index's note per latent: its first annotation's text, cut; {latent: every annotation's text} to search)."""
    notes = [""] * d_sae
    full_text: dict[str, str] = {}
    for a in annotations:
        for key, entry in a["features"].items():
            j = int(key)
            if j < d_sae:
                notes[j] = notes[j] or entry.get("text", "")[:NOTE_CHARS]
                full_text[key] = (full_text.get(key, "") + f" {a['title']}: {entry.get('text', '')}").strip()
    return notes, full_text


def _shown_token_ids(cache: FeatureCache, effects: dict | None) -> list[int]:
    """Every token id a page may show (contexts, token sample, promoted and suppressed tokens), ascending."""
    ids = set()
    for key in ("top.tokens", "samples.tokens", "token_sample.token"):
        if key in cache.tensors:
            ids.update(torch.unique(cache.tensors[key]).tolist())
    if effects is not None and "logits.top_ids" in effects:
        ids.update(torch.unique(torch.cat([effects["logits.top_ids"], effects["logits.bottom_ids"]])).tolist())
    ids.discard(-1)
    return sorted(ids)
