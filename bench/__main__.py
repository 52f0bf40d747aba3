"""python -m bench: run the suite, print a table, save JSON + markdown (+ plots) under bench/results/training/.

    python -m bench                    # 'quick' on CUDA, 'cpu' otherwise
    python -m bench --preset full      # every shape of the issue (CUDA)
    python -m bench --scale 20         # the largest d_sae each implementation trains in 20 GiB (CUDA), and
                                       # fastsae's planned one (fastsae.train.plan; CPU too)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

from bench.saving import RESULTS
from bench.suite import (
    IMPLEMENTATIONS,
    OPS,
    Case,
    copy_bandwidth,
    largest_trainable_d_sae,
    planned_largest_d_sae,
    run_case,
)

COLORS = {impl: f"C{i}" for i, impl in enumerate(("floor", *IMPLEMENTATIONS))}  # one colour per implementation


def presets(name: str) -> list[Case]:
    if name == "cpu":  # what 2 CPU cores finish in a few minutes
        return [Case(op, act, 1024, 256, d_sae, k, dens)
                for op in OPS
                for d_sae in (4096, 8192, 16384)
                for act, k, dens in (("topk", 32, None), ("relu", None, 0.01))]
    if name == "quick":  # the kernels issue's target shape for every op, and a d_sae sweep of the step
        target = [Case(op, act, 8192, 2048, 65_536, k, dens)
                  for op in OPS
                  for act, k, dens in (("topk", 64, None), ("batchtopk", 64, None), ("relu", None, 0.01))]
        sweep = [Case("step", "topk", 8192, 2048, d_sae, 64) for d_sae in (16_384, 262_144, 1_048_576)]
        return target + sweep
    if name == "full":
        cases = []
        for d_in in (768, 2048, 4096):
            for d_sae in (16_384, 65_536, 262_144, 1_048_576):
                for n in (4096, 8192):
                    for k in (32, 64, 128):
                        cases += [Case(op, "topk", n, d_in, d_sae, k) for op in OPS]
                    cases.append(Case("step", "batchtopk", n, d_in, d_sae, 64))
                    for dens in (0.001, 0.01, 0.1):
                        cases += [Case(op, "relu", n, d_in, d_sae, None, dens) for op in ("encoder", "step")]
        return cases
    raise ValueError(name)


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "python": platform.python_version(), "dtype": str(dtype).removeprefix("torch."),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "cpu_threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"### {env['device']} · {env['dtype']} · torch {env['torch']} · triton {env['triton']} · {env['date']}",
             f"copy bandwidth {env['copy_gbps']:.0f} GB/s; floor = vendor GEMM (encode, encoder, step; "
             "4 for resample's pool) + minimum bytes at that bandwidth", "",
             "| case | impl | ms | × floor | TFLOP/s | GB/s | peak MiB |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        case = Case(*(r[f] for f in ("op", "activation", "n", "d_in", "d_sae", "k", "density"))).label()
        if r["status"] != "ok":
            lines.append(f"| {case} | {r['impl']} | {r['status']} | | | | |")
            continue
        cells = [f"{r['ms']:.2f}", _fmt(r.get("x_floor"), ".2f"), _fmt(r.get("tflops"), ".2f"),
                 _fmt(r.get("gbps"), ".1f"), _fmt(r.get("peak_mib"), ".0f")]
        lines.append(f"| {case} | {r['impl']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], env: dict, stem: Path) -> list[Path]:
    """Time (and peak memory, on CUDA) against d_sae per implementation, for each op swept over d_sae."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'fastsae[plot]'): no plots", file=sys.stderr)
        return []
    written = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["op"], r["activation"], r["n"], r["d_in"], r["k"], r["density"]), []).append(r)
    for metric, unit in (("ms", "ms"), ("peak_mib", "MiB")):
        sweeps = {g: rs for g, rs in groups.items() if len({r["d_sae"] for r in rs}) > 1 and metric in rs[0]}
        if not sweeps:
            continue
        cols = min(4, len(sweeps))
        rows_ = -(-len(sweeps) // cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.4 * rows_), squeeze=False)
        for ax in axes.flat[len(sweeps):]:
            ax.axis("off")
        for ax, ((op, act, n, d_in, k, dens), rs) in zip(axes.flat, sweeps.items(), strict=False):
            for impl in dict.fromkeys(r["impl"] for r in rs):
                pts = sorted((r["d_sae"], r[metric]) for r in rs if r["impl"] == impl and metric in r)
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl, color=COLORS.get(impl))
            ax.legend(fontsize=6)
            ax.set(xscale="log", yscale="log", xlabel="d_sae", ylabel=unit,
                   title=f"{op} {act} N={n} d_in={d_in} " + (f"k={k}" if k else f"density={dens:g}"))
            ax.title.set_fontsize(8)
        fig.suptitle(f"{env['device']} · {env['dtype']}", fontsize=9)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{'time' if metric == 'ms' else 'memory'}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("cpu", "quick", "full"), default=None,
                        help="shapes (default: quick on CUDA, cpu otherwise)")
    parser.add_argument("--quick", action="store_true", help="the quick preset on CUDA, cpu without")
    parser.add_argument("--impl", nargs="*", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--op", nargs="*", default=list(OPS), choices=OPS)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats on CPU")
    parser.add_argument("--scale", type=float, metavar="GIB",
                        help="instead: the largest d_sae (d_in 2048, N 4096, k 64) that trains within GIB")
    parser.add_argument("--plot", type=Path, metavar="JSON", help="instead: redraw the plots of a saved run")
    parser.add_argument("--out", type=Path, default=RESULTS / "training")
    args = parser.parse_args(argv)
    if args.plot:
        saved = json.loads(args.plot.read_text())
        for path in plot(saved["rows"], saved["env"], args.plot.with_suffix("")):
            print(f"plot: {path}")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    env = environment(device, dtype)
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.scale:
        # fastsae's own rows also get the memory planner's answer (fastsae.train.plan, `fastsae plan`).
        runnable = ("fastsae_torch", "fastsae_triton") if device.type == "cuda" else ("fastsae_torch",)
        planned = {impl: planned_largest_d_sae(impl, args.scale, 2048, 4096, 64, device, dtype)
                   for impl in args.impl if impl in runnable}
        found = {}
        if device.type == "cuda":
            found = {impl: largest_trainable_d_sae(impl, args.scale, 2048, 4096, 64, device, dtype)
                     for impl in args.impl if impl != "naive_compile"}
        for impl in dict.fromkeys([*found, *planned]):
            measured = f"{found[impl]}" if impl in found else "(needs CUDA)"
            plan = f"; planner: {planned[impl]:,}" if impl in planned else ""
            print(f"{impl:16} largest power-of-two d_sae within {args.scale:g} GiB: {measured}{plan}")
        path = args.out / f"{slug}-scale-{env['date'][:10]}.json"
        path.write_text(json.dumps({"env": env, "budget_gib": args.scale, "largest_d_sae": found,
                                    "planned_d_sae": planned}, indent=1))
        return 0
    preset = args.preset or ("quick" if device.type == "cuda" else "cpu")
    env["copy_gbps"] = copy_bandwidth(device) / 1e9
    rows = []
    for case in presets(preset):
        if case.op not in args.op:
            continue
        print(f"… {case.label()}", file=sys.stderr, flush=True)
        rows += run_case(case, tuple(args.impl), device, dtype, args.repeats, env["copy_gbps"] * 1e9)
    table = markdown(rows, env)
    print(table)
    stem = args.out / f"{slug}-{preset}-{env['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "preset": preset, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(table)
    for path in plot(rows, env, stem):
        print(f"plot: {path}", file=sys.stderr)
    print(f"saved {stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
