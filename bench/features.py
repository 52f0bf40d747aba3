"""Throughput and memory of the feature pass, against harvesting on the same machine.

The pass reads an activation store, so it must outrun the harvest that wrote it (the issue asks for at
least 2x); its state grows with d_sae · n, never with the token count. Rows:

    harvest            model forward to the site + store writes (tokens/s)
    feature pass       store → SAE encode → per-latent top-n, samples, histograms (tokens/s), per d_sae,
                       each in a fresh process: its peak resident memory and the pass state's bytes
    effects            ablation (all top contexts) + attribution (5 contexts) per feature (features/min)
    browser            writing the site for the widest SAE, and the index's load time in headless Chromium

    python -m bench.features                                 # Gemma 3 270M (models extra), else a tiny model
    python -m bench.features --model tiny --tokens 16384 --d-sae 4096 16384
    python -m bench.features --screenshot runs/gemma/features/browser 1234   # a feature page as PNG
    python -m bench.features --screenshot runs/gemma/features/browser best --element '#logit-hist-box'

Saves JSON + markdown under bench/results/features/features-<device>-<date>.*
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.saving import RESULTS, run_environment, save_report
from fastsae import SAE, SAEConfig


def pass_in_process(store: str, site: str, d_sae: int, k: int, device: str, keep: str | None = None) -> dict:
    """One feature pass over store with a random TopK SAE of width d_sae (run in a fresh process); the cache
    is kept in `keep` when given."""
    from fastsae.analysis.features.feature_pass import FeatureConfig, FeaturePass, StoreSource, collect_features
    from fastsae.harvest import ActivationStore

    opened = ActivationStore(store)
    sae = SAE(SAEConfig(opened.sites[site], d_sae, activation="topk", k=k), seed=0, device=device)
    source = StoreSource(opened, site)
    cfg = FeatureConfig(checkpoint_seconds=1e9)
    with tempfile.TemporaryDirectory() as tmp:
        out = keep or tmp
        start, cpu = time.perf_counter(), time.process_time()
        collect_features(sae, source, out, cfg, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the pass's state as it starts (its size is fixed by d_sae and n), built on the CPU after the peak is
    # read: the meta device cannot run it (mix32 checks its input's values)
    state = FeaturePass(d_sae, cfg, source.context_size, source.n_sequences, "cpu").state_dict()
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"tokens_per_s": opened.tokens / seconds, "tokens_per_cpu_s": opened.tokens / cpu, "seconds": seconds,
            "peak_bytes": peak, "state_bytes": state_bytes}


def run_pass(store: Path, site: str, d_sae: int, k: int, device: str, keep: Path | None = None) -> dict:
    keep = None if keep is None else str(keep)
    code = ("import json, sys; from bench.features import pass_in_process; "
            f"print(json.dumps(pass_in_process({str(store)!r}, {site!r}, {d_sae}, {k}, {device!r}, {keep!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:  # the child's traceback, not only its exit status
        raise RuntimeError(f"the feature pass (d_sae {d_sae}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def effects_rate(model, tokenizer, store, site: str, d_sae: int, k: int, features: int, device: str) -> float:
    """Features per minute for ablation over every top context + attribution over 5."""
    from fastsae.analysis.features.cache_effects import measure_effects
    from fastsae.analysis.features.feature_pass import FeatureConfig, StoreSource, collect_features, store_windows

    sae = SAE(SAEConfig(store.sites[site], d_sae, activation="topk", k=k), seed=0, device=device)
    windows = store_windows(store, tokenizer)
    with tempfile.TemporaryDirectory() as out:
        cache = collect_features(sae, StoreSource(store, site, windows), out, FeatureConfig(), progress=False)
        chosen = [j for j in range(d_sae) if cache.stats(j)["count"] >= 20][:features]
        start = time.perf_counter()
        measure_effects(cache, model, site, sae, windows, chosen, progress=False)
        return len(chosen) / (time.perf_counter() - start) * 60


def browser_timing(cache_dir: Path, d_sae: int) -> dict:
    """Write the browser of a feature cache, and load its index and its last feature page in Chromium."""
    from fastsae.analysis.features.browser_site import write_browser
    from fastsae.analysis.features.chromium_driver import Chromium, find_chromium

    start = time.perf_counter()
    index = write_browser(cache_dir, progress=False)
    row = {"d_sae": d_sae, "write_s": time.perf_counter() - start,
           "data_mb": sum(f.stat().st_size for f in (index.parent / "data").iterdir()) / 2**20,
           "index_mb": (index.parent / "data" / "index.js").stat().st_size / 2**20}
    if find_chromium():
        with Chromium() as chrome:
            loads = []
            for _ in range(3):
                page = chrome.open(index.as_uri(), ready="document.body.dataset.readyMs")
                loads.append(int(page.evaluate("document.body.dataset.readyMs")))
                assert page.errors == [], page.errors
            row["index_ready_ms"] = sorted(loads)[1]  # the median of three loads
            # the last latent: its page loads the last data shard (it may never have fired: no histogram)
            page = chrome.open(index.parent.joinpath("feature.html").as_uri() + f"#{d_sae - 1}",
                               ready="document.body.dataset.readyMs")
            assert page.errors == [], page.errors
            row["feature_ready_ms"] = int(page.evaluate("document.body.dataset.readyMs"))
    return row


def best_latent(browser_dir: Path) -> int:
    """The latent the browser's index lists first (the best-looking by the one-token score) of the feature
    cache the browser sits in (its default place, <cache>/browser)."""
    from fastsae.analysis.features import FeatureCache
    from fastsae.analysis.features.ranking import ranked_latents

    ranked = ranked_latents(FeatureCache.load(browser_dir.parent))
    if not ranked:
        raise SystemExit(f"{browser_dir.parent}: no latent of this feature cache is ranked (none fired?)")
    return ranked[0]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m", help="'gemma-3-270m', a model directory, or 'tiny'")
    parser.add_argument("--site", default="resid_post.6")
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--d-sae", type=int, nargs="+", default=[4096, 16_384, 65_536],
                        help="widths of the pass; the widest also gets the browser timing")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--effects-features", type=int, default=4)
    parser.add_argument("--screenshot", nargs=2, metavar=("BROWSER_DIR", "LATENT"),
                        help="only save a screenshot of BROWSER_DIR/feature.html#LATENT into --out (LATENT "
                             "'best': the one the index lists first)")
    parser.add_argument("--element", metavar="SELECTOR",
                        help="with --screenshot: only this element of the page, e.g. '#logit-hist-box'")
    parser.add_argument("--out", default=str(RESULTS / "features"),
                        help="results directory (default: bench/results/features)")
    return parser


def _measure(args, model, tokenizer, model_name: str, device: str) -> tuple[list[dict], dict | None]:
    """The rows (harvest, the pass at every width, effects) and the browser's timing."""
    from fastsae.harvest import harvest_corpus

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        store = harvest_corpus(model, tokenizer, [args.site], "english-classics", Path(tmp) / "store",
                               tokens=args.tokens, progress=False)
        harvest_rate = store.tokens / (time.perf_counter() - start)
        harvest_cpu_rate = store.tokens / (time.process_time() - cpu)
        rows.append({"what": f"harvest: {model_name} forward to {args.site} + store (bf16)",
                     "tokens_per_s": harvest_rate, "tokens_per_cpu_s": harvest_cpu_rate})
        widest = max(args.d_sae)
        for d_sae in args.d_sae:
            keep = Path(tmp) / "widest" if d_sae == widest else None
            r = run_pass(store.path, args.site, d_sae, args.k, device, keep)
            rows.append({"what": f"feature pass from the store: TopK k={args.k}, d_sae {d_sae:,}", "d_sae": d_sae,
                         "tokens_per_s": r["tokens_per_s"], "x_harvest": r["tokens_per_s"] / harvest_rate,
                         "tokens_per_cpu_s": r["tokens_per_cpu_s"],
                         "x_harvest_cpu": r["tokens_per_cpu_s"] / harvest_cpu_rate,
                         "peak_mb": r["peak_bytes"] / 2**20, "state_mb": r["state_bytes"] / 2**20})
            print(rows[-1])
        rate = effects_rate(model, tokenizer, store, args.site, args.d_sae[0], args.k, args.effects_features, device)
        rows.append({"what": f"effects: ablation (20 contexts) + attribution (5 contexts), d_sae {args.d_sae[0]:,}",
                     "features_per_min": rate})
        browser = browser_timing(Path(tmp) / "widest", widest)
    return rows, browser


