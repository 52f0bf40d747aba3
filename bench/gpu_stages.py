"""bench/gpu_check.sh's one prepared GPU run: five stages, most important first, each with its own time budget.

    bash bench/gpu_check.sh                  # on a CUDA machine: about 7.5 min wall on an H100
    bash bench/gpu_check.sh --dry-run        # every stage at tiny shapes on CPU (Triton's interpreter)
    python -m bench.gpu_stages --stages 1,2  # the same, some stages only (a rerun after a fix)

A GPU can be had only now and then, for 15 minutes of device time in all (the machine's start, transfers
and idle time included), so the run is shaped for being cut off:

1. kernels  - every compiled kernel and dtype against its float64 reference (bench/gpu_correctness.py),
              in parallel processes: a kernel that faults costs only its own group;
2. targets  - at N 8192, d_in 2048, d_sae 65,536, k 64, bf16: TopK forward + backward <= 1.5x the encoder
              GEMM, the training step <= 1.3x (GEMM + Adam's memory traffic), the GEMM measured here;
3. sweep    - the fused TopK encoder and the training step over d_sae {16k, 65k, 262k} x k {32, 64, 128}
              against naive PyTorch and torch.compile of it: ms, TFLOP/s, GB/s, x floor, peak memory;
              torch.compile points come last and are skipped, and listed, when the budget runs out;
4. capacity - the largest d_sae whose training step fits in the GPU's memory (N 8192, d_in 2048), searched
              upward and then bisected, catching OOM, against the memory planner (fastsae.train.plan);
5. extra    - whatever else fits: BatchTopK, ReLU, decode, resampling and mixed precision at the target.

Each stage runs in processes of its own (a CUDA context poisoned by one stage cannot spoil the next) and
writes its file as soon as it has rows: a stage killed at its budget, or a run cut off, still returns
what it measured. A stage's deadline is cumulative: stage i must end by the sum of the budgets of stages
1..i, so time an early stage does not use goes to the later ones, and no stage eats a later one's share.

Files, in --out (default $OUT, else bench/results/kernels/gpu-<device>-<date>/; at most 8 files, the
device tool's limit): 1-kernels.json ... 5-extra.json (rows, skipped points, errors, the environment and the
stage's markdown table), summary.json, summary.md (every table), gpu-check.log. Each records the device,
driver, torch, triton and CUDA versions and a hash of the kernel sources.

Timing: CUDA events around each call after two warm-up calls, the median of 5 to 30 calls (about a second
of them); the first call's wall time (compiles and the autotuner) is kept apart. The dry run times
one call by the wall clock. Nothing needs the network; the GPU machine's own Python (torch + triton) runs it.

Here: the command line. The plan (stages, budgets, shapes) is bench/gpu_plan.py, the driver
bench/gpu_driver.py, the stages as a job runs them bench/gpu_stage_jobs.py (timing in bench/gpu_job.py, the
timed closures in bench/gpu_cases.py), the tables bench/gpu_reports.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import sys
import tempfile
from pathlib import Path

from bench.gpu_driver import Driver, nvidia_smi
from bench.gpu_plan import BUDGETS, ROOT, STAGES, TOTAL_S
from bench.gpu_stage_jobs import job_main


def default_out(dry: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    if dry:
        return Path(tempfile.gettempdir()) / "fastsae-gpu-check-dry-run"
    smi = nvidia_smi() or {}
    device = "".join(c if c.isalnum() else "-" for c in smi.get("name", "gpu").lower()).strip("-")
    return ROOT / "bench" / "results" / "kernels" / f"gpu-{device}-{dt.date.today().isoformat()}"


def parse_budgets(text: str) -> dict[int, float]:
    out = {}
    for item in filter(None, text.split(",")):
        stage, seconds = item.split("=")
        out[int(stage)] = float(seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every stage at tiny shapes on CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, help="where the files go (default $OUT, else bench/results/kernels/"
                                                 "gpu-<device>-<date>/; the dry run: a temporary folder)")
    parser.add_argument("--stages", default="1,2,3,4,5", help="which stages, in this order (default all)")
    parser.add_argument("--budget", type=float, default=TOTAL_S, help=f"seconds for the whole run (default {TOTAL_S})")
    parser.add_argument("--budgets", type=parse_budgets, default={},
                        help=f"seconds per stage, e.g. 3=200,4=60 (default {BUDGETS}; the last stage: the rest)")
    parser.add_argument("--inject", default="", help=argparse.SUPPRESS)  # tests: 2=fail,5=hang
    parser.add_argument("--job", type=int, help=argparse.SUPPRESS)  # the driver's jobs
    parser.add_argument("--groups", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job is not None:
        return job_main(args)
    args.stages = [int(s) for s in args.stages.split(",") if s]
    if any(s not in STAGES for s in args.stages):
        parser.error(f"--stages must name stages of {sorted(STAGES)}")
    args.out = args.out or default_out(args.dry_run)
    driver = Driver(args)

    def stop(signum, _frame):
        driver.log(f"signal {signum}: stopping the running jobs")
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return driver.run()
    except KeyboardInterrupt:
        return 130
    finally:
        driver.close()


if __name__ == "__main__":
    sys.exit(main())
