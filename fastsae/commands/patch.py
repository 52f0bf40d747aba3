"""`fastsae patch`: IOI patching curves of SAEs against PCA and the neuron basis
(fastsae.analysis.interventions.run_patch)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags


def register(subparsers) -> None:
    p = subparsers.add_parser("patch", help="IOI activation patching with m = 1..M latents of SAEs (one per site: a "
                                            "layer sweep) against PCA and neurons; writes patch.json and patch.png")
    flags.add_model(p)
    p.add_argument("--sae", nargs="+", required=True, help="SAE directories (their sites are recorded in them)")
    flags.add_site(p, nargs="+", help="the site of each SAE, if it does not record one")
    p.add_argument("--prompts", type=int, default=100, help="IOI prompts (default 100, half ABBA, half BABA)")
    flags.add_seed(p)
    p.add_argument("--max-m", type=int, default=64, help="largest number of directions patched (default 64)")
    p.add_argument("--select", choices=("attribution", "greedy"), default="attribution",
                   help="order of the directions: attribution (default; 2 forwards) or greedy exact search "
                        "(about --pool forwards per m)")
    p.add_argument("--pool", type=int, help="greedy: candidates, the best by attribution (default 2 * max-m)")
    p.add_argument("--against", nargs="*", default=["pca", "neurons"], choices=("pca", "neurons", "ica"),
                   help="baselines fitted on the same activations (default: pca neurons)")
    p.add_argument("--ms", type=int, nargs="+", help="measure the curves at these m only (default every m in "
                                                    "1..max-m), e.g. 1 2 4 8 16 32 64 for a cheap sweep")
    p.add_argument("--full-site", help="with --ms: the one site measured at every m")
    flags.add_corpus(p, help="fit the baselines on this general corpus's activations at each site (e.g. "
                             "research:train), the prompt-fitted PCA kept as the extra row pca_prompts "
                             "(default: fitted on the prompts)")
    flags.add_fit_tokens(p)
    flags.add_context_size(p, default=64, help="with --corpus: window length (default 64)")
    flags.add_device(p, default="cpu")
    flags.add_out(p, "runs/patch")
    p.set_defaults(func=_patch)


def _patch(args: argparse.Namespace) -> int:
    from ..analysis.interventions import ioi_patching
    from ..analysis.sae_dirs import load_saes
    from ..harvest import read_documents, token_windows
    from ..model import load

    if args.corpus is not None and args.fit_tokens < args.context_size:
        raise ValueError(f"--fit-tokens must be at least --context-size ({args.context_size}) to fill one corpus "
                         f"window, got {args.fit_tokens}")
    model, tokenizer = load(args.model, device=args.device)
    # the corpus is cut into windows here: write_report captures their activations at each SAE's site
    corpus = None if args.corpus is None else token_windows(tokenizer, read_documents(args.corpus), args.context_size,
                                                            args.fit_tokens, seed=args.seed)
    report = ioi_patching.write_report(model, tokenizer, load_saes(args.sae, args.site, device=args.device), args.out,
                                       model_name=args.model, n=args.prompts, seed=args.seed, max_m=args.max_m,
                                       select=args.select, pool=args.pool, against=args.against, ms=args.ms,
                                       full_site=args.full_site, corpus=corpus)
    print(report["summary"])
    print(f"{report['meta']['seconds']:.0f} s; written {args.out}/patch.json and {args.out}/patch.png")
    return 0
