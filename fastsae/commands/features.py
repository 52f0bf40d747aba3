"""`fastsae features`: the feature cache of a trained SAE, top contexts, samples, statistics, effects
(fastsae.analysis.features.run_features)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags


def register(subparsers) -> None:
    p = subparsers.add_parser("features", help="feature cache of an SAE: top contexts, histograms, logit and "
                                               "ablation effects, in one streaming pass (resumable)")
    p.add_argument("--sae", required=True, help="the SAE directory (train/sae)")
    p.add_argument("--store", help="activation store to read (default: the SAE's own, unless --corpus is given)")
    flags.add_model(p, default=None, help="default: the model recorded with the SAE")
    flags.add_site(p, help="default: the site recorded with the SAE")
    flags.add_corpus(p, help="read this corpus through the model instead of a store")
    flags.add_tokens(p, help="with --corpus: token budget")
    flags.add_context_size(p, default=128, help="with --corpus: window length (default 128)")
    p.add_argument("--top", type=int, default=20, help="top contexts per latent (default 20)")
    p.add_argument("--samples", type=int, default=20, help="weaker, quantile-labelled contexts per latent")
    p.add_argument("--effects", default="32", help="how many features get ablation and attribution measured "
                                                   "(the best by the one-token score), or 'all' (default 32)")
    flags.add_device(p)
    flags.add_out(p, "runs/features", "cache directory")
    flags.add_progress(p)
    p.set_defaults(func=_features)


def _features(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..analysis.features import FeatureConfig, run_features

    if args.effects != "all" and not args.effects.isdigit():
        raise SystemExit(f"--effects must be a count or 'all', got {args.effects!r}")
    cache = run_features(
        args.sae, args.out, store=args.store, model=args.model, site=args.site, corpus=args.corpus,
        tokens=args.tokens, context_size=args.context_size, config=FeatureConfig(top=args.top, samples=args.samples),
        effects=None if args.effects == "all" else int(args.effects), device=flags.device(args),
        progress=flags.progress(args))
    print(f"feature cache of {cache.d_sae:,} latents over {cache.tokens_seen:,} tokens: {Path(args.out).resolve()}")
    print(f"browse it: fastsae browse --cache {args.out}")
    return 0
