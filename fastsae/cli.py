"""`fastsae` on the command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_report, run_recovery

    report = run_recovery(args.out)
    print(format_report(report))
    failed = [name for name, r in report["runs"].items() if r["mmcs"] < 0.9]
    print(f"\nSAEs and report.json written to {args.out}/")
    if failed:
        print(f"recovery FAILED (MMCS < 0.9) for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _train(args: argparse.Namespace) -> int:
    from .pipeline import settings_from, train_run

    def given(values: dict) -> dict:
        return {k: v for k, v in values.items() if v is not None}

    settings = settings_from(
        args.config,
        sae=given({"d_sae": args.d_sae, "activation": args.activation, "k": args.k, "l1_coefficient": args.l1,
                   "dtype": args.dtype}),
        train=given({"lr": args.lr, "total_steps": args.steps, "checkpoint_every": args.checkpoint_every,
                     "resample_every": args.resample_every, "auxk_coefficient": args.auxk, "seed": args.seed,
                     "b_dec_init": args.b_dec_init}),
        data=given({"source": args.data, "batch_size": args.batch_size, "seed": args.seed, "site": args.site,
                    "normalize": args.normalize, "model": args.model, "corpus": args.corpus, "tokens": args.tokens,
                    "context_size": args.context_size}))
    train_run(args.out, settings, resume=args.resume, progress=not args.no_progress, shard_latents=args.shard_latents)
    return 0


def _harvest(args: argparse.Namespace) -> int:
    from .pipeline import harvest_run

    harvest_run(args.model, args.sites, args.out, corpus=args.corpus, tokens=args.tokens,
                context_size=args.context_size, text_field=args.text_field, seed=args.seed,
                batch_size=args.batch_size, dtype=args.dtype, model_dtype=args.model_dtype, device=args.device,
                resume=args.resume, progress=not args.no_progress)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluation.run import run_eval

    run_eval(args.sae, args.out, model=args.model, site=args.site, corpus=args.corpus, tokens=args.tokens,
             context_size=args.context_size, baselines=() if args.baselines == ["none"] else tuple(args.baselines),
             fit_tokens=args.fit_tokens, batch_size=args.batch_size,
             device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), progress=not args.no_progress)
    return 0


def _run(args: argparse.Namespace) -> int:
    """The main job: harvest, train, evaluate; each step resumes where an interrupted run stopped."""
    from .pipeline import main_job

    main_job(args.out, model=args.model, site=args.site, corpus=args.corpus, tokens=args.tokens, d_sae=args.d_sae,
             k=args.k, steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_tokens=args.eval_tokens,
             device=args.device, effects=args.effects, progress=not args.no_progress)
    return 0


def _register_commands(sub) -> None:
    """Subcommands that live in fastsae/commands/, one module each (see its docstring)."""
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rn = sub.add_parser("run", help="the main job: harvest Gemma 3 270M on the built-in corpus, train an SAE, "
                                    "evaluate it (resumable)")
    rn.add_argument("--model", default="gemma-3-270m")
    rn.add_argument("--site", default="resid_post.6")
    rn.add_argument("--corpus", default="english:train",
                    help="built-in english (classics + modern prose; :train holds out every tenth document)")
    rn.add_argument("--tokens", type=int, default=262_144, help="tokens to harvest (default 262144)")
    rn.add_argument("--d-sae", type=int, default=4096)
    rn.add_argument("--k", type=int, default=32)
    rn.add_argument("--steps", type=int, default=1000)
    rn.add_argument("--batch-size", type=int, default=1024)
    rn.add_argument("--lr", type=float, default=1e-3)
    rn.add_argument("--eval-tokens", type=int, default=4096)
    rn.add_argument("--effects", type=int, default=16, help="features whose ablation and attribution are measured")
    rn.add_argument("--device", help="default: cuda when available, else cpu")
    rn.add_argument("--out", default="runs/gemma")
    rn.add_argument("--no-progress", action="store_true")
    rn.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="ground-truth recovery on a toy dictionary (synthetic data, ~1.5 min)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.set_defaults(func=_demo)

    hv = sub.add_parser("harvest", help="run a model over a corpus and store its activations at sites")
    hv.add_argument("--model", default="gemma-3-270m",
                    help="'gemma-3-270m', 'minilm-l6', a local model directory or a cached hub id")
    hv.add_argument("--sites", nargs="+", default=["resid_post.6"], help="e.g. resid_post.6 mlp_hidden.3")
    hv.add_argument("--corpus", default="english-classics",
                    help="'english-classics' (built in), a .txt/.jsonl file, a directory of .txt, a saved dataset")
    hv.add_argument("--text-field", default="text", help="the text field of JSONL records / dataset columns")
    hv.add_argument("--tokens", type=int, default=262_144, help="token budget (before BOS/EOS/pad are dropped)")
    hv.add_argument("--context-size", type=int, default=128)
    hv.add_argument("--out", default="runs/store", help="store directory (default: runs/store)")
    hv.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                    help="storage dtype of the activations")
    hv.add_argument("--model-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    hv.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    hv.add_argument("--device", help="default: cuda when available, else cpu")
    hv.add_argument("--seed", type=int, default=0, help="window shuffle seed")
    hv.add_argument("--resume", action="store_true", help="continue an interrupted harvest in --out")
    hv.add_argument("--no-progress", action="store_true")
    hv.set_defaults(func=_harvest)

    tr = sub.add_parser("train", help="train an SAE on activations (an .npy/.safetensors array, or the toy)")
    tr.add_argument("--data", help="'toy' (default), an activation store directory (fastsae harvest), "
                                   "'stream' (straight from --model, no store), or an (N, d_in) .npy or "
                                   ".safetensors array")
    tr.add_argument("--site", help="the store's site to train on (needed when it holds several), or the "
                                   "model's with --data stream")
    tr.add_argument("--model", help="--data stream: the model to run ('gemma-3-270m', a directory)")
    tr.add_argument("--corpus", help="--data stream: the corpus (default english-classics)")
    tr.add_argument("--tokens", type=int, help="--data stream: token budget of the corpus windows")
    tr.add_argument("--context-size", type=int, help="--data stream: window length (default 128)")
    tr.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                    help="scale store activations to mean norm sqrt(d) while training, folded into the saved SAE "
                         "(default: on for stores)")
    tr.add_argument("--config", help='JSON file {"sae": {...}, "train": {...}, "data": {...}} ("train" by flat '
                                     'names, or nested by concern with "format_version": 2, as in a run.json); '
                                     'flags override it')
    tr.add_argument("--out", default="runs/train", help="run directory (default: runs/train)")
    tr.add_argument("--resume", action="store_true", help="continue from the run directory's newest checkpoint")
    tr.add_argument("--d-sae", type=int)
    tr.add_argument("--activation", choices=("relu", "topk", "batchtopk", "jumprelu"))
    tr.add_argument("--k", type=int)
    tr.add_argument("--l1", type=float, help="L1 coefficient (relu/jumprelu)")
    tr.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    tr.add_argument("--lr", type=float)
    tr.add_argument("--steps", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--checkpoint-every", type=int)
    tr.add_argument("--resample-every", type=int)
    tr.add_argument("--auxk", type=float, help="AuxK coefficient (topk/batchtopk; Gao et al. use 1/32)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--b-dec-init", choices=("zeros", "mean"),
                    help="'mean': start b_dec at the first batch's mean (residual streams have a large offset)")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--shard-latents", "--latent-shards", type=int, nargs="?", const=0, metavar="N",
                    help="under torchrun: split the latents over every rank (or over N ranks, the others being data "
                         "replicas); without it, torchrun trains data parallel")
    tr.set_defaults(func=_train)
    ev = sub.add_parser("eval", help="metrics.json and plots for trained SAEs (a sweep) against baselines")
    ev.add_argument("--sae", nargs="+", required=True, help="SAE directories, or sweep directories holding them")
    ev.add_argument("--model", help="default: the model recorded with the SAE")
    ev.add_argument("--site", help="default: the site recorded with the SAE")
    ev.add_argument("--corpus", help="default: the corpus of the SAE's activation store, else english-classics")
    ev.add_argument("--tokens", type=int, default=16_384, help="held-out eval tokens (default 16384)")
    ev.add_argument("--context-size", type=int, help="default: the store's, else 128")
    ev.add_argument("--baselines", nargs="+", default=["pca", "ica", "neurons", "random"],
                    choices=("pca", "ica", "neurons", "random", "none"))
    ev.add_argument("--fit-tokens", type=int, default=32_768, help="activations the baselines are fitted on")
    ev.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    ev.add_argument("--device", help="default: cuda when available, else cpu")
    ev.add_argument("--out", default="runs/eval", help="report directory (default: runs/eval)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_eval)
    _register_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
