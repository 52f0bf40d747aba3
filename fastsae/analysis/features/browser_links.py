"""Links into feature browsers: a latent's page is <browser>/feature.html#<latent> (the browser's contract),
written relative to the page or file that shows the link, so the pages still open from file:// when the
directories move together."""

from __future__ import annotations

import os
from pathlib import Path

BROWSER_DIR = "browser"  # where `fastsae browse` writes a cache's browser by default: <cache>/browser


def default_browser(cache_dir: str | Path | None) -> Path | None:
    return Path(cache_dir) / BROWSER_DIR if cache_dir else None


def feature_href(browser: str | Path | None, from_dir: str | Path, latent: int) -> str | None:
    """The link to latent's page of browser, relative to from_dir; None without a browser."""
    if browser is None:
        return None
    rel = Path(os.path.relpath(Path(browser).resolve(), Path(from_dir).resolve())).as_posix()
    return f"{rel}/feature.html#{latent}"
