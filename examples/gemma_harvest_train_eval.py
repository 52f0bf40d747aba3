"""Harvest, train and evaluate an SAE on Gemma 3 270M with the Python API: the library functions that
`fastsae run` chains, smaller: about 7 minutes on 2 CPU cores. Needs the models extra.

    python examples/gemma_harvest_train_eval.py

Each step resumes where an interrupted run stopped.
"""

from pathlib import Path

from fastsae.evaluation.eval_run import run_eval
from fastsae.pipeline import harvest_run, settings_from, train_run

OUT = Path("runs/example")
SITE = "resid_post.6"

# 1. Activations at the middle of the residual stream, on the built-in corpus; the manifest records
#    which windows of the corpus' seeded order the store holds.
store = harvest_run("gemma-3-270m", [SITE], OUT / "store", tokens=131_072, context_size=128, resume=True)
print(f"{store.tokens:,} vectors of d={store.sites[SITE]}, mean norm {store.mean_norm(SITE):.1f}")

# 2. A TopK SAE on inputs scaled to mean norm sqrt(d); the loader's scale is folded into the saved SAE,
#    whose metadata records the model, site, store and the windows it trained on.
settings = settings_from(
    sae={"activation": "topk", "k": 32, "d_sae": 4096},
    train={"total_steps": 600, "lr": 1e-3, "b_dec_init": "mean", "auxk_coefficient": 1 / 32},
    data={"source": str(OUT / "store"), "batch_size": 1024})
sae = train_run(OUT / "train", settings, resume=True)

# 3. The report on 16 windows the SAE never trained on (read from its record), against baselines.
run_eval([OUT / "train" / "sae"], OUT / "eval", tokens=16 * 128, fit_tokens=16_384)
print(f"outputs in {OUT.resolve()}/")
