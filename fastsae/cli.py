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
    from . import io

    # the run directory's writer lock before run.json is touched: a second `fastsae train --out` into it
    # is refused naming this one, and cannot replace this run's configuration
    with io.DirectoryLock(args.out, "fastsae train"):
        return _train_locked(args)


def _train_locked(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    import torch

    from . import io
    from .config import SAEConfig
    from .sae import SAE
    from .train import TrainConfig, Trainer
    from .train.data import ArrayBatches, load_array

    out = Path(args.out)
    run_file = out / "run.json"
    if args.resume and run_file.is_file():
        run = io.read_json(run_file)  # a resumed run keeps its own configuration
    else:
        run = io.read_json(args.config) if args.config else {"sae": {}, "train": {}, "data": {}}
        for key in ("sae", "train", "data"):
            run.setdefault(key, {})
        flags = {"sae": {"d_sae": args.d_sae, "activation": args.activation, "k": args.k,
                         "l1_coefficient": args.l1, "dtype": args.dtype},
                 "train": {"lr": args.lr, "total_steps": args.steps, "checkpoint_every": args.checkpoint_every,
                           "resample_every": args.resample_every, "auxk_coefficient": args.auxk, "seed": args.seed,
                           "b_dec_init": args.b_dec_init},
                 "data": {"source": args.data, "batch_size": args.batch_size, "seed": args.seed,
                          "site": args.site, "normalize": args.normalize, "model": args.model,
                          "corpus": args.corpus, "tokens": args.tokens, "context_size": args.context_size}}
        for key, values in flags.items():
            run[key].update({k: v for k, v in values.items() if v is not None})
    data_cfg = {"source": "toy", "batch_size": 1024, "seed": 0, **run["data"]}
    store = None
    train_cfg = TrainConfig(**{"total_steps": 2000, **run["train"], "progress": not args.no_progress})
    steps = train_cfg.total_steps
    if data_cfg["source"] == "toy":
        from .toy import ToyDictionary

        toy = ToyDictionary.random(seed=data_cfg["seed"])
        d_in = toy.features.shape[1]
        batches = toy.batches(data_cfg["batch_size"], steps, seed=data_cfg["seed"] + 1)
    elif (Path(data_cfg["source"]) / "manifest.json").is_file():  # an activation store
        from .harvest import ActivationStore, ShuffledLoader

        store = ActivationStore(data_cfg["source"])
        if data_cfg.get("site") is None:
            if len(store.sites) != 1:
                raise SystemExit(f"--site: the store holds {sorted(store.sites)}; name one")
            data_cfg["site"] = next(iter(store.sites))
        data_cfg.setdefault("normalize", True)
        d_in = store.sites[data_cfg["site"]] if data_cfg["site"] in store.sites else 0
    elif data_cfg["source"] == "stream":  # straight from the model, no store
        batches, d_in = _stream(data_cfg)
    else:
        array = load_array(data_cfg["source"])
        d_in = array.shape[1]
    sae_cfg = SAEConfig(**{"d_in": d_in, "d_sae": 8 * d_in, **run["sae"]})
    if store is not None:
        loader = ShuffledLoader(store, data_cfg["site"], data_cfg["batch_size"], seed=data_cfg["seed"],
                                dtype=sae_cfg.torch_dtype, normalize=data_cfg["normalize"], drop_last=True)
        batches = loader.batches(steps)
    elif data_cfg["source"] not in ("toy", "stream"):
        batches = ArrayBatches(array, data_cfg["batch_size"], steps, seed=data_cfg["seed"],
                               dtype=sae_cfg.torch_dtype)
    run = {"sae": sae_cfg.to_dict(), "train": {k: v for k, v in dataclasses.asdict(train_cfg).items()
                                               if k != "progress"}, "data": data_cfg}
    io.write_json(run_file, run)
    torch.manual_seed(train_cfg.seed)
    trainer = Trainer(SAE(sae_cfg, seed=train_cfg.seed), train_cfg, run_dir=out)
    result = trainer.fit(batches, resume=args.resume)
    if store is not None:
        result.sae.metadata.update(model=store.meta["model"], site=data_cfg["site"], store=str(store.path.resolve()))
        if data_cfg["normalize"]:  # the saved SAE takes raw activations
            result.sae.fold_input_scale_(store.norm_scale(data_cfg["site"]))
    if data_cfg["source"] == "stream":
        result.sae.metadata.update(model=data_cfg["model"], site=data_cfg["site"])
        if data_cfg["normalize"]:
            result.sae.fold_input_scale_(data_cfg["norm_scale"])
    result.sae.save(out / "sae")
    if result.history:
        print(json.dumps({k: v for k, v in result.history[-1].items() if v is not None}))
    print(f"run directory: {out.resolve()} (sae/, metrics.jsonl, checkpoints/)")
    return 0


def _stream(data_cfg: dict):
    """Batches straight from the model's forward (a mixing buffer, no store). The normalising scale is
    measured on the first windows once and kept in data_cfg, so a resumed run uses the same."""
    from .harvest import StreamingActivations, read_documents, token_windows
    from .model import capture, keep_mask, load, special_token_ids

    for key in ("model", "site"):
        if not data_cfg.get(key):
            raise SystemExit(f"--data stream needs --{key}")
    data_cfg.setdefault("corpus", "english-classics")
    data_cfg.setdefault("context_size", 128)
    data_cfg.setdefault("normalize", True)
    model, tokenizer = load(data_cfg["model"], device=_device(data_cfg.get("device")))
    windows = token_windows(tokenizer, read_documents(data_cfg["corpus"]), data_cfg["context_size"],
                            data_cfg.get("tokens"), seed=data_cfg["seed"])
    device = next(model.parameters()).device
    probe = capture(model, [data_cfg["site"]], input_ids=windows[:8].to(device))[data_cfg["site"]]
    excluded = special_token_ids(model, tokenizer)
    keep = keep_mask(windows[:8], excluded)
    d_in = probe.shape[-1]
    if data_cfg["normalize"] and "norm_scale" not in data_cfg:
        data_cfg["norm_scale"] = d_in ** 0.5 / float(probe[keep.to(device)].double().norm(dim=-1).mean())
    stream = StreamingActivations(model, data_cfg["site"], windows, data_cfg["batch_size"], seed=data_cfg["seed"],
                                  scale=data_cfg.get("norm_scale", 1.0) if data_cfg["normalize"] else 1.0,
                                  exclude_token_ids=excluded)
    return stream, d_in


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _harvest(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import torch

    from .harvest import ActivationStore, harvest_corpus
    from .model import load

    device = _device(args.device)
    model, tokenizer = load(args.model, dtype=getattr(torch, args.model_dtype), device=device)
    before = ActivationStore(args.out).tokens if args.resume and (Path(args.out) / "manifest.json").is_file() else 0
    start = time.perf_counter()
    store = harvest_corpus(model, tokenizer, args.sites, args.corpus, args.out, tokens=args.tokens,
                           context_size=args.context_size, text_field=args.text_field, seed=args.seed,
                           batch_size=args.batch_size, dtype=getattr(torch, args.dtype), resume=args.resume,
                           model_name=args.model, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    sites = ", ".join(f"{s}: d={d}" for s, d in store.sites.items())
    if store.tokens == before:
        print(f"the store was already complete: {store.tokens:,} vectors per site ({sites})")
    else:
        print(f"harvested {store.tokens - before:,} vectors per site ({sites}) in {seconds:.1f} s: "
              f"{(store.tokens - before) / seconds:,.0f} tokens/s on {device} (BOS/EOS/pad positions not stored)")
    print(f"activation store: {store.path.resolve()}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluation.run import run_eval

    run_eval(args.sae, args.out, model=args.model, site=args.site, corpus=args.corpus, tokens=args.tokens,
             context_size=args.context_size, baselines=() if args.baselines == ["none"] else tuple(args.baselines),
             fit_tokens=args.fit_tokens, batch_size=args.batch_size, device=_device(args.device),
             progress=not args.no_progress)
    return 0


def _run(args: argparse.Namespace) -> int:
    """The main job: harvest, train, evaluate; each step resumes where an interrupted run stopped."""
    import time
    from pathlib import Path

    out = Path(args.out)
    start = time.perf_counter()
    common = ["--no-progress"] if args.no_progress else []
    device = ["--device", args.device] if args.device else []
    harvest = ["harvest", "--model", args.model, "--sites", args.site, "--corpus", args.corpus, "--tokens",
               str(args.tokens), "--out", str(out / "store"), *device, *common]
    if (out / "store" / "manifest.json").is_file():
        harvest.append("--resume")
    print(f"[1/3] harvest {args.tokens:,} tokens of {args.corpus} from {args.model} at {args.site}")
    main(harvest)
    print(f"[2/3] train a TopK SAE (d_sae {args.d_sae}, k {args.k}) for {args.steps} steps")
    main(["train", "--data", str(out / "store"), "--activation", "topk", "--k", str(args.k), "--d-sae",
          str(args.d_sae), "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--auxk", "0.03125",
          "--lr", str(args.lr), "--b-dec-init", "mean",
          "--checkpoint-every", str(max(1, args.steps // 4)), "--out", str(out / "train"), "--resume", *common])
    print(f"[3/3] evaluate on {args.eval_tokens:,} held-out tokens against PCA, ICA, neuron and random baselines")
    main(["eval", "--sae", str(out / "train" / "sae"), "--tokens", str(args.eval_tokens), "--out",
          str(out / "eval"), *device, *common])
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min; outputs in {out.resolve()}/: store/ (activations),"
          f" train/sae/ (the SAE), train/metrics.jsonl, eval/metrics.json, eval/pareto.png, eval/density.png")
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
    tr.add_argument("--config", help='JSON file {"sae": {...}, "train": {...}, "data": {...}}; flags override it')
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
