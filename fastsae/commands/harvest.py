"""`fastsae harvest`: run a model over a corpus and store its activations at sites (fastsae.pipeline.harvest_run)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags

# An error naming one of these settings is reported against the flag (fastsae.cli's handler).
FLAG_NAMES = {"--model": ("model",), "--sites": ("site", "sites"), "--corpus": ("corpus",), "--tokens": ("tokens",),
              "--context-size": ("context_size",), "--batch-size": ("batch_size",), "--resume": ("resume",)}
DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    p = subparsers.add_parser("harvest", help="run a model over a corpus and store its activations at sites")
    flags.add_model(p, help="'gemma-3-270m', 'minilm-l6', a local model directory or a cached hub id")
    p.add_argument("--sites", nargs="+", default=["resid_post.6"], help="e.g. resid_post.6 mlp_hidden.3")
    flags.add_corpus(p, default="english-classics",
                     help="'english-classics' (built in), a .txt/.jsonl file, a directory of .txt, a saved dataset")
    p.add_argument("--text-field", default="text", help="the text field of JSONL records / dataset columns")
    flags.add_tokens(p, default=262_144, help="token budget (before BOS/EOS/pad are dropped)")
    flags.add_context_size(p, default=128)
    flags.add_out(p, "runs/store", "store directory")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="storage dtype of the activations")
    p.add_argument("--model-dtype", default="float32", choices=DTYPES)
    flags.add_batch_size(p, default=8, help="windows per forward pass")
    flags.add_device(p)
    flags.add_seed(p, help="window shuffle seed")
    p.add_argument("--resume", action="store_true", help="continue an interrupted harvest in --out")
    flags.add_progress(p)
    p.set_defaults(func=_harvest, flag_names=FLAG_NAMES)


def _harvest(args: argparse.Namespace) -> int:
    from ..pipeline import harvest_run

    harvest_run(args.model, args.sites, args.out, corpus=args.corpus, tokens=args.tokens,
                context_size=args.context_size, text_field=args.text_field, seed=args.seed,
                batch_size=args.batch_size, dtype=args.dtype, model_dtype=args.model_dtype, device=args.device,
                resume=args.resume, progress=flags.progress(args))
    return 0
