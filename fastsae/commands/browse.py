"""`fastsae browse`: the static HTML feature browser of a feature cache, opened from the file system
(fastsae.analysis.features.run_browse)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags


def register(subparsers) -> None:
    p = subparsers.add_parser("browse", help="write the feature browser (static HTML, no server) of a feature "
                                             "cache and print its index.html")
    p.add_argument("--cache", required=True, help="a feature cache directory (fastsae features --out)")
    flags.add_out(p, None, "browser directory", default_text="<cache>/browser")
    p.add_argument("--show", type=int, default=5, help="best-looking features to list (default 5)")
    flags.add_progress(p)
    p.set_defaults(func=_browse)


def _browse(args: argparse.Namespace) -> int:
    from ..analysis.features import run_browse

    index, table = run_browse(args.cache, args.out, show=args.show, progress=flags.progress(args))
    print(table)
    print(f"feature browser: {index.resolve()}")
    return 0
