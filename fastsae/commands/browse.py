"""`fastsae browse`: the static HTML feature browser of a feature cache (opens from the file system)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("browse", help="write the feature browser (static HTML, no server) of a feature "
                                             "cache and print its index.html")
    p.add_argument("--cache", required=True, help="a feature cache directory (fastsae features --out)")
    p.add_argument("--out", help="browser directory (default: <cache>/browser)")
    p.add_argument("--show", type=int, default=5, help="best-looking features to list (default 5)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_browse)


def _browse(args: argparse.Namespace) -> int:
    from ..analysis.features.features_run import browse

    index, table = browse(args.cache, args.out, show=args.show, progress=not args.no_progress)
    print(table)
    print(f"feature browser: {index.resolve()}")
    return 0
