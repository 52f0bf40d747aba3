"""The memory planner against measured peaks: training steps on CPU, one process and two gloo ranks.

    python -m bench.plan_check

Each point runs in a fresh process (two for the two-rank points): a warm-up step on a tiny SAE loads
the code, then the peak resident memory is reset (/proc/self/clear_refs, 5), a `DistributedTrainer`
(the Trainer itself on one process) is built and takes three steps, and the peak growth of resident
memory (VmHWM − VmRSS before) is the measurement. glibc is told to return every allocation above 64 KiB
to the kernel when freed (MALLOC_MMAP_THRESHOLD_), so resident memory follows the live tensors instead
of the allocator's cache. The planner is asked for the same step: fp32 weights and compute, fp32 Adam
moments, the torch backend and torch's Adam (what the trainer picks on CPU). The error is
(planned − measured) / measured.

Saves bench/results/training/plan-check-cpu-<date>.json and .md. On a CUDA machine the same comparison is
`python -m bench --scale` (the planner's largest d_sae beside the largest that trains).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.saving import RESULTS, save_report

# (d_in, d_sae, batch, k, processes, latent shards)
POINTS = [
    (256, 16_384, 1024, 32, 1, 1),
    (256, 65_536, 1024, 32, 1, 1),
    (512, 32_768, 2048, 32, 1, 1),
    (128, 131_072, 512, 32, 1, 1),
    (256, 16_384, 4096, 32, 1, 1),
    (256, 65_536, 256, 32, 1, 1),  # the optimizer's temporaries, not the pre-activations, set the peak
    (256, 65_536, 1024, 32, 2, 2),
    (512, 32_768, 2048, 32, 2, 2),
    (256, 65_536, 1024, 32, 2, 1),
]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _measure(rank: int, world: int, port: int, point: tuple, out: Path) -> None:
    torch.set_num_threads(1)
    from fastsae import SAEConfig
    from fastsae.ops.distributed import ProcessGrid
    from fastsae.train import TrainConfig
    from fastsae.train.distributed_training import DistributedTrainer
    from fastsae.train.sharded import ShardedSAE

    d_in, d_sae, batch, k, _, latent = point
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))
    grid = ProcessGrid.create(latent_size=latent)
    rows = batch // grid.data_size
    xs = [torch.randn(rows, d_in) for _ in range(3)]
    cfg = TrainConfig.flat(lr=1e-4, progress=False, optimizer="torch")

    def trainer(n_latents: int) -> DistributedTrainer:
        return DistributedTrainer(ShardedSAE(SAEConfig(d_in, n_latents, activation="topk", k=k), grid, seed=0), cfg)

    warm = trainer(4 * k * latent)
    for x in xs:
        warm.step(x[:64], metrics=False)
    del warm
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size
    before = _status("VmRSS")
    t = trainer(d_sae)
    for x in xs:
        t.step(x, metrics=False)
    measured = _status("VmHWM") - before
    if world > 1:
        peaks = [None] * world
        dist.all_gather_object(peaks, measured)
        measured = max(peaks)
        dist.destroy_process_group()
    if rank == 0:
        (out / "measured.json").write_text(json.dumps(measured))


def planned(point: tuple) -> dict:
    from fastsae.train.plan import PlanConfig, plan

    d_in, d_sae, batch, k, world, latent = point
    p = plan(PlanConfig(d_in, d_sae, k, batch, gpus=world, latent_shards=latent, weights="float32",
                        compute="float32", backend="torch", optimizer="torch"))
    return {"total": p.total, "terms": p.terms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plan_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "training")
    args = parser.parse_args(argv)
    os.environ.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    tmp = args.out / ".plan-check-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for point in POINTS:
        print(f"… {point}", file=sys.stderr, flush=True)
        port = 20000 + int.from_bytes(os.urandom(2), "little") % 20000
        mp.spawn(_measure, args=(point[4], port, point, tmp), nprocs=point[4])
        measured = json.loads((tmp / "measured.json").read_text())
        p = planned(point)
        rows.append({"d_in": point[0], "d_sae": point[1], "batch": point[2], "k": point[3], "processes": point[4],
                     "latent_shards": point[5], "measured_mib": measured / 2**20, "planned_mib": p["total"] / 2**20,
                     "error": (p["total"] - measured) / measured,
                     "terms_mib": {t: v / 2**20 for t, v in p["terms"].items()}})
    (tmp / "measured.json").unlink()
    tmp.rmdir()
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "python": platform.python_version(), "device": "cpu", "cpu_cores": os.cpu_count()}
    lines = [f"### CPU · torch {env['torch']} · fp32, torch backend, torch Adam · {env['date']}",
             "peak resident growth of 3 training steps per rank (the largest rank) against fastsae.train.plan", "",
             "| d_in | d_sae | batch | k | processes | latent shards | measured MiB | planned MiB | error |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['d_in']} | {r['d_sae']:,} | {r['batch']:,} | {r['k']} | {r['processes']} | "
                     f"{r['latent_shards']} | {r['measured_mib']:.0f} | {r['planned_mib']:.0f} | "
                     f"{100 * r['error']:+.1f}% |")
    table = "\n".join(lines) + "\n"
    save_report(args.out, f"plan-check-cpu-{env['date'][:10]}", {"env": env, "rows": rows}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
