"""SAEs from their directories, keyed by the site each was trained on (the analysis command lines take
several, one per layer)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..sae import SAE


def layer_of(site: str) -> int:
    """The layer in a site name ("resid_post.7" -> 7), -1 if it names none."""
    match = re.search(r"(\d+)$", site)
    return int(match.group(1)) if match else -1


def load_saes(paths: Sequence[str | Path], sites: Sequence[str] | None = None,
              device: str = "cpu") -> dict[str, SAE]:
    """{site: SAE} ordered from the lowest layer up. Each SAE's site is the one recorded when it was trained
    (metadata "site"), or the matching entry of sites."""
    if sites is not None and len(sites) != len(paths):
        raise ValueError(f"--site: give one site per SAE ({len(paths)}), got {len(sites)}")
    out: dict[str, SAE] = {}
    for i, path in enumerate(paths):
        sae = SAE.load(path, device=device)
        site = sites[i] if sites is not None else sae.metadata.get("site")
        if not site:
            raise ValueError(f"{path}: the SAE does not record its site; pass --site")
        if site in out:
            raise ValueError(f"two SAEs for site {site!r}; give one per site")
        sae.path = Path(path)  # where it was loaded from, for the outputs' provenance
        out[site] = sae.eval()
    return dict(sorted(out.items(), key=lambda item: layer_of(item[0])))
