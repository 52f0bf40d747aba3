"""`fastsae eval`: metrics.json and plots for trained SAEs (a sweep) against baselines
(fastsae.evaluation.eval_run.run_eval)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags

# An error naming one of these settings is reported against the flag (fastsae.cli's handler).
FLAG_NAMES = {"--model": ("model",), "--site": ("site",), "--corpus": ("corpus",), "--tokens": ("tokens",),
              "--context-size": ("context_size",), "--fit-tokens": ("fit_tokens",), "--batch-size": ("batch_size",),
              "--metrics": ("metrics",)}


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="metrics.json and plots for trained SAEs (a sweep) against baselines")
    p.add_argument("--sae", nargs="+", required=True, help="SAE directories, or sweep directories holding them")
    flags.add_model(p, default=None, help="default: the model recorded with the SAE")
    flags.add_site(p, help="default: the site recorded with the SAE")
    flags.add_corpus(p, help="default: the corpus of the SAE's activation store, else english-classics")
    flags.add_tokens(p, default=16_384, help="held-out eval tokens (default 16384)")
    flags.add_context_size(p, help="default: the store's, else 128")
    flags.add_baselines(p)
    flags.add_fit_tokens(p)
    p.add_argument("--metrics", nargs="+", default=[], metavar="NAME",
                   help="more metrics, comma- or space-separated: absorption (first-letter feature absorption), "
                        "sparse-probing (k-sparse probes on the corpus's labels), as SAEBench defines them "
                        "(docs/guides/evaluation.md); default: none, the reconstruction and downstream metrics only")
    flags.add_batch_size(p, default=4, help="windows per forward pass")
    flags.add_device(p)
    flags.add_out(p, "runs/eval", "report directory")
    flags.add_progress(p)
    p.set_defaults(func=_eval, flag_names=FLAG_NAMES)


def _eval(args: argparse.Namespace) -> int:
    from ..evaluation.eval_run import run_eval

    run_eval(args.sae, args.out, model=args.model, site=args.site, corpus=args.corpus, tokens=args.tokens,
             context_size=args.context_size, baselines=flags.baselines(args), fit_tokens=args.fit_tokens,
             batch_size=args.batch_size, device=flags.device(args), progress=flags.progress(args),
             metrics=tuple(args.metrics))
    return 0
