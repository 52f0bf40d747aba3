"""One TopK training step on CPU, fastsae against its floor and EleutherAI's sparsify, side by side in one run.

    OMP_NUM_THREADS=2 flock /work/heavy.lock python -m bench.cpu_step          # N 2048, d_in 768, d_sae 16384, k 32
    python -m bench.cpu_step --n 256 --d-sae 2048 --repeats 3                  # a quick look

Each row runs in a process of its own (as a user's training would: no other library's tensors in its
heap), and the processes take turns: each repetition runs every row once, in a rotating order, one at a
time, so that a slow minute of the machine (2 shared cores here) lands on all of them alike; the table gives
each row's median over the repetitions (and its minimum). --one-process runs every row in this process
instead, as this benchmark did before: there, the other rows' large allocations (sparsify's, the floor's
(N, d_sae) outputs) fragment the heap that fastsae's step allocates its gradients from. Rows:

- floor: the encoder GEMM x @ W_enc^T + b_enc (N × d_in by d_in × d_sae) as F.linear computes it (MKL's
  sgemm on x86) plus one Adam step over every parameter (torch.optim.Adam(fused=True), the fastest Adam
  torch has on CPU) with the gradients already there: what DESIGN.md says a step should cost, and the
  floor the issue set its target against. Its parts are rows of their own (floor: GEMM, floor: Adam).
- oneDNN floor: the same with the GEMM fastsae's encoder uses on CPU, oneDNN's (floor: oneDNN GEMM,
  ops/cpu_gemm.py): what is left of the step beyond it is fastsae's own overhead.
- fastsae: `Trainer.step(x, metrics=False)` with the trainer's defaults on this device (torch backend):
  forward, loss, backward, Adam, the unit-norm decoder constraint, dead-latent bookkeeping.
- sparsify: `SparseCoder` (eai-sparsify, its eager CPU path: SPARSIFY_DISABLE_TRITON=1) stepped as its
  Trainer does: forward (FVU loss), backward, removal of the decoder-parallel gradient, torch.optim.Adam
  (what its Trainer builds without bitsandbytes), decoder renormalisation.

No AuxK in either library (no latent is dead within a few steps; both skip it then). Results go to
bench/results/training/cpu-step-<date>.json and .md with the machine, versions, date and torch's thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import fastsae
from bench.other_libraries import sparsify_coder, sparsify_train_step
from bench.saving import RESULTS, save_report
from fastsae import SAE, SAEConfig
from fastsae.ops import cpu_gemm
from fastsae.ops.cpu_gemm import cpu_model
from fastsae.train import TrainConfig, Trainer

LR = 1e-4


def fastsae_step(x: torch.Tensor, d_sae: int, k: int) -> Callable[[], object]:
    sae = SAE(SAEConfig(x.shape[1], d_sae, activation="topk", k=k), seed=0)
    sae.check_finite = False  # the floor and sparsify do not check their inputs either
    trainer = Trainer(sae, TrainConfig.flat(lr=LR, progress=False))
    return lambda: trainer.step(x, metrics=False)


def sparsify_step(x: torch.Tensor, d_sae: int, k: int) -> Callable[[], object] | None:
    torch.manual_seed(0)
    coder = sparsify_coder(x.shape[1], d_sae, k, x.device, x.dtype)
    return None if coder is None else sparsify_train_step(coder, x, LR)


def floor_parts(x: torch.Tensor, d_sae: int) -> dict[str, Callable[[], object]]:
    d_in = x.shape[1]
    W_enc = torch.randn(d_sae, d_in) / d_in**0.5
    b_enc = torch.zeros(d_sae)
    params = [torch.nn.Parameter(t) for t in (torch.randn(d_sae, d_in), torch.randn(d_sae, d_in),
                                              torch.zeros(d_sae), torch.zeros(d_in))]
    for p in params:
        p.grad = torch.randn_like(p)
    adam = torch.optim.Adam(params, lr=LR, fused=True)
    return {"floor: GEMM": lambda: F.linear(x, W_enc, b_enc), "floor: Adam": adam.step,
            "floor: oneDNN GEMM": lambda: cpu_gemm.linear(x, W_enc, b_enc)}


ROWS = ("floor: GEMM", "floor: oneDNN GEMM", "floor: Adam", "fastsae", "sparsify")


def build_row(row: str, n: int, d_in: int, d_sae: int, k: int) -> Callable[[], object] | None:
    """The step a row times, on the benchmark's data (seed 0); None when its library is missing (sparsify)."""
    torch.manual_seed(0)
    x = torch.randn(n, d_in)
    if row.startswith("floor"):
        return floor_parts(x, d_sae)[row]
    if row == "sparsify":
        return sparsify_step(x, d_sae, k)
    return fastsae_step(x, d_sae, k)