def _table(args, meta: dict, rows: list[dict], browser: dict | None) -> str:
    lines = [f"# Feature pass throughput and memory, {meta['device']} ({meta['threads']} threads), {meta['date']}",
             "", "Wall-clock rates depend on what else runs on the machine; tokens per CPU-second "
             "(process time, all threads) do not, "
             f"and their ratio to the harvest's is what to read. A {args.tokens:,}-token store of english-classics; "
             f"peak memory is the pass's process (resident set on CPU, allocated on CUDA).", "",
             "| stage | tokens/s (wall) | × harvest | tokens/CPU-s | × harvest | peak memory (MB) | pass state (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "tokens_per_s" in r:
            lines.append(f"| {r['what']} | {r['tokens_per_s']:,.0f} | {r.get('x_harvest', 1.0):.1f} | "
                         f"{r['tokens_per_cpu_s']:,.0f} | {r.get('x_harvest_cpu', 1.0):.1f} | "
                         f"{r.get('peak_mb', float('nan')):,.0f} | {r.get('state_mb', float('nan')):,.0f} |")
        else:
            lines.append(f"| {r['what']} | {r['features_per_min']:.1f} features/min | | | | | |")
    if browser:
        lines += ["", f"Browser for d_sae {browser['d_sae']:,}: written in {browser['write_s']:.0f} s, "
                      f"{browser['data_mb']:.0f} MB of data (index.js {browser['index_mb']:.1f} MB); "
                      f"index ready in {browser.get('index_ready_ms', 'n/a')} ms and a feature page in "
                      f"{browser.get('feature_ready_ms', 'n/a')} ms in headless Chromium (navigation start to "
                      f"rendered, data parsing included)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.screenshot:
        from fastsae.analysis.features.chromium_driver import screenshot_feature

        browser_dir, latent = Path(args.screenshot[0]), args.screenshot[1]
        latent = best_latent(browser_dir) if latent == "best" else int(latent)
        what = "feature-page" if args.element is None else "element"
        name = f"{what}-{latent}-{dt.date.today().isoformat()}.png"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = screenshot_feature(browser_dir, latent, Path(args.out) / name, selector=args.element)
        print(f"saved {path}")
        return 0
    from bench.harvest import bench_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, model_name = bench_model(args.model, device)
    rows, browser = _measure(args, model, tokenizer, model_name, device)
    meta = run_environment(device, model=model_name, tokens=args.tokens)
    save_report(args.out, f"features-{meta['device'].replace(' ', '_')}-{meta['date']}",
                {"meta": meta, "rows": rows, "browser": browser}, _table(args, meta, rows, browser))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
