"""Feature-splitting families as browser annotations: `fastsae compare` of two dictionaries of different sizes,
given their feature caches, links each latent of the small dictionary to its children in the large one and each
child to its parent (fastsae.analysis.compare.direction_match.splits gives the families).

    <small cache>/annotations/compare-family-<large>.json   latent i: "2 children in <large>: latent j (cos c), …"
    <large cache>/annotations/compare-family-<small>.json   latent j: "parent in <small>: latent i (cos c); 1 sibling"

A latent without family (no child, or no parent, at cos >= the split tau) gets no entry: the best-match
annotation (compare-<other>.json) already says how far its nearest direction is, and the files stay small.
File names carry the other dictionary's name, so a middle dictionary compared with a smaller one and with a
larger one (4k -> 16k, then 16k -> 64k) keeps both its parents and its children.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ... import io
from ..features.browser_links import default_browser, feature_href

FAMILY_TOOL = "compare-family"
SLUG_CHARS = 60


def name_slug(text: str) -> str:
    """A file-name-safe form of a dictionary's name; a long one is cut and ends in a hash of the whole name, so
    two names that share their first SLUG_CHARS characters still give two files."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "other"
    if len(slug) <= SLUG_CHARS:
        return slug
    return f"{slug[:SLUG_CHARS - 9].rstrip('-')}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _plural(n: int, word: str, many: str) -> str:
    return f"{n} {word if n == 1 else many}"


def children_entries(families: list[dict], large_name: str, tau: float, hrefs) -> dict:
    """{small latent: annotation} for every family with a child; hrefs(j) links large latent j (or None)."""
    features = {}
    for f in families:
        if not f["children"]:
            continue
        pairs = list(zip(f["children"], f["cos"], strict=True))
        listed = ", ".join(f"latent {j} (cos {c:.3f})" for j, c in pairs)
        entry = {"text": f"{_plural(len(pairs), 'child', 'children')} in {large_name} at cos ≥ {tau}: {listed}"}
        links = [{"text": f"latent {j} (cos {c:.2f})", "href": h} for j, c in pairs if (h := hrefs(j))]
        if links:
            entry["links"] = links
        features[str(f["feature"])] = entry
    return features


def parent_entries(families: list[dict], small_name: str, tau: float, hrefs) -> dict:
    """{large latent: annotation} for every child; hrefs(i) links small latent i (or None)."""
    features = {}
    for f in families:
        i, siblings = f["feature"], len(f["children"]) - 1
        for j, c in zip(f["children"], f["cos"], strict=True):
            entry = {"text": f"parent in {small_name}: latent {i} (cos {c:.3f} ≥ {tau}); "
                             f"{_plural(siblings, 'sibling', 'siblings')}"}
            if href := hrefs(i):
                entry["links"] = [{"text": f"parent: latent {i} (cos {c:.2f})", "href": href}]
            features[str(j)] = entry
    return features


def _write(cache_dir, other_name: str, title: str, features: dict) -> Path:
    path = Path(cache_dir) / "annotations" / f"{FAMILY_TOOL}-{name_slug(other_name)}.json"
    io.write_json(path, {"title": title, "features": features})
    return path


def write_family_annotations(split_report: dict, names: tuple[str, str], caches: tuple, browsers: tuple) -> list[Path]:
    """The family annotations of run_compare's report["splits"] ({"summary": {"small": "a"|"b", "tau"},
    "families": [{"feature", "children", "cos"}]}) into the caches given (A's, B's; None skips one); links go to
    the other dictionary's browser (browsers: A's, B's; default <cache>/browser). Returns the files written."""
    small = {"a": 0, "b": 1}[split_report["summary"]["small"]]
    large, tau = 1 - small, split_report["summary"]["tau"]
    families = split_report["families"]
    browsers = tuple(b or default_browser(c) for b, c in zip(browsers, caches, strict=True))

    def hrefs(to: int, side: int):
        return lambda latent: feature_href(browsers[to], browsers[side], latent)

    files = []
    if caches[small]:
        features = children_entries(families, names[large], tau, hrefs(large, small))
        files.append(_write(caches[small], names[large], f"Children in {names[large]}", features))
    if caches[large]:
        features = parent_entries(families, names[small], tau, hrefs(small, large))
        files.append(_write(caches[large], names[small], f"Parent in {names[small]}", features))
    return files
