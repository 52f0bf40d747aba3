"""`fastsae` on the command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_report, run_recovery

    report = run_recovery(args.out)
    print(format_report(report))
    failed = [name for name, r in report["runs"].items() if r["mmcs"] < 0.9]
    print(f"\nSAEs and report.json written to {args.out}/")
    if failed:
        print(f"recovery FAILED (MMCS < 0.9) for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="ground-truth recovery on a toy dictionary (the built-in main job)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
