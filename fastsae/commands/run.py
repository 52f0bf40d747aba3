"""`fastsae run`: the main job, harvest Gemma 3 270M on the built-in corpus, train an SAE, evaluate it and
read its features (fastsae.pipeline.main_job); each step resumes where an interrupted run stopped."""

from __future__ import annotations

import argparse

from . import shared_flags as flags

# An error naming one of these settings is reported against the flag (fastsae.cli's handler).
FLAG_NAMES = {"--model": ("model",), "--site": ("site",), "--corpus": ("corpus",), "--tokens": ("tokens",),
              "--d-sae": ("SAEConfig.d_sae", "d_sae"), "--k": ("SAEConfig.k", "k"),
              "--steps": ("ScheduleConfig.total_steps", "steps"), "--lr": ("OptimizerConfig.lr", "lr"),
              "--batch-size": ("DataConfig.batch_size", "batch_size"), "--eval-tokens": ("eval_tokens",),
              "--effects": ("effects",)}


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="the main job: harvest Gemma 3 270M on the built-in corpus, train an SAE, "
                                          "evaluate it (resumable)")
    flags.add_model(p)
    flags.add_site(p, default="resid_post.6")
    flags.add_corpus(p, default="english:train",
                     help="built-in english (classics + modern prose; :train holds out every tenth document)")
    flags.add_tokens(p, default=262_144, help="tokens to harvest (default 262144)")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    flags.add_batch_size(p, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-tokens", type=int, default=4096)
    flags.add_baselines(p, help="compared in the evaluation")
    flags.add_fit_tokens(p)
    p.add_argument("--effects", type=int, default=16, help="features whose ablation and attribution are measured")
    flags.add_device(p)
    flags.add_out(p, "runs/gemma", "run directory")
    flags.add_progress(p)
    p.set_defaults(func=_run, flag_names=FLAG_NAMES)


def _run(args: argparse.Namespace) -> int:
    from ..pipeline import main_job

    main_job(args.out, model=args.model, site=args.site, corpus=args.corpus, tokens=args.tokens, d_sae=args.d_sae,
             k=args.k, steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_tokens=args.eval_tokens,
             baselines=flags.baselines(args), fit_tokens=args.fit_tokens, device=args.device, effects=args.effects,
             progress=flags.progress(args))
    return 0
