"""The ICA baseline's fit at the main job's shape, scikit-learn's FastICA against fastsae.evaluation.ica (the
same algorithm in PyTorch): time, and how far apart the two results are after the same iterations.

The main job fits FastICA(640 components, whiten="unit-variance", max_iter=400, tol=1e-3) on 32,768 float64
activations of Gemma 3 270M at resid_post.6 (d 640); its fit did not converge (bench/results/main-job/main-job-*/run.log
warns), so it ran all 400 iterations.
Both fits here start from the same activations (the first 32,768 kept tokens of the corpus's windows) and
are then applied, with the main job's L0, to the next --held-out tokens to give the baseline's FVU. The
activations are rounded to bfloat16 first, as the main job's activation store keeps them (--dtype).

    python -m bench.ica --work /tmp/ica                          # 20 iterations of each: time per iteration
    python -m bench.ica --work /tmp/ica --iterations 400 --only scikit-learn    # one full fit per step
    python -m bench.ica --work /tmp/ica --iterations 400 --only fastsae         # then the table of both
    python -m bench.ica --work /tmp/ica --only scikit-learn-permuted            # and rounding's yardstick
    python -m bench.ica --work /tmp/ica --only fastsae-float32-iterations       # what baselines.fit runs on a CPU

Each step keeps what it computed under --work (the activations, each fit's matrices and times), so a long
comparison splits into short steps; a fit of 1 iteration is run too, to separate the setup (centring,
whitening by SVD, the start) from the time per iteration: "400 iterations" is setup + 400 × that where a fit
stopped earlier (converged or cut short). Prints a table and saves JSON + markdown under
bench/results/evaluation/ica-<device>-<date>-<dtype>-<iterations>-iterations.*
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from bench.saving import RESULTS, run_environment, save_report
from fastsae import io
from fastsae.evaluation import baselines
from fastsae.evaluation.ica import fast_ica

IMPLEMENTATIONS = ("scikit-learn", "fastsae")
# scikit-learn on the same rows in another order: the same fit in exact arithmetic, so how far it lands from
# scikit-learn's own is how far float64 rounding alone moves the result (the yardstick for fastsae's distance)
PERMUTED = "scikit-learn-permuted"
# fastsae with its iterations' GEMMs and tanh in float32 (whitening and W in float64): what baselines.fit runs on
# a CPU (fast_ica's data_dtype)
FLOAT32 = "fastsae-float32-iterations"
OPTIONAL = (FLOAT32, PERMUTED)
FULL = 400  # baselines.fit's max_iter
TOL = 1e-3  # baselines.fit's tol


def activations(work: Path, model: str, site: str, corpus: str, tokens: int, device: str) -> torch.Tensor:
    """(tokens, d) float32 activations at site over the corpus's windows of 128 (special tokens dropped, as
    run_eval's fit), captured once and kept in work/activations.safetensors."""
    path = work / "activations.safetensors"
    if path.exists():
        x = io.read_tensors(path)["x"]
        if x.shape[0] >= tokens:
            return x[:tokens]
    from fastsae.harvest import read_documents, token_windows
    from fastsae.model import capture, keep_mask, load, special_token_ids

    lm, tokenizer = load(model, device=device)
    windows = token_windows(tokenizer, read_documents(corpus), 128, seed=0)
    keep = keep_mask(windows, special_token_ids(lm, tokenizer))
    rows, n = [], 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], 8):
            acts = capture(lm, [site], input_ids=windows[i:i + 8].to(device))[site]
            rows.append(acts[keep[i:i + 8].to(device)].float().cpu())
            n += rows[-1].shape[0]
            if n >= tokens:
                break
    x = torch.cat(rows)[:tokens]
    if x.shape[0] < tokens:
        raise ValueError(f"corpus {corpus!r} gives only {x.shape[0]} kept tokens; asked for {tokens}")
    io.write_tensors(path, {"x": x.contiguous()}, {"model": model, "site": site, "corpus": corpus})
    return x


def fit(implementation: str, xc: torch.Tensor, n: int, iterations: int) -> tuple[dict, int, float]:
    """One fit of xc (N, d) float64, centred: ({"mixing": (d, n), "components": (n, d)}, n_iter, seconds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn when max_iter is reached: n_iter says so
        if implementation == PERMUTED:
            xc = xc[torch.randperm(xc.shape[0], generator=torch.Generator().manual_seed(0))]
        start = time.perf_counter()
        if implementation in ("fastsae", FLOAT32):
            data_dtype = torch.float32 if implementation == FLOAT32 else None
            r = fast_ica(xc, n, seed=0, max_iter=iterations, tol=TOL, data_dtype=data_dtype)
            out, n_iter = {"mixing": r.mixing, "components": r.components}, r.n_iter
        else:
            from sklearn.decomposition import FastICA

            r = FastICA(n_components=n, whiten="unit-variance", random_state=0, max_iter=iterations, tol=TOL)
            r.fit(xc.numpy())
            out = {"mixing": torch.from_numpy(r.mixing_), "components": torch.from_numpy(r.components_)}
            n_iter = r.n_iter_
        seconds = time.perf_counter() - start
    return out, n_iter, seconds


def cached_fit(stem: Path, implementation: str, xc: torch.Tensor, n: int, iterations: int) -> dict:
    """fit(), or the result an earlier step kept in <stem>-<implementation>-<iterations>.*"""
    stem = stem.with_name(f"{stem.name}-{implementation}-{iterations}")
    if not stem.with_suffix(".json").exists():
        matrices, n_iter, seconds = fit(implementation, xc, n, iterations)
        io.write_tensors(stem.with_suffix(".safetensors"), {k: v.contiguous() for k, v in matrices.items()})
        io.write_json(stem.with_suffix(".json"), {"n_iter": n_iter, "seconds": seconds,
                                                  "threads": torch.get_num_threads()})
        print(f"{implementation}: {n_iter} iterations in {seconds:.1f} s", flush=True)
    return {**io.read_json(stem.with_suffix(".json")), **io.read_tensors(stem.with_suffix(".safetensors"))}


def ica_fvu(mixing: torch.Tensor, mu: torch.Tensor, k: int, x: torch.Tensor) -> float:
    """FVU on x (M, d) of the ICA baseline built from mixing (d, n) as baselines.fit builds it."""
    dec = baselines.ica_decomposition(mixing, mu, k)
    resid = x - dec.decode(dec.encode(x))
    return float(resid.double().square().sum() / (x.double() - x.double().mean(0)).square().sum())


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True,
                        help="directory kept between steps (activations, fits): one per model, site and corpus")
    parser.add_argument("--iterations", type=int, default=20, help="iterations of each fit (the main job: 400)")
    parser.add_argument("--only", choices=(*IMPLEMENTATIONS, *OPTIONAL), help="fit only this one in this step")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--site", default="resid_post.6")
    parser.add_argument("--corpus", default="english:train")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="activations rounded to this first (the main job's store: bfloat16)")
    parser.add_argument("--tokens", type=int, default=32_768, help="activations to fit on (the main job: 32,768)")
    parser.add_argument("--held-out", type=int, default=4_096, help="the next tokens, for the baseline's FVU")
    parser.add_argument("--k", type=int, default=32, help="coefficients kept per token (the main job's L0: 32)")
    parser.add_argument("--out", default=str(RESULTS / "evaluation"),
                        help="results directory (default: bench/results/evaluation)")
    return parser


def _fits(args, stem: Path, xc: torch.Tensor) -> dict:
    """{implementation: {1: fit, iterations: fit}}: this step's (--only, else both), and what earlier steps kept
    under --work, in the table's order."""
    n, iters = xc.shape[1], args.iterations

    def done(impl):
        return all(stem.with_name(f"{stem.name}-{impl}-{i}.json").exists() for i in (1, iters))

    fits = {}
    for impl in (args.only,) if args.only else IMPLEMENTATIONS:
        if not done(impl):
            fit(impl, xc[:256, :8].clone(), 8, 2)  # warm-up, untimed: imports, first-call allocations
        fits[impl] = {i: cached_fit(stem, impl, xc, n, i) for i in (1, iters)}
    for impl in (*IMPLEMENTATIONS, *OPTIONAL):  # what earlier steps fitted
        if impl not in fits and done(impl):
            fits[impl] = {i: cached_fit(stem, impl, xc, n, i) for i in (1, iters)}
    return {impl: fits[impl] for impl in (*IMPLEMENTATIONS, *OPTIONAL) if impl in fits}


def _runs(fits: dict, iters: int, mu: torch.Tensor, k: int, held_out: torch.Tensor) -> dict:
    """Per implementation: setup and per-iteration time (from the 1-iteration fit), the full fit's, its FVU."""
    runs = {}
    for impl, by in fits.items():
        one, cut = by[1], by[iters]
        per_iteration = (cut["seconds"] - one["seconds"]) / max(1, cut["n_iter"] - 1)
        setup = one["seconds"] - per_iteration
        runs[impl] = {"iterations": cut["n_iter"], "converged": cut["n_iter"] < iters, "fit_s": cut["seconds"],
                      "setup_s": setup, "per_iteration_s": per_iteration, "full_fit_s": setup + FULL * per_iteration,
                      "full_fit_measured": cut["n_iter"] == FULL, "threads": cut["threads"],
                      "heldout_fvu": ica_fvu(cut["mixing"].to(torch.float64), mu, k, held_out)}
    return runs


def _table(args, info: dict, n: int, runs: dict, summary: dict) -> str:
    agreement, iters = summary["difference_to_scikit_learn"], args.iterations
    lines = [f"# FastICA at the main job's baseline shape, {info['device']} ({info['threads']} threads), "
             f"{info['date']}", "",
             f"{args.tokens:,} activations of {args.model} at {args.site} ({args.corpus}, rounded to {args.dtype}, "
             f"fitted in float64) × d {n}, {n} components, unit-variance whitening, tol {TOL:g}, max_iter {iters}. "
             f"FVU: the ICA baseline (top {args.k} coefficients) on the next {args.held_out:,} tokens. "
             f"{FULL} iterations: measured where a fit ran them, else setup + {FULL} × per iteration (≈).", "",
             f"| implementation | iterations | setup (s) | per iteration (s) | {FULL} iterations (s) | held-out FVU | "
             "components vs scikit-learn | mixing vs scikit-learn |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for impl in runs:
        r, a = runs[impl], agreement.get(impl)
        full = f"{r['fit_s']:.1f}" if r["full_fit_measured"] else f"≈{r['full_fit_s']:.1f}"
        lines.append(f"| {impl} | {r['iterations']}{' (converged)' if r['converged'] else ''} | {r['setup_s']:.2f} | "
                     f"{r['per_iteration_s']:.3f} | {full} | {r['heldout_fvu']:.9f} | "
                     + (f"{a['components']:.2g} | {a['mixing']:.2g} |" if a else "– | – |"))
    lines += ["", f"Speedup: {summary['speedup_per_iteration']:.2f}× per iteration, {summary['speedup_full_fit']:.2f}× "
              f"for the {FULL}-iteration fit. Differences: the largest |difference| over the largest |entry| of "
              f"scikit-learn's matrix after the same iterations"
              + (f"; {PERMUTED} is scikit-learn on the rows in another order, what float64 rounding alone moves."
                 if PERMUTED in runs else ".")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (a 1-iteration fit is the setup measurement)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu"  # scikit-learn runs on the CPU; fastsae.evaluation.ica on a GPU is another comparison
    x = activations(work, args.model, args.site, args.corpus, args.tokens + args.held_out, device)
    x = x.to(getattr(torch, args.dtype)).float()
    fit_x, held_out = x[:args.tokens], x[args.tokens:]
    xd = fit_x.double()
    mu = xd.mean(0)
    xc = xd - mu  # what baselines.fit gives FastICA
    n, iters = xc.shape[1], args.iterations
    fits = _fits(args, work / f"fit-{args.dtype}-{args.tokens}", xc)
    if not all(impl in fits for impl in IMPLEMENTATIONS):
        print(f"kept {', '.join(fits)} under {work}; run the other with --only to compare")
        return 0
    runs = _runs(fits, iters, mu, args.k, held_out)
    sk = fits["scikit-learn"][iters]
    agreement = {impl: {"components": relative_difference(fits[impl][iters]["components"], sk["components"]),
                        "mixing": relative_difference(fits[impl][iters]["mixing"], sk["mixing"]),
                        "heldout_fvu": runs[impl]["heldout_fvu"] - runs["scikit-learn"]["heldout_fvu"]}
                 for impl in fits if impl != "scikit-learn"}
    info = run_environment(device, model=args.model, site=args.site, corpus=args.corpus, dtype=args.dtype,
                           tokens=args.tokens, held_out=args.held_out, k=args.k, components=n, tol=TOL,
                           iterations=iters)
    threads = sorted({r["threads"] for r in runs.values()})  # the fits' own (a step may run with other settings)
    info["threads"] = threads[0] if len(threads) == 1 else threads
    summary = {"speedup_per_iteration": runs["scikit-learn"]["per_iteration_s"] / runs["fastsae"]["per_iteration_s"],
               "speedup_full_fit": runs["scikit-learn"]["full_fit_s"] / runs["fastsae"]["full_fit_s"],
               "difference_to_scikit_learn": agreement}
    save_report(args.out, f"ica-{info['device'].replace(' ', '_')}-{info['date']}-{args.dtype}-{iters}-iterations",
                {"meta": info, "runs": runs, "summary": summary}, _table(args, info, n, runs, summary))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
