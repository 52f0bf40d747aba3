"""Scaling past one process on CPU: 1 vs 2 gloo processes with the same global batch.

    python -m bench.distributed                       # d_in 512, d_sae 16384, TopK k 32, batch 4096
    python -m bench.distributed --d-sae 65536 --steps 8

Rows: one process on one thread and on two (the machine's two cores without torch.distributed);
two processes, each on one thread, training with `DistributedTrainer` data parallel and with the
latents sharded; and the gradient-reduction A/B — the explicit per-parameter all-reduce that the
trainer uses against DistributedDataParallel — as the same bare step loop (forward, backward,
reduction, Adam with the decoder constraint) for both.

Time: wall-clock ms per step (the slowest rank), and CPU ms per step of the busiest rank (process time,
every thread): on a shared machine wall time measures the neighbours too, while CPU time is the work a
rank does, so "work per rank" (1-process CPU time / the busiest rank's) is the speed-up two idle cores
would give, before waiting on each other.

Communication per step and rank: "computed" is fastsae.train.plan.comm_per_step (what ring
collectives send); "payload" is what this rank handed to torch.distributed (fastsae.ops.distributed.COMM,
and a DDP comm hook); "sent" is measured by the kernel: the growth of wchar in /proc/self/io over the
timed steps (gloo writes its sockets with write/writev; nothing else writes meanwhile).

Saves bench/results/training/distributed-cpu-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.saving import RESULTS, save_report


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _batches(args, rank: int, data_size: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(args.batch, args.d_in, generator=gen) for _ in range(3)]
    return [x.tensor_split(data_size)[rank % data_size].contiguous() for x in full]


def _run(rank: int, world: int, port: int, mode: str, threads: int, args, out: Path) -> None:
    torch.set_num_threads(threads)
    from fastsae import SAEConfig
    from fastsae.ops import distributed as D
    from fastsae.train import TrainConfig
    from fastsae.train.distributed_training import DistributedTrainer
    from fastsae.train.sharded import ShardedSAE

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
    grid = D.ProcessGrid.create(latent_size=world if mode == "latent" else 1)
    model = ShardedSAE(SAEConfig(args.d_in, args.d_sae, activation="topk", k=args.k), grid, seed=0)
    model.check_finite = False
    xs = _batches(args, grid.data_rank, grid.data_size)
    ddp_bytes = [0]
    if mode in ("ddp", "loop"):
        step = _bare_step(model, mode, grid, ddp_bytes)
    else:
        trainer = DistributedTrainer(model, TrainConfig.flat(lr=1e-4, progress=False, log_every=10**9))
        step = lambda x: trainer.step(x, metrics=False)  # noqa: E731
    times, cpu = [], []
    for i in range(args.steps + 2):
        if i == 2:
            if world > 1:
                dist.barrier()
            D.COMM.clear()
            ddp_bytes[0] = 0
            sent = _wchar()
        start, start_cpu = time.perf_counter(), time.process_time()
        step(xs[i % len(xs)])
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    sent = _wchar() - sent
    payload = sum(v for key, v in D.COMM.items() if not key.endswith(":calls")) + ddp_bytes[0]
    row = {"ms": statistics.median(times[2:]) * 1e3, "cpu_ms": statistics.median(cpu[2:]) * 1e3,
           "sent_mib": sent / args.steps / 2**20, "payload_mib": payload / args.steps / 2**20}
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
        row = {key: max(r[key] for r in rows) for key in row}  # the slowest rank sets the pace
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        (out / f"{mode}-{world}-{threads}.json").write_text(json.dumps(row))


def _bare_step(model, mode: str, grid, ddp_bytes: list[int]):
    """forward, backward, gradient averaging (explicit all-reduce or DDP), Adam with the constraint."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from fastsae.ops import distributed as D

    forward = model
    if mode == "ddp" and grid.data_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False,
                                                            gradient_as_bucket_view=True)

        def counted(state, bucket):
            ddp_bytes[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(state, bucket)

        forward.register_comm_hook(None, counted)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    pending = []
    if mode == "loop" and grid.data_size > 1:  # the trainer's reduction: launched as each gradient completes
        def launch(p):
            D.count_bytes("grad_all_reduce", p.grad)
            pending.append((p.grad, dist.all_reduce(p.grad, async_op=True)))

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(launch)

    def step(x):
        out = forward(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        for grad, work in pending:
            work.wait()
            grad.div_(grid.data_size)
        pending.clear()
        model.remove_parallel_decoder_grad_()
        opt.step()
        model.normalize_decoder_()

    return step


def computed_mib(args, mode: str, world: int) -> float:
    from fastsae.train.plan import PlanConfig, comm_per_step

    if world == 1:
        return 0.0
    cfg = PlanConfig(args.d_in, args.d_sae, args.k, args.batch, gpus=world,
                     latent_shards=world if mode == "latent" else 1)
    return sum(comm_per_step(cfg).values()) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096, help="global rows per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--out", type=Path, default=RESULTS / "training")
    args = parser.parse_args(argv)
    plan = [  # (label, mode, processes, threads per process)
        ("1 process, 1 thread", "trainer", 1, 1),
        ("1 process, 2 threads", "trainer", 1, 2),
        ("2 processes, data parallel (trainer)", "trainer", 2, 1),
        ("2 processes, latents sharded (trainer)", "latent", 2, 1),
        ("2 processes, data parallel, explicit all-reduce (bare loop)", "loop", 2, 1),
        ("2 processes, data parallel, DDP (bare loop)", "ddp", 2, 1),
    ]
    os.environ["OMP_NUM_THREADS"] = "1"
    tmp = args.out / ".distributed-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rows = []
    for label, mode, world, threads in plan:
        print(f"… {label}", file=sys.stderr, flush=True)
        port = 20000 + int.from_bytes(os.urandom(2), "little") % 20000
        mp.spawn(_run, args=(world, port, mode, threads, args, tmp), nprocs=world)
        row = json.loads((tmp / f"{mode}-{world}-{threads}.json").read_text())
        rows.append({"case": label, "mode": mode, "processes": world, "threads": threads, **row,
                     "tokens_per_s": args.batch / (row["ms"] / 1e3), "computed_mib": computed_mib(args, mode, world)})
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    base, base_cpu = rows[0]["ms"], rows[0]["cpu_ms"]
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "python": platform.python_version(), "device": "cpu", "cpu_cores": os.cpu_count(),
           "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
           "shape": {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "batch": args.batch, "steps": args.steps}}
    lines = [f"### CPU ({env['cpu_cores']} cores) · torch {env['torch']} · gloo · {env['date']} · load average "
             f"{load_before:.1f} → {env['load_average_after']:.1f}",
             f"TopK SAE d_in {args.d_in}, d_sae {args.d_sae:,}, k {args.k}, global batch {args.batch:,}, fp32, "
             f"torch backend; median of {args.steps} steps", "",
             "| case | ms/step | tokens/s | × 1 process | CPU ms/step (busiest rank) | × 1 process (CPU) | "
             "sent MiB/step computed | payload MiB/step | sent MiB/step measured |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['ms']:.0f} | {r['tokens_per_s']:,.0f} | {base / r['ms']:.2f} | "
                     f"{r['cpu_ms']:.0f} | {base_cpu / r['cpu_ms']:.2f} | "
                     f"{r['computed_mib']:.2f} | {r['payload_mib']:.2f} | {r['sent_mib']:.2f} |")
    table = "\n".join(lines) + "\n"
    save_report(args.out, f"distributed-cpu-{env['date'][:10]}", {"env": env, "rows": rows}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