def _row_process(conn, row: str, shape: tuple[int, int, int, int], threads: int) -> None:
    """A row's own process: build its step, then run it once per "run" received, answering the ms it took."""
    torch.set_num_threads(threads)
    try:
        fn = build_row(row, *shape)
        conn.send(fn is not None)
        while conn.recv() == "run":
            start = time.perf_counter()
            fn()
            conn.send((time.perf_counter() - start) * 1e3)
    except Exception as err:  # noqa: BLE001 (handed to the parent, which raises it)
        conn.send(f"{row}: {type(err).__name__}: {err}")


def interleaved_in_processes(rows: tuple[str, ...], shape: tuple[int, int, int, int], repeats: int,
                             warmup: int, warmup_ms: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """interleaved() with each row in its own process (spawned), one running at a time; rows whose library is
    missing are left out."""
    spawn = multiprocessing.get_context("spawn")
    workers = {}
    try:
        for row in rows:
            here, there = spawn.Pipe()
            process = spawn.Process(target=_row_process, args=(there, row, shape, torch.get_num_threads()),
                                    daemon=True)
            process.start()
            workers[row] = (process, here)

        def answer(row: str):
            got = workers[row][1].recv()
            if isinstance(got, str):
                raise RuntimeError(got)
            return got

        present = [row for row in rows if answer(row)]

        def call(row: str) -> float:
            workers[row][1].send("run")
            return answer(row)

        return interleaved(dict.fromkeys(present), repeats, warmup, timer=call, warmup_ms=warmup_ms)
    finally:
        for process, conn in workers.values():
            with contextlib.suppress(OSError):
                conn.send("stop")
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                timer: Callable[[str], float] | None = None,
                warmup_ms: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """ms per call of each fn: warmup calls each, then repeats rounds, each calling every fn once. timer(name),
    when given, makes the call and returns its ms as measured where it ran (another process); warmup_ms, when
    given, receives the warm-up calls' ms."""

    def timed(name: str) -> float:
        if timer is not None:
            return timer(name)
        start = time.perf_counter()
        fns[name]()
        return (time.perf_counter() - start) * 1e3

    names = list(fns)
    for name in names:
        warm = [timed(name) for _ in range(warmup)]
        if warmup_ms is not None:
            warmup_ms[name] = warm
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            times[name].append(timed(name))
    return times


def top_ops(step: Callable[[], object], steps: int, rows: int = 12) -> list[dict]:
    """Where a step's time goes: torch.profiler's operators by self CPU time, ms per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
            for e in ops]


def environment() -> dict:
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "fastsae": fastsae.__version__ if hasattr(fastsae, "__version__") else None,
           "python": platform.python_version(), "device": cpu_name(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    try:
        from importlib.metadata import version

        env["sparsify"] = version("eai-sparsify")
    except Exception:  # not installed
        env["sparsify"] = None
    return env


def cpu_name() -> str:
    """The CPU's model name (the one fastsae.ops.cpu_gemm keys its GEMM verdicts by)."""
    return cpu_model()


def run(n: int, d_in: int, d_sae: int, k: int, repeats: int, warmup: int, one_process: bool = False) -> dict:
    shape, warm = (n, d_in, d_sae, k), {}
    if one_process:
        fns = {row: build_row(row, *shape) for row in ROWS}
        times = interleaved({row: fn for row, fn in fns.items() if fn is not None}, repeats, warmup, warmup_ms=warm)
    else:
        times = interleaved_in_processes(ROWS, shape, repeats, warmup, warmup_ms=warm)
    step = build_row("fastsae", *shape)
    for _ in range(warmup):
        step()
    profile = top_ops(step, steps=3)  # in this process, on a trainer of its own
    median = {name: statistics.median(t) for name, t in times.items()}
    floor = median["floor: GEMM"] + median["floor: Adam"]
    onednn = median["floor: oneDNN GEMM"] + median["floor: Adam"]
    rows = [{"impl": "floor", "ms": floor}, {"impl": "oneDNN floor", "ms": onednn}]
    for name, t in times.items():
        row = {"impl": name, "ms": median[name], "min_ms": min(t), "times_ms": t, "warmup_ms": warm[name]}
        if not name.startswith("floor"):
            row["x_floor"] = median[name] / floor
            row["x_onednn_floor"] = median[name] / onednn
        rows.append(row)
    if "sparsify" in median:
        rows[[r["impl"] for r in rows].index("fastsae")]["speedup_vs_sparsify"] = median["sparsify"] / median["fastsae"]
    return {"env": environment(), "shape": {"n": n, "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": "float32"},
            "processes": "one process" if one_process else "a process per row", "repeats": repeats, "warmup": warmup,
            "rows": rows, "fastsae_top_ops": profile}


def markdown(result: dict) -> str:
    env, s = result["env"], result["shape"]
    lines = [f"### CPU TopK training step · N {s['n']} · d_in {s['d_in']} · d_sae {s['d_sae']} · k {s['k']} · "
             f"{s['dtype']}",
             f"{env['device']} ({env['cores']} cores, torch threads {env['torch_threads']}) · torch {env['torch']} · "
             f"sparsify {env['sparsify']} · {env['date']} · median of {result['repeats']} interleaved repetitions, "
             f"{result['processes']}",
             "", "| step | ms (median) | ms (min) | × floor | × oneDNN floor | fastsae speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        x_floor = f"{r['x_floor']:.2f}" if "x_floor" in r else ""
        x_onednn = f"{r['x_onednn_floor']:.2f}" if "x_onednn_floor" in r else ""
        speedup = f"{r['speedup_vs_sparsify']:.2f}× vs sparsify" if "speedup_vs_sparsify" in r else ""
        low = f"{r['min_ms']:.1f}" if "min_ms" in r else ""
        lines.append(f"| {r['impl']} | {r['ms']:.1f} | {low} | {x_floor} | {x_onednn} | {speedup} |")
    warm = next(r["warmup_ms"] for r in result["rows"] if r["impl"] == "fastsae")
    lines += ["", f"fastsae's {len(warm)} warm-up steps (not in the table), ms: " + ", ".join(f"{t:.0f}" for t in warm)]
    lines += ["", "fastsae's step by operator (torch.profiler, self CPU time, 3 steps):", "",
              "| operator | ms per step | calls per step |", "|---|---:|---:|"]
    lines += [f"| {o['op']} | {o['self_ms_per_step']:.1f} | {o['calls_per_step']:g} |"
              for o in result["fastsae_top_ops"]]
    return "\n".join(lines) + "\n"


def step_arguments(prog: str, description: str) -> argparse.ArgumentParser:
    """The issue's reference step (N 2048, d_in 768, d_sae 16384, k 32) as flags, with repetitions and --out."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "training",
                        help="directory for the JSON and markdown")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = step_arguments("python -m bench.cpu_step", __doc__.splitlines()[0])
    parser.add_argument("--one-process", action="store_true", help="every row in this process (see the docstring)")
    # a fresh trainer's first steps are slower than its later ones (the results' warmup_ms)
    parser.set_defaults(warmup=6)
    args = parser.parse_args(argv)
    result = run(args.n, args.d_in, args.d_sae, args.k, args.repeats, args.warmup, args.one_process)
    table = markdown(result)
    save_report(args.out, f"cpu-step-{result['env']['date'][:10]}", result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
