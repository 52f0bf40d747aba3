"""`fastsae compare A B`: MMCS both ways, matched pairs, feature splitting, browser links
(fastsae.analysis.compare.run_compare)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags


def register(sub) -> None:
    p = sub.add_parser("compare", help="compare two dictionaries' decoder directions: MMCS both ways, matches, "
                                       "feature splitting across sizes",
                       description="A and B: SAE directories, 'toy[:SEED]' (the toy's ground truth), 'pca:STORE' / "
                                   "'ica:STORE' (baseline directions fitted on an activation store), or an "
                                   ".npy/.safetensors (n, d_in) array of directions.")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tau", type=float, default=0.9, help="a match counts when its cosine is >= tau (default 0.9)")
    p.add_argument("--absolute", action=argparse.BooleanOptionalAction, default=None,
                   help="compare |cos| (sign-free); default: only when PCA/ICA is involved (SAE latents are "
                        "non-negative, so d and -d are different features)")
    p.add_argument("--one-to-one", action="store_true",
                   help="also the optimal one-to-one matching (scipy; dictionaries up to ~8192 each)")
    p.add_argument("--split-tau", type=float, default=0.5,
                   help="cosine a large feature needs to join a small feature's family (default 0.5)")
    flags.add_site(p, help="the store's site for pca:/ica: and --correlation-store (default: the store's only one, "
                              "or the SAEs')")
    p.add_argument("--cache-a", help="A's feature cache: its top tokens, and annotations linking to B's browser")
    p.add_argument("--cache-b", help="B's feature cache")
    p.add_argument("--browser-a", help="A's feature browser directory (default: <cache-a>/browser)")
    p.add_argument("--browser-b", help="B's feature browser directory (default: <cache-b>/browser)")
    p.add_argument("--store", help="an activation store for top tokens when there are no feature caches "
                                   "(default: the store A was trained on, when it is here)")
    p.add_argument("--correlation-store", metavar="STORE",
                   help="also match latents by activation correlation (Pearson r over this store's tokens, "
                        "held-out ones for universality; two SAEs only), at --site or the SAEs' site")
    p.add_argument("--correlation-tokens", type=int, default=16_384, metavar="N",
                   help="the store's first N tokens for --correlation-store (default 16,384)")
    flags.add_device(p)
    flags.add_out(p, "runs/compare")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from ..analysis.compare import run_compare

    run_compare(args.a, args.b, args.out, tau=args.tau, absolute=args.absolute, one_to_one=args.one_to_one,
                split_tau=args.split_tau, site=args.site, caches=(args.cache_a, args.cache_b),
                browsers=(args.browser_a, args.browser_b), store=args.store, device=args.device,
                correlation_store=args.correlation_store, correlation_tokens=args.correlation_tokens)
    return 0
