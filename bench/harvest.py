"""Throughput of the data path: harvesting (the LM forward included), the shuffling loader alone, and
the trainer that consumes it, so one can see the loader is not the bottleneck.

    python -m bench.harvest                          # Gemma 3 270M (models extra), else a tiny random model
    python -m bench.harvest --model tiny --tokens 65536

Prints a table and saves JSON + markdown under bench/results/harvest/harvest-<device>-<date>.*
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.saving import RESULTS, run_environment, save_report
from fastsae import SAE, SAEConfig
from fastsae.harvest import ShuffledLoader, harvest_corpus
from fastsae.model import load, random_causal_lm
from fastsae.train import TrainConfig, Trainer


def load_model(name: str, device: str):
    if name != "tiny":
        return load(name, device=device)
    model, tokenizer = random_causal_lm(hidden_size=640, num_layers=8, intermediate_size=2048, num_heads=8)
    return model.to(device), tokenizer


TINY = "tiny random GPT-NeoX (8 layers, d 640)"


def bench_model(name: str, device: str):
    """(model, tokenizer, its name in the results): name, or the tiny model where the models extra is missing."""
    try:
        return *load_model(name, device), TINY if name == "tiny" else name
    except ImportError as err:
        print(f"{err}; measuring with a {TINY} instead")
        return *load_model("tiny", device), TINY


def loader_rate(store, site: str, batch_size: int, device: str, min_seconds: float = 3.0) -> float:
    """Vectors per second the loader serves (shard reads, checksums, shuffles, device copies)."""
    loader = ShuffledLoader(store, site, batch_size, device=device, shards_in_memory=2)
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for batch in loader:
            rows += batch.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return rows / (time.perf_counter() - start)


def trainer_rate(d_in: int, d_sae: int, k: int, batch_size: int, device: str, steps: int = 20) -> float:
    """Vectors per second a TopK trainer consumes at this shape (after 3 warm-up steps)."""
    sae = SAE(SAEConfig(d_in, d_sae, activation="topk", k=k), seed=0, device=device)
    trainer = Trainer(sae, TrainConfig.flat(progress=False, total_steps=steps + 3))
    x = torch.randn(batch_size, d_in, device=device)
    for _ in range(3):
        trainer.step(x, metrics=False)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(x, metrics=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m", help="'gemma-3-270m', a model directory, or 'tiny'")
    parser.add_argument("--site", default="resid_post.6")
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--batch-size", type=int, default=1024, help="loader/trainer batch")
    parser.add_argument("--model-batch-size", type=int, default=8, help="windows per harvest forward")
    parser.add_argument("--trainer-steps", type=int, default=20)
    parser.add_argument("--loader-seconds", type=float, default=3.0, help="how long to time the loader")
    parser.add_argument("--out", default=str(RESULTS / "harvest"),
                        help="results directory (default: bench/results/harvest)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, model_name = bench_model(args.model, device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = harvest_corpus(model, tokenizer, [args.site], "english-classics", Path(tmp) / "store",
                               tokens=args.tokens, batch_size=args.model_batch_size, progress=False)
        harvest_s = time.perf_counter() - start
        d = store.sites[args.site]
        rows.append({"what": f"harvest: {model_name} forward to {args.site} + store (bf16)",
                     "tokens_per_s": store.tokens / harvest_s})
        rows.append({"what": f"loader alone (batch {args.batch_size}, to {device})",
                     "tokens_per_s": loader_rate(store, args.site, args.batch_size, device, args.loader_seconds)})
    for d_sae in (4096, 16_384):
        rows.append({"what": f"trainer: TopK k=32, d_in {d}, d_sae {d_sae}, batch {args.batch_size}",
                     "tokens_per_s": trainer_rate(d, d_sae, 32, args.batch_size, device, args.trainer_steps)})
    meta = run_environment(device, model=model_name, tokens=args.tokens)
    name = meta["device"]
    lines = [f"# Data-path throughput, {name} ({meta['threads']} threads), {meta['date']}", "",
             "| stage | tokens/s |", "|---|---:|"]
    lines += [f"| {r['what']} | {r['tokens_per_s']:,.0f} |" for r in rows]
    table = "\n".join(lines)
    save_report(args.out, f"harvest-{name.replace(' ', '_')}-{meta['date']}", {"meta": meta, "rows": rows}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
