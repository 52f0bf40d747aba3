"""Autointerp of an SAE against its PCA, ICA and neuron baselines, with the local backend by default (Gemma
3 270M: a weak explainer, so the scores are a floor), and its throughput in features per minute.

    python -m bench.autointerp --sae runs/gemma/train/sae --features 100
    python -m bench.autointerp --sae /tmp/h16-run/train/sae --features 10 --backend openai:http://host:8000/v1 \
        --model llama-3.1-8b-instruct

Runs `fastsae autointerp` into --work (feature caches, request cache) and copies the report, the summary
table and the plot to bench/results/analysis/autointerp-<backend model>-<device>-<date>/, with the throughput of
the run (requests that came from the request cache cost nothing, so time a fresh cache).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shutil
import time
from pathlib import Path

import torch

from bench.saving import RESULTS
from fastsae import io
from fastsae.analysis.autointerp.autointerp_run import run_autointerp


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True)
    p.add_argument("--features", default="100", help="per kind (SAE and each baseline; issue 28 asks >= 100)")
    p.add_argument("--baselines", nargs="+", default=["pca", "ica", "neurons", "random"])
    p.add_argument("--backend", default="local:gemma-3-270m")
    p.add_argument("--model")
    p.add_argument("--work", default="runs/bench-autointerp", help="feature caches, request cache, full report")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    work = Path(args.work)
    start = time.perf_counter()
    report = run_autointerp(backend=args.backend, model=args.model, sae=args.sae, features=args.features,
                        baselines=tuple(args.baselines), out=work / "report", cache=work / "requests",
                        device=args.device, progress=True)
    total = time.perf_counter() - start
    meta = report["meta"]
    threads = torch.get_num_threads()
    name = f"autointerp-{Path(meta['model']).name}-{args.device}-{dt.date.today().isoformat()}"
    dest = RESULTS / "analysis" / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("report.json", "summary.md", "scores.png"):
        if (work / "report" / f).is_file():
            shutil.copy(work / "report" / f, dest / f)
    io.write_json(dest / "throughput.json", {
        "device": args.device, "threads": threads, "cpu": platform.processor() or platform.machine(),
        "features": meta["features"], "autointerp_seconds": meta["seconds"],
        "features_per_minute": meta["features_per_minute"], "seconds_with_feature_passes": round(total, 1),
        "requests": meta["usage"]["requests"], "cached": meta["usage"]["cached"],
        "prompt_tokens": meta["usage"]["prompt_tokens"], "completion_tokens": meta["usage"]["completion_tokens"],
        "command": f"python -m bench.autointerp --sae {args.sae} --features {args.features} --backend {args.backend}"
                   + (f" --model {args.model}" if args.model else ""),
        "date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__})
    print(f"\n{meta['features']} features in {meta['seconds']:.0f} s: {meta['features_per_minute']} per minute on "
          f"{args.device} ({threads} threads; {meta['usage']['requests']} requests, {meta['usage']['cached']} cached)")
    print(f"results: {dest}")


if __name__ == "__main__":
    main()
