"""`fastsae steer`: generate with a latent's direction added at strength α (fastsae.analysis.interventions.steering_sweep)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("steer", help="generate with an SAE latent added at a list of strengths; prints the "
                                            "texts and next-token shifts, writes steer.json and steer.png")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--sae", required=True, help="an SAE directory")
    p.add_argument("--site", help="its site, if it does not record one")
    p.add_argument("--latent", type=int, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 2.0, 5.0, 10.0, 20.0],
                   help="strengths in the latent's units (default 0 2 5 10 20; see its max on the prompt)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/steer", help="output directory (default runs/steer)")
    p.set_defaults(func=_steer)


def _steer(args: argparse.Namespace) -> int:
    from ..analysis.interventions.steering_sweep import run

    result = run(args.model, args.sae, args.latent, args.prompt, args.out, site=args.site, alphas=args.alphas,
                 max_new_tokens=args.max_new_tokens, device=args.device)
    print(result["summary"])
    print(f"written {args.out}/steer.json and {args.out}/steer.png")
    return 0
