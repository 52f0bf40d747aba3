"""The job side of the GPU check: what a stage's process (`python -m bench.gpu_stages --job N`) measures
with. `Ctx` (device, dry run, deadline), `Recorder` (the job's result file, rewritten after every row),
the environment record, and timing: CUDA events around each call, peak memory, OOM as a result."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from bench.gpu_plan import SMI_ENV, TREE_ENV


def write_json(path: Path, payload) -> None:
    """payload as JSON at path, by a rename: a job killed mid-write leaves the previous version."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


class OutOfTime(Exception):
    """The job's deadline passed: the rest of its work is skipped (and listed)."""


@dataclass
class Ctx:
    device: object  # torch.device
    dry: bool
    deadline: float

    def left(self) -> float:
        return self.deadline - time.time()

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()


class Recorder:
    """A job's result file, rewritten after every row, so that a job killed at its deadline leaves its rows."""

    def __init__(self, path: Path, ctx: Ctx, **meta):
        self.path, self.ctx = path, ctx
        self.data = {**meta, "rows": [], "skipped": [], "errors": [], "info": {}, "finished": False}
        self.flush()

    def flush(self) -> None:
        write_json(self.path, self.data)

    def add(self, row: dict) -> dict:
        self.data["rows"].append(row)
        self.flush()
        return row

    def skip(self, what: str, reason: str) -> None:
        self.data["skipped"].append({"what": what, "reason": reason})
        self.flush()

    def error(self, what: str, err: BaseException) -> None:
        self.data["errors"].append({"what": what, "error": f"{type(err).__name__}: {err}"[:1000],
                                    "traceback": traceback.format_exc()[-4000:]})
        self.flush()

    @contextlib.contextmanager
    def check(self, **name):
        """A stage-1 check: the body fills the row; an exception is a failed row, not the end of the group."""
        if self.ctx.left() <= 0:
            raise OutOfTime(", ".join(f"{v}" for v in name.values()))
        row = dict(name)
        start = time.perf_counter()
        try:
            yield row
            self.ctx.sync()
        except Exception as err:  # noqa: BLE001 - a check that raises is a failed check, recorded
            row.update(passed=False, error=f"{type(err).__name__}: {err}"[:600],
                       traceback=traceback.format_exc()[-2000:])
        row["seconds"] = round(time.perf_counter() - start, 2)
        row.setdefault("passed", row.get("tol_ratio", math.inf) <= 1)
        self.add(row)


def environment(device, dry: bool) -> dict:
    import torch

    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": dry, "cpu_cores": os.cpu_count(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 2))
        with contextlib.suppress(Exception):
            env["cuda_driver_api"] = torch._C._cuda_getDriverVersion()
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    smi = json.loads(os.environ.get(SMI_ENV, "null") or "null") or {}
    env["driver"] = smi.get("driver_version")
    env["nvidia_smi"] = smi or None
    env["source"] = json.loads(os.environ.get(TREE_ENV, "null") or "null")
    return env


def timed(fn, ctx: Ctx, max_s: float = 1.0, max_reps: int = 30) -> dict:
    """Median ms of fn after two warm-up calls (the first one's wall time, compiles included, kept apart):
    CUDA events around each call on a GPU. The dry run times its one call by the wall clock (a fused TopK
    launch takes about a second a tile in Triton's interpreter)."""
    start = time.perf_counter()
    fn()
    ctx.sync()
    first = time.perf_counter() - start
    if ctx.dry or ctx.device.type != "cuda":
        return {"ms": first * 1e3, "min_ms": first * 1e3, "reps": 1, "first_call_s": round(first, 3)}
    import torch

    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = int(min(max_reps, max(5, max_s / max(time.perf_counter() - start, 1e-5))))
    # the peak (measure()) of the timed calls: not the first call's compiles, nor the autotuner's 256 MB
    # buffer for flushing L2 (triton.testing.do_bench)
    torch.cuda.reset_peak_memory_stats()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, end in events:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [begin.elapsed_time(end) for begin, end in events]
    return {"ms": statistics.median(times), "min_ms": min(times), "reps": reps, "first_call_s": round(first, 3)}


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def cleanup(ctx: Ctx) -> None:
    """Free the last case's memory before the next one's peak is measured (CUDA only: on CPU nothing is
    measured, and a collection costs 0.2 s with torch and dynamo loaded)."""
    if ctx.device.type == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def measure(make, ctx: Ctx, **timing) -> dict:
    """Build (make) and time one case: status ok / oom / n/a / error, and on CUDA the peak memory of its timed
    calls above what was allocated before it was built."""
    import torch

    cuda = ctx.device.type == "cuda"
    cleanup(ctx)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    fn = None
    try:
        fn = make()
        out = {"status": "n/a"} if fn is None else {"status": "ok", **timed(fn, ctx, **timing)}
    except Exception as err:  # noqa: BLE001 - an OOM or a failing implementation is a result
        out = {"status": "oom" if is_oom(err) else "error", "error": f"{type(err).__name__}: {err}"[:400]}
        if out["status"] == "error":
            out["traceback"] = traceback.format_exc()[-2000:]
    fn = None  # noqa: F841 - free the case's tensors before the next one
    if cuda:
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
            out["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    return out


def copy_bandwidth(ctx: Ctx) -> float:
    """Bytes per second of a device-to-device copy (read + write) of 1 GiB (16 MiB on CPU)."""
    import torch

    src = torch.empty((2**30 if ctx.device.type == "cuda" else 2**24) // 4, device=ctx.device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), ctx, max_s=0.5)["ms"]
    return 2 * src.numel() * 4 / (ms * 1e-3)
