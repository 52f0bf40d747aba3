"""`fastsae demo`: ground-truth recovery on a toy dictionary (fastsae.demo.run_demo)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="ground-truth recovery on a toy dictionary (synthetic data, ~1.5 min)")
    flags.add_out(p, "runs/demo")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args.out)
