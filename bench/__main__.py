"""python -m bench [--quick] [--cpu]: run the suite, print a table, save JSON + markdown under bench/results/."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

from bench.suite import IMPLEMENTATIONS, Case, run_case

RESULTS = Path(__file__).resolve().parent / "results"


def presets(name: str) -> list[Case]:
    if name == "cpu":  # what 2 CPU cores finish in a few minutes
        return [Case(op, act, 1024, 256, d_sae, k, dens)
                for op in ("encode", "step")
                for d_sae in (4096, 16384)
                for act, k, dens in (("topk", 32, None), ("relu", None, 0.01))]
    if name == "quick":  # the kernels issue's target shape and its neighbours
        return [Case(op, act, 8192, 2048, 65_536, k, dens)
                for op in ("encode", "step")
                for act, k, dens in (("topk", 64, None), ("batchtopk", 64, None), ("relu", None, 0.01))]
    if name == "full":
        cases = []
        for d_in in (768, 2048, 4096):
            for d_sae in (16_384, 65_536, 262_144, 1_048_576):
                for n in (4096, 8192):
                    for k in (32, 64, 128):
                        cases.append(Case("step", "topk", n, d_in, d_sae, k))
                    for dens in (0.001, 0.01, 0.1):
                        cases.append(Case("step", "relu", n, d_in, d_sae, None, dens))
        return cases
    raise ValueError(name)


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "python": platform.python_version(), "dtype": str(dtype).removeprefix("torch."),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "cpu_threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"### {env['device']} · {env['dtype']} · torch {env['torch']} · triton {env['triton']} · {env['date']}",
             "", "| case | impl | ms | × floor | TFLOP/s | peak MiB |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        case = Case(*(r[f] for f in ("op", "activation", "n", "d_in", "d_sae", "k", "density"))).label()
        if r["status"] != "ok":
            lines.append(f"| {case} | {r['impl']} | {r['status']} | | | |")
            continue
        floor = f"{r['x_floor']:.2f}" if "x_floor" in r else "1.00" if r["impl"] == "floor_gemm" else ""
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else ""
        lines.append(f"| {case} | {r['impl']} | {r['ms']:.2f} | {floor} | {r['tflops']:.2f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--preset", choices=("cpu", "quick", "full"), default=None,
                        help="shapes (default: quick on CUDA, cpu otherwise)")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick (cpu without CUDA)")
    parser.add_argument("--impl", nargs="*", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats on CPU")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("quick" if device.type == "cuda" else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    env = environment(device, dtype)
    rows = []
    for case in presets(preset):
        print(f"… {case.label()}", file=sys.stderr, flush=True)
        rows += run_case(case, tuple(args.impl), device, dtype, args.repeats)
    table = markdown(rows, env)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
    stem = f"{slug}-{preset}-{env['date'][:10]}"
    (args.out / f"{stem}.json").write_text(json.dumps({"env": env, "preset": preset, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(table)
    print(f"saved {args.out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
