"""Run a function in several gloo processes on CPU, as the distributed tests do.

torch.multiprocessing.spawn starts the ranks (fresh interpreters: they import torch once each, which
is most of a test's time, so each test gathers its checks into one spawn). Every rank runs with one
thread (OMP_NUM_THREADS=1; CI has 2 cores) and a process-group timeout of 60 s, so a lost peer fails
the test instead of hanging it.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    """fn(rank, world, *args) in `world` processes joined in one gloo group; raises if any rank fails.
    fn must be importable (a module-level function of a test module)."""
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned interpreters
    try:
        mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)
    finally:
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous
