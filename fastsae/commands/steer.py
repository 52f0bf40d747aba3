"""`fastsae steer`: generate with a latent's direction added at strength α
(fastsae.analysis.interventions.run_steer)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags


def register(subparsers) -> None:
    p = subparsers.add_parser("steer", help="generate with an SAE latent added at a list of strengths; prints the "
                                            "texts and next-token shifts, writes steer.json and steer.png")
    flags.add_model(p)
    p.add_argument("--sae", required=True, help="an SAE directory")
    flags.add_site(p, help="its site, if it does not record one")
    p.add_argument("--latent", type=int, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 2.0, 5.0, 10.0, 20.0],
                   help="strengths in the latent's units (default 0 2 5 10 20; see its max on the prompt)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    flags.add_device(p, default="cpu")
    flags.add_out(p, "runs/steer")
    p.set_defaults(func=_steer)


def _steer(args: argparse.Namespace) -> int:
    from ..analysis.interventions import run_steer

    result = run_steer(args.model, args.sae, args.latent, args.prompt, args.out, site=args.site, alphas=args.alphas,
                       max_new_tokens=args.max_new_tokens, device=args.device)
    print(result["summary"])
    print(f"written {args.out}/steer.json and {args.out}/steer.png")
    return 0
