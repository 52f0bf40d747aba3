"""`fastsae features`: the feature cache of a trained SAE (top contexts, samples, statistics, effects)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("features", help="feature cache of an SAE: top contexts, histograms, logit and "
                                               "ablation effects, in one streaming pass (resumable)")
    p.add_argument("--sae", required=True, help="the SAE directory (train/sae)")
    p.add_argument("--store", help="activation store to read (default: the SAE's own, unless --corpus is given)")
    p.add_argument("--model", help="default: the model recorded with the SAE")
    p.add_argument("--site", help="default: the site recorded with the SAE")
    p.add_argument("--corpus", help="read this corpus through the model instead of a store")
    p.add_argument("--tokens", type=int, help="with --corpus: token budget")
    p.add_argument("--context-size", type=int, default=128, help="with --corpus: window length (default 128)")
    p.add_argument("--top", type=int, default=20, help="top contexts per latent (default 20)")
    p.add_argument("--samples", type=int, default=20, help="weaker, quantile-labelled contexts per latent")
    p.add_argument("--effects", default="32", help="how many features get ablation and attribution measured "
                                                   "(the best by the one-token score), or 'all' (default 32)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--out", default="runs/features", help="cache directory (default: runs/features)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_features)


def _features(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..analysis.features.feature_pass import FeatureConfig
    from ..analysis.features.features_run import build_feature_cache

    if args.effects != "all" and not args.effects.isdigit():
        raise SystemExit(f"--effects must be a count or 'all', got {args.effects!r}")
    cache = build_feature_cache(
        args.sae, args.out, store=args.store, model=args.model, site=args.site, corpus=args.corpus,
        tokens=args.tokens, context_size=args.context_size, config=FeatureConfig(top=args.top, samples=args.samples),
        effects=None if args.effects == "all" else int(args.effects),
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), progress=not args.no_progress)
    print(f"feature cache of {cache.d_sae:,} latents over {cache.tokens_seen:,} tokens: {Path(args.out).resolve()}")
    print(f"browse it: fastsae browse --cache {args.out}")
    return 0
