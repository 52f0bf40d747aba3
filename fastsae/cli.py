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
                           "resample_every": args.resample_every, "auxk_coefficient": args.auxk, "seed": args.seed},
                 "data": {"source": args.data, "batch_size": args.batch_size, "seed": args.seed}}
        for key, values in flags.items():
            run[key].update({k: v for k, v in values.items() if v is not None})
    data_cfg = {"source": "toy", "batch_size": 1024, "seed": 0, **run["data"]}
    train_cfg = TrainConfig(**{"total_steps": 2000, **run["train"], "progress": not args.no_progress})
    steps = train_cfg.total_steps
    if data_cfg["source"] == "toy":
        from .toy import ToyDictionary

        toy = ToyDictionary.random(seed=data_cfg["seed"])
        d_in = toy.features.shape[1]
        batches = toy.batches(data_cfg["batch_size"], steps, seed=data_cfg["seed"] + 1)
    else:
        array = load_array(data_cfg["source"])
        d_in = array.shape[1]
    sae_cfg = SAEConfig(**{"d_in": d_in, "d_sae": 8 * d_in, **run["sae"]})
    if data_cfg["source"] != "toy":
        batches = ArrayBatches(array, data_cfg["batch_size"], steps, seed=data_cfg["seed"],
                               dtype=sae_cfg.torch_dtype)
    run = {"sae": sae_cfg.to_dict(), "train": {k: v for k, v in dataclasses.asdict(train_cfg).items()
                                               if k != "progress"}, "data": data_cfg}
    io.write_json(run_file, run)
    torch.manual_seed(train_cfg.seed)
    trainer = Trainer(SAE(sae_cfg, seed=train_cfg.seed), train_cfg, run_dir=out)
    result = trainer.fit(batches, resume=args.resume)
    result.sae.save(out / "sae")
    if result.history:
        print(json.dumps({k: v for k, v in result.history[-1].items() if v is not None}))
    print(f"run directory: {out.resolve()} (sae/, metrics.jsonl, checkpoints/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="ground-truth recovery on a toy dictionary (the built-in main job)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.set_defaults(func=_demo)

    tr = sub.add_parser("train", help="train an SAE on activations (an .npy/.safetensors array, or the toy)")
    tr.add_argument("--data", help="'toy' (default) or a path to an (N, d_in) .npy or .safetensors array")
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
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_train)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
