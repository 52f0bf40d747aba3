"""Where a feature's contexts come from: an examples file (JSON, any tool can write one), or the feature
cache of `fastsae.analysis.features` (top contexts, quantile samples and random contexts per latent).

Features are named `<kind>/<latent>`: kind "sae" for the dictionary's latents, "pca", "ica", "neurons" for
the baselines' directions, so one report compares them on equal terms.
"""

from __future__ import annotations

import random
from pathlib import Path

from ... import io
from .interpret import FeatureExamples, feature_from_dict, feature_to_dict

FORMAT_VERSION = 1


def feature_name(kind: str, latent: int) -> str:
    return f"{kind}/{latent}"


def parse_name(name: str) -> tuple[str, int]:
    kind, _, latent = name.rpartition("/")
    if not kind or not latent.isdigit():
        raise ValueError(f"feature name: expected <kind>/<latent> such as sae/123, got {name!r}")
    return kind, int(latent)


def save_examples(path: str | Path, features: dict[str, FeatureExamples]) -> None:
    """{"format_version": 1, "features": {"sae/12": {"top": [Example], "samples": [...], "random": [...]}}}"""
    for name in features:
        parse_name(name)
    io.write_json(path, {"format_version": FORMAT_VERSION,
                         "features": {n: feature_to_dict(f) for n, f in features.items()}})


def load_examples(path: str | Path) -> dict[str, FeatureExamples]:
    data = io.read_json(path)
    if data.get("format_version") != FORMAT_VERSION or not isinstance(data.get("features"), dict):
        raise ValueError(f"{path}: expected an autointerp examples file (format_version {FORMAT_VERSION}, "
                         "'features': {name: {top, samples, random}})")
    out = {}
    for name, d in data["features"].items():
        parse_name(name)
        out[name] = feature_from_dict(d, f"{path}: feature {name}")
    return out


def select(latents: list[int], features: str | int | None, seed: int = 0) -> list[int]:
    """`features`: None or "all" (every latent given); a count N (N of them drawn at random with seed, in
    increasing order); or ids "3,17,42" (a single id is written with a comma: "42,")."""
    text = "all" if features is None else str(features).strip()
    if text == "all":
        return list(latents)
    if "," in text:
        try:
            ids = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--features: expected ids like 3,17,42; got {features!r}") from None
        missing = sorted(set(ids) - set(latents))
        if missing:
            raise ValueError(f"--features: latents {missing[:10]} have no contexts in the source")
        return ids
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--features: expected a count >= 1, ids like 3,17,42 (one id: 42,) or 'all'; "
                         f"got {features!r}")
    n = int(text)
    if n >= len(latents):
        return list(latents)
    return sorted(random.Random(seed).sample(list(latents), n))
