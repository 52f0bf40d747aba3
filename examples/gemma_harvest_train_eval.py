"""Harvest, train and evaluate an SAE on Gemma 3 270M with the Python API (what `fastsae run` does
with the command-line tools), smaller: about 7 minutes on 2 CPU cores. Needs the models extra.

    python examples/gemma_harvest_train_eval.py
"""

from pathlib import Path

from fastsae import SAE, SAEConfig
from fastsae.evaluation import evaluate_with_baselines, write_report
from fastsae.evaluation.run import format_table
from fastsae.harvest import ActivationStore, ShuffledLoader, harvest_corpus, read_documents, token_windows
from fastsae.model import load
from fastsae.train import TrainConfig, train

OUT = Path("runs/example")
SITE = "resid_post.6"
model, tokenizer = load("gemma-3-270m")

# 1. Activations at the middle of the residual stream, on the built-in corpus (resumable).
store_dir = OUT / "store"
if (store_dir / "manifest.json").is_file():
    store = ActivationStore(store_dir)
else:
    store = harvest_corpus(model, tokenizer, [SITE], "english-classics", store_dir, tokens=131_072, context_size=128)
print(f"{store.tokens:,} vectors of d={store.sites[SITE]}, mean norm {store.mean_norm(SITE):.1f}")

# 2. A TopK SAE on inputs scaled to mean norm sqrt(d); the scale is folded in afterwards.
loader = ShuffledLoader(store, SITE, batch_size=1024, normalize=True, drop_last=True)
sae = SAE(SAEConfig(d_in=640, d_sae=4096, activation="topk", k=32), seed=0)
steps = 600
result = train(sae, loader.batches(steps), TrainConfig(total_steps=steps, lr=1e-3, b_dec_init="mean",
                                                       auxk_coefficient=1 / 32))
sae = result.sae.fold_input_scale_(store.norm_scale(SITE))
sae.metadata.update(model="gemma-3-270m", site=SITE, store=str(store_dir.resolve()))
sae.save(OUT / "sae")

# 3. Held-out windows (the far end of the harvest's shuffled window order) and the report.
windows = token_windows(tokenizer, read_documents("english-classics"), 128)[-16:]
fit_x = store.load_shard(0, keys=(SITE,))[SITE][:16_384].float()
results = evaluate_with_baselines(model, SITE, windows, {"sae": sae}, fit_x, batch_size=4)
write_report(OUT / "eval", results, {"model": "gemma-3-270m", "site": SITE}, baselines=("pca", "ica", "neurons",
                                                                                         "random"))
print(format_table(results))
print(f"outputs in {OUT.resolve()}/")
