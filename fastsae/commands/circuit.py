"""`fastsae circuit`: the circuit of a feature by ablation, layer by layer
(fastsae.analysis.interventions.run_circuit)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags


def _site_dir(text: str) -> tuple[str, str]:
    site, sep, path = text.partition("=")
    if not sep or not site or not path:
        raise argparse.ArgumentTypeError(f"expected SITE=BROWSER_DIR, got {text!r}")
    return site, path


def register(subparsers) -> None:
    p = subparsers.add_parser("circuit", help="which features of the layers below drive a feature (ablation, "
                                              "recursively); writes circuit.json, circuit.png and circuit.svg")
    flags.add_model(p)
    p.add_argument("--sae", nargs="+", required=True, help="SAE directories, one per site (adjacent layers)")
    flags.add_site(p, nargs="+", help="the site of each SAE, if it does not record one")
    p.add_argument("--latent", type=int, required=True, help="the feature at the root site")
    p.add_argument("--root-site", help="default: the highest SAE's site")
    p.add_argument("--contexts", type=int, default=16, help="top-activating contexts to run on (default 16)")
    p.add_argument("--feature-cache", help="take the contexts from this feature cache (fastsae features)")
    flags.add_corpus(p, default="english:test",
                     help="else search them in this corpus (default english:test, held out from the main job)")
    flags.add_tokens(p, default=32_768, help="corpus tokens searched (default 32768)")
    flags.add_context_size(p, default=64)
    p.add_argument("--depth", type=int, default=2, help="levels below the root (default 2)")
    p.add_argument("--keep", type=int, default=3, help="children kept per node (default 3)")
    p.add_argument("--candidates", type=int, default=16, help="candidates ablated exactly per node (default 16)")
    p.add_argument("--browser", nargs="*", type=_site_dir, default=[], metavar="SITE=DIR",
                   help="feature browsers to link nodes to, e.g. resid_post.7=runs/features7/browser")
    p.add_argument("--annotate", nargs="*", type=_site_dir, default=[], metavar="SITE=CACHE_DIR",
                   help="add the circuit to these feature caches' browser annotations")
    flags.add_device(p, default="cpu")
    flags.add_out(p, "runs/circuit")
    p.set_defaults(func=_circuit)


def _circuit(args: argparse.Namespace) -> int:
    from ..analysis.interventions import run_circuit

    graph = run_circuit(args.model, args.sae, args.latent, args.out, sites=args.site, root_site=args.root_site,
                        n_contexts=args.contexts, feature_cache=args.feature_cache, corpus=args.corpus,
                        tokens=args.tokens, context_size=args.context_size, depth=args.depth, keep=args.keep,
                        candidates=args.candidates, browsers=dict(args.browser), annotate_caches=dict(args.annotate),
                        device=args.device)
    print(graph["summary"])
    print(f"written {args.out}/circuit.json, circuit.png, circuit.svg")
    return 0
