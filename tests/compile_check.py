"""Ahead-of-time compile check of every Triton kernel, on a machine without a GPU.

For each variant in fastsae.kernels._variants and each target (sm_80, sm_90):
triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) builds PTX
and a cubin on the CPU (ptxas ships in the triton wheel); the wheel's
cuobjdump reads registers, stack and local memory (--dump-resource-usage)
and the SASS (-sass: HGMMA is Hopper's warpgroup MMA, LDL/STL local-memory
traffic). The SASS also names how tiles reach shared memory (UTMALDG: the
tensor copy engine, TMA; LDGSTS: cp.async; LDG: plain loads through
registers) and the MMA instruction's shape (HGMMA.64x128x16: a warpgroup's
64 x 128 x 16 step; HMMA.16816: a warp's 16 x 8 x 16). A variant fails when it spills (stack or local bytes > 0) or when
a 16-bit encoder on sm_90 does not use warpgroup MMA.

    python tests/compile_check.py                       # the full grid, table on stdout
    python tests/compile_check.py --grid quick          # the small set `make test` compiles
    python tests/compile_check.py --table bench/results/kernels/compile-occupancy.md

Results are cached in $FASTSAE_COMPILE_CACHE (default ~/.cache/fastsae/compile),
one JSON per key (kernel source hash with its callees, signature, constexprs,
options, target, triton version), so an unchanged kernel is not compiled again.
Exit status 1 when any variant fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

TARGETS = (80, 90)
# Per SM, for occupancy (CUDA C Programming Guide, compute capabilities table): registers, shared
# memory usable by blocks (1 KB of it reserved per block), resident warps and blocks.
SM_LIMITS = {80: dict(regs=65536, smem=167936, warps=64, blocks=32),
             90: dict(regs=65536, smem=233472, warps=64, blocks=32)}
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_MMA_SHAPE = re.compile(r"\b(HGMMA\.\d+x\d+x\d+|HMMA\.\d+)")
# Bumped when a result gains a field, so cached results without it are compiled again.
RESULT_FORMAT = 2


def cache_dir() -> Path:
    return Path(os.environ.get("FASTSAE_COMPILE_CACHE", Path.home() / ".cache" / "fastsae" / "compile"))


def occupancy(regs: int, shared: int, num_warps: int, cc: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256) and shared memory."""
    lim = SM_LIMITS[cc]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // regs_per_warp // num_warps
    by_smem = lim["smem"] // (shared + 1024)
    return min(by_regs, by_smem, lim["warps"] // num_warps, lim["blocks"])


def parse_resources(text: str) -> dict:
    m = _RESOURCE.search(text)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    regs, stack, shared, local = map(int, m.groups())
    return dict(regs=regs, stack=stack, static_shared=shared, local=local)


def copy_engine(sass: str) -> str:
    """How the kernel's tiles reach shared memory, the most capable engine its SASS uses."""
    for op in ("UTMALDG", "LDGSTS", "LDG"):
        if re.search(rf"\b{op}\b", sass):
            return op
    return "-"


def mma_shapes(sass: str) -> str:
    """The MMA instructions' shapes, e.g. "HGMMA.64x128x16" ("-" when there is none)."""
    return ",".join(sorted(set(_MMA_SHAPE.findall(sass)))) or "-"


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_variant(variant, cc: int) -> dict:
    """Compile one variant for sm_<cc> (in a process where TRITON_INTERPRET is off) and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = variant.fn()
    signature, constexprs, attrs = variant.signature(fn.arg_names)
    options = dict(num_warps=variant.num_warps, num_stages=variant.num_stages)
    if variant.maxnreg is not None:
        options["maxnreg"] = variant.maxnreg
    key = hashlib.sha256(json.dumps([fn.cache_key, signature, sorted(constexprs.items()), sorted(attrs),
                                     options, cc, triton.__version__, RESULT_FORMAT], default=str).encode()).hexdigest()
    cached = cache_dir() / f"{key}.json"
    if cached.exists():
        return {**json.loads(cached.read_text()), "cached": True}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                                    options=options)
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result
        return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}", cached=False)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    res = parse_resources(usage)
    shared = int(kernel.metadata.shared) + res["static_shared"]
    result = dict(
        res, shared=shared, hgmma=sass.count("HGMMA"), hmma=sass.count("HMMA"),
        local_ops=len(re.findall(r"\b(?:LDL|STL)\b", sass)), wgmma_ptx="wgmma" in kernel.asm["ptx"],
        copy=copy_engine(sass), mma_shape=mma_shapes(sass),
        blocks_per_sm=occupancy(res["regs"], shared, variant.num_warps, cc), seconds=round(seconds, 1),
    )
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_text(json.dumps(result))
    os.replace(tmp_path, cached)
    return {**result, "cached": False}


def problems(variant, cc: int, r: dict) -> list[str]:
    if "error" in r:
        return [f"does not compile: {r['error']}"]
    out = []
    if r["stack"] or r["local"] or r["local_ops"]:
        out.append(f"spills: stack {r['stack']} B, local {r['local']} B, {r['local_ops']} LDL/STL")
    if cc == 90 and variant.wgmma_expected and not r["hgmma"]:
        out.append("no warpgroup MMA (HGMMA) on sm_90")
    if variant.constexprs.get("TMA") and r["copy"] != "UTMALDG":
        out.append(f"tensor descriptors but tiles by {r['copy']}, not the tensor copy engine (UTMALDG)")
    if variant.constexprs.get("QUARTERS") and "HGMMA.64x128x16" not in r["mma_shape"]:
        out.append(f"a 64 x 128 warpgroup tile expected, MMA {r['mma_shape']}")
    return out


def _job(args):
    variant, cc = args
    return compile_variant(variant, cc)


def run(variants, targets=TARGETS, jobs: int | None = None, progress=None) -> list[dict]:
    """Compile every (variant, target) in worker processes with the interpreter off; rows in grid order."""
    work = [(v, cc) for v in variants for cc in targets if cc in v.targets]
    jobs = jobs or os.cpu_count() or 1
    env_before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # the workers import triton fresh: compiled, not interpreted
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            results = []
            for i, r in enumerate(pool.map(_job, work)):
                results.append(r)
                if progress:
                    progress(i + 1, len(work), work[i], r)
    finally:
        if env_before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env_before
    return [dict(variant=v, cc=cc, result=r, problems=problems(v, cc, r))
            for (v, cc), r in zip(work, results, strict=True)]


def table(rows: list[dict]) -> str:
    lines = ["| kernel | config | dtype | target | regs | shared KB | stack B | tiles by | MMA | blocks/SM | occupancy "
             "| status |", "|---|---|---|---|---:|---:|---:|---|---|---:|---:|---|"]
    for row in rows:
        v, cc, r = row["variant"], row["cc"], row["result"]
        status = "; ".join(row["problems"]) or "ok"
        if "error" in r:
            lines.append(f"| {v.kernel} | {v.label} | {v.dtype} | sm_{cc} | | | | | | | | {status} |")
            continue
        occ = r["blocks_per_sm"] * v.num_warps / SM_LIMITS[cc]["warps"]
        lines.append(f"| {v.kernel} | {v.label} | {v.dtype} | sm_{cc} | {r['regs']} | {r['shared'] / 1024:.1f} | "
                     f"{r['stack']} | {r['copy']} | {r['mma_shape']} | {r['blocks_per_sm']} | {occ:.1%} | {status} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/compile_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=("full", "quick"), default="full")
    parser.add_argument("--table", type=Path, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, help="write every row as JSON here")
    parser.add_argument("--jobs", type=int, default=None, help="compiler processes (default: every core)")
    args = parser.parse_args(argv)

    os.environ.setdefault("TRITON_INTERPRET", "0")
    import triton

    from fastsae.kernels._variants import all_variants

    variants = [v for v in all_variants() if args.grid == "full" or "quick" in v.tags]
    start = time.perf_counter()

    def progress(i, n, work, r):
        v, cc = work
        took = r["error"] if "error" in r else "cached" if r.get("cached") else f"{r['seconds']} s"
        print(f"[{i}/{n}] {v.kernel} {v.label} {v.dtype} sm_{cc}: {took}", file=sys.stderr, flush=True)

    rows = run(variants, jobs=args.jobs, progress=progress)
    wall = time.perf_counter() - start
    text = table(rows)
    bad = [r for r in rows if r["problems"]]
    cached = sum(bool(r["result"].get("cached")) for r in rows)
    header = (f"Compiled ahead of time with triton {triton.__version__} (ptxas from its wheel), "
              f"{len(rows)} kernel variants x targets in {wall:.0f} s on {os.cpu_count()} cores "
              f"({platform.machine()}; {cached} results from the cache); {len(bad)} fail.\n\n")
    print(header + text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(f"# Compile check: registers, spills, copy engine, MMA and occupancy\n\n"
                              f"`python tests/compile_check.py --table {args.table}`. {header}{text}\n")
    if args.json:
        args.json.write_text(json.dumps([dict(kernel=r["variant"].name, label=r["variant"].label,
                                              dtype=r["variant"].dtype, cc=r["cc"], problems=r["problems"],
                                              **{k: v for k, v in r["result"].items()}) for r in rows], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
