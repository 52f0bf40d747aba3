"""`fastsae autointerp`: explain and score features with a language model (local or an OpenAI-compatible
server), SAE latents against neuron, PCA and ICA baselines (fastsae.analysis.autointerp.run_autointerp)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags


def _autointerp(args: argparse.Namespace) -> int:
    from ..analysis.autointerp import BackendError, run_autointerp

    try:
        backend = args.backend
        if args.base_url:  # --backend openai --base-url URL is openai:URL
            if backend.partition(":")[0] != "openai":
                raise ValueError(f"--base-url is for --backend openai, not {backend!r}")
            backend = f"openai:{args.base_url}"
        run_autointerp(backend=backend, model=args.model, examples=args.examples, sae=args.sae,
                   feature_cache_dir=args.feature_cache, features=args.features, fit_tokens=args.fit_tokens,
                   baselines=flags.baselines(args), out=args.out, cache=args.cache, scores=tuple(args.scores),
                   api_key_env=args.api_key_env, concurrency=args.concurrency, timeout=args.timeout,
                   retries=args.retries, chat=args.api == "chat", price_in=args.price_in, price_out=args.price_out,
                   device=args.device or "cpu", seed=args.seed, progress=flags.progress(args))
    except BackendError as err:
        raise SystemExit(str(err)) from None  # one line, "fastsae autointerp: <err>" (fastsae.cli's handler)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("autointerp", help="explain and score features with a language model (Bills et al. "
                                                 "2023 simulation, Paulo et al. 2024 detection/fuzzing), SAE vs "
                                                 "PCA/ICA/neuron baselines")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sae", help="an SAE directory: its features' contexts come from its feature cache")
    src.add_argument("--examples", help="a JSON file of contexts per feature (autointerp.save_examples)")
    p.add_argument("--feature-cache", help="the SAE's feature cache (fastsae features --out …): its browser shows "
                                           "the explanations; with --sae the default is the main job's "
                                           "(<run>/features beside <run>/train/sae), else one built in <out>/features")
    flags.add_fit_tokens(p)
    p.add_argument("--features", default="50", help="how many features per kind (drawn at random), ids like "
                                                    "3,17,42 (one id: 42,), or 'all' (default 50)")
    flags.add_baselines(p, default=("pca", "ica", "neurons"), choices=("pca", "ica", "neurons", "random", "none"),
                        help="with --sae: baselines scored the same way (random: random unit directions, projected)")
    p.add_argument("--backend", default="local:gemma-3-270m",
                   help="local[:MODEL] (a fastsae.model name or a directory; default local:gemma-3-270m, a weak "
                        "explainer) or openai:URL (an OpenAI-compatible server, e.g. openai:http://127.0.0.1:8000/v1;"
                        " default URL $OPENAI_BASE_URL)")
    p.add_argument("--base-url", help="openai: the server, e.g. http://127.0.0.1:8080/v1 (llama.cpp's server, vLLM); "
                                      "--backend openai --base-url URL is --backend openai:URL")
    p.add_argument("--model", help="the server's model name (default $OPENAI_MODEL)")
    p.add_argument("--api", choices=("chat", "completions"), default="chat",
                   help="openai: generate through chat/completions (default) or completions (base models)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="the environment variable holding the API key (never written anywhere)")
    p.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight at once")
    p.add_argument("--timeout", type=float, default=60.0, help="openai: seconds per request")
    p.add_argument("--retries", type=int, default=5, help="openai: retries on 429/5xx/timeouts (back-off)")
    p.add_argument("--scores", nargs="+", default=["simulation", "detection", "fuzzing"],
                   choices=("simulation", "detection", "fuzzing"))
    p.add_argument("--price-in", type=float, default=0.0, help="dollars per million prompt tokens (cost estimate)")
    p.add_argument("--price-out", type=float, default=0.0, help="dollars per million completion tokens")
    p.add_argument("--cache", help="request cache directory (default $FASTSAE_CACHE/autointerp)")
    flags.add_out(p, "runs/autointerp", "report directory")
    flags.add_device(p, help="local backend (and the feature pass): default cpu")
    flags.add_seed(p)
    flags.add_progress(p)
    p.set_defaults(func=_autointerp)
