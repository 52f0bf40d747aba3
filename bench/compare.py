"""Time to compare two dictionaries (fastsae.analysis.compare.direction_match): best matches both ways in tiles, never
the n_a x n_b cosine matrix.

    python -m bench.compare                    # CPU: 16,384 x 640 against 16,384 x 640
    python -m bench.compare --sizes 65536x2048 # the issue's GPU size (on CPU: about half an hour)

The cost is one GEMM of 2·n_a·n_b·d FLOP plus two max-reductions over every tile, so the table gives
GFLOP/s against a plain torch.matmul of one tile (the floor), and peak memory (tiles, CUDA only).
Prints a table and saves JSON + markdown under bench/results/analysis/compare-<device>-<date>.*
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.saving import RESULTS, run_environment, save_report
from fastsae.analysis.compare.direction_match import BLOCK, max_cosines


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def unit_rows(n: int, d: int, seed: int, device: str) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(device)
    return x / x.norm(dim=1, keepdim=True)


def matmul_rate(d: int, block: int, device: str, repeats: int = 3) -> float:
    """GFLOP/s of one block x block x d fp32 matmul: what the tiles could reach with free reductions."""
    a, b = unit_rows(block, d, 0, device), unit_rows(block, d, 1, device)
    a @ b.T
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b.T
    _sync(device)
    return repeats * 2 * block * block * d / (time.perf_counter() - start) / 1e9


def time_compare(n_a: int, n_b: int, d: int, block: int, device: str) -> dict:
    a, b = unit_rows(n_a, d, 2, device), unit_rows(n_b, d, 3, device)
    if device == "cuda":
        max_cosines(a[:block], b[:block], block=block, device=device)  # warm-up (cuBLAS handles)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    _sync(device)
    start = time.perf_counter()
    max_cosines(a, b, block=block, device=device)
    _sync(device)
    seconds = time.perf_counter() - start
    row = {"n_a": n_a, "n_b": n_b, "d": d, "block": block, "seconds": seconds,
           "gflop_per_s": 2 * n_a * n_b * d / seconds / 1e9,
           "dense_matrix_gib": n_a * n_b * 4 / 2**30}
    if device == "cuda":
        row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", help="NxD (both dictionaries N directions of width D); default: "
                                                   "16384x640, and 65536x2048 on CUDA")
    parser.add_argument("--block", type=int, default=BLOCK)
    parser.add_argument("--out", default=str(RESULTS / "analysis"),
                        help="results directory (default: bench/results/analysis)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = args.sizes or (["16384x640", "65536x2048"] if device == "cuda" else ["16384x640"])
    rows = []
    for size in sizes:
        n, d = (int(v) for v in size.lower().split("x"))
        row = time_compare(n, n, d, args.block, device)
        row["matmul_gflop_per_s"] = matmul_rate(d, min(args.block, n), device)
        rows.append(row)
        print(row)
    meta = run_environment(device, dtype="float32")
    name = meta["device"]
    lines = [f"# Dictionary comparison (best matches both ways), {name} ({meta['threads']} threads), "
             f"{meta['date']}", "",
             "| A | B | block | seconds | GFLOP/s | one-tile matmul GFLOP/s | dense cos matrix would be |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['n_a']:,} x {r['d']} | {r['n_b']:,} x {r['d']} | {r['block']} | {r['seconds']:.2f} | "
              f"{r['gflop_per_s']:.1f} | {r['matmul_gflop_per_s']:.1f} | {r['dense_matrix_gib']:.1f} GiB |"
              for r in rows]
    table = "\n".join(lines)
    save_report(args.out, f"compare-{name.replace(' ', '_')}-{meta['date']}", {"meta": meta, "rows": rows}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
