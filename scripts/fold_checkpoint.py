"""A training checkpoint as a finished SAE: the activation store's normalisation scale folded into its weights
and the provenance recorded, what `fastsae.pipeline.finish_sae` does at the end of a run that completes.
Used for bench/results/harvest/corpus-cpu-2026-11-21/ (a main-job run stopped at step 750 of 1,000):

    python scripts/fold_checkpoint.py runs/gemma-mix/train/checkpoints/step-00000750 runs/gemma-mix/store \
        runs/gemma-mix/sae750
"""

import argparse

from fastsae import SAE
from fastsae.harvest import ActivationStore


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory (holding sae/)")
    parser.add_argument("store", help="the activation store the run trained on")
    parser.add_argument("out", help="where the finished SAE is saved")
    parser.add_argument("--model", default="gemma-3-270m", help="recorded in the SAE's metadata")
    parser.add_argument("--site", default="resid_post.6", help="the store's site, whose scale is folded in")
    args = parser.parse_args(argv)
    sae = SAE.load(f"{args.checkpoint}/sae")
    store = ActivationStore(args.store)
    sae.fold_input_scale_(store.norm_scale(args.site))
    sae.metadata.update(model=args.model, site=args.site, store=str(store.path.resolve()))
    sae.save(args.out)
    print("saved", args.out, sae.cfg)


if __name__ == "__main__":
    main()
