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

Files, in --out (default $OUT, else bench/results/gpu-<device>-<date>/; at most 8 files, the device
tool's limit): 1-kernels.json ... 5-extra.json (rows, skipped points, errors, the environment and the
stage's markdown table), summary.json, summary.md (every table), gpu-check.log. Each records the device,
driver, torch, triton and CUDA versions and a hash of the kernel sources.

Timing: CUDA events around each call after two warm-up calls, the median of 5 to 30 calls (about a second
of them); the first call's wall time (compiles and the autotuner) is kept apart. The dry run times
one call by the wall clock. Nothing needs the network; the GPU machine's own Python (torch + triton) runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ---- the plan -------------------------------------------------------------------------------------------

STAGES = {1: "kernels", 2: "targets", 3: "sweep", 4: "capacity", 5: "extra"}
TITLES = {1: "Compiled kernels against their float64 references",
          2: "Targets at N 8192, d_in 2048, d_sae 65,536, k 64, bf16",
          3: "Sweep: fused TopK encoder and training step against naive PyTorch and torch.compile",
          4: "Largest dictionary that trains in GPU memory, against the memory planner",
          5: "Extra cases at the target shape"}
# Seconds per stage on an H100; the last stage gets the rest of TOTAL_S. The five stages' own guesses:
# stage 1's cold compiles (5-30 s per encoder config) overlap in up to 12 processes; stage 3 spends most
# of its time in torch.compile (20-40 s a shape), which comes last.
BUDGETS = {1: 100, 2: 90, 3: 160, 4: 75, 5: None}
TOTAL_S = 460  # 7 min 40 s: 8 minutes wall with room for the processes' start and the summary
GRACE_S = 8  # a job's own deadline is this much before the stage's; the driver kills it at the stage's
MIN_START_S = 12  # a stage with less time left than this is not started

TARGET = dict(n=8192, d_in=2048, d_sae=65_536, k=64)
SWEEP_D_SAE, SWEEP_K = (16_384, 65_536, 262_144), (32, 64, 128)
# The dry run: tiny and odd, since a fused TopK launch takes about a second a tile in Triton's interpreter.
DRY = dict(target=dict(n=12, d_in=16, d_sae=30, k=4), sweep_d_sae=(20, 30), sweep_k=(2, 4),
           capacity_start=16, capacity_step=8, fake_memory_latents=30)
LIMITS = {"TopK forward + backward / encoder GEMM": 1.5, "training step / (GEMM + Adam memory traffic)": 1.3}
SMI_ENV = "FASTSAE_GPU_CHECK_SMI"
TREE_ENV = "FASTSAE_GPU_CHECK_TREE"


def budgets_for(stages: list[int], overrides: dict[int, float], total: float) -> dict[int, float]:
    """Each stage's deadline, in seconds from the start: the cumulative sum of the budgets of the stages up
    to it, and never into the budgets of the stages after it."""
    own = {s: overrides.get(s, BUDGETS[s]) for s in stages}
    out, cumulative = {}, 0.0
    for i, s in enumerate(stages):
        later = sum(own[t] or 0 for t in stages[i + 1:])
        cumulative += own[s] if own[s] is not None else total
        out[s] = min(cumulative, total - later)
    return out


# ---- the driver: stages as processes, files as they come ------------------------------------------------


def nvidia_smi() -> dict | None:
    """The first GPU's name, driver and limits as nvidia-smi reports them; None without one."""
    for fields in ("name,driver_version,memory.total,clocks.max.sm,power.limit", "name,driver_version"):
        with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
            line = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30, check=True).stdout.strip().splitlines()[0]
            return dict(zip(fields.split(","), (v.strip() for v in line.split(",")), strict=False))
    return None


def source_tree() -> dict:
    """Which code was measured, where the copy on the GPU machine has no git history: a hash of the kernels
    and ops sources, and the git commit where there is one."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("kernels/*.py"), *ROOT.glob("fastsae/ops/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    out = {"kernels_ops_sha256": digest.hexdigest()[:16]}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if git.returncode == 0:
            out["git_commit"] = git.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "kernels", "fastsae",
                                    "bench"], capture_output=True, text=True, timeout=10).stdout
            out["git_dirty"] = bool(dirty.strip())
    return out


def write_json(path: Path, payload) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Job:
    stage: int
    groups: list[str]
    result: Path
    log: Path
    proc: subprocess.Popen | None = None
    log_handle: object = None
    started: float | None = None
    ended: float | None = None
    state: str = "pending"  # pending | running | done | failed | killed | not started

    @property
    def name(self) -> str:
        return ",".join(self.groups) or STAGES[self.stage]


def stage_jobs(stage: int, dry: bool, scratch: Path) -> tuple[list[Job], int]:
    """The stage's jobs and how many run at once. Stage 1: a group a process on a GPU (side by side: their
    compiles overlap; a fault costs one group), a few chunks in the dry run. Timed stages: one process."""
    if stage != 1:
        return [Job(stage, [], scratch / f"{stage}.json", scratch / f"{stage}.log")], 1
    from bench.gpu_correctness import GROUPS

    names = list(GROUPS)
    cores = os.cpu_count() or 2
    if dry:
        n = max(1, min(cores, 2))
        chunks = [names[i::n] for i in range(n)]
    else:
        chunks = [[g] for g in names]
    jobs = [Job(1, c, scratch / f"1-{i}.json", scratch / f"1-{i}.log") for i, c in enumerate(chunks)]
    return jobs, max(1, min(len(jobs), cores if dry else cores - 1, 16))


class Driver:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="fastsae-gpu-check-"))
        self.log_file = open(self.out / "gpu-check.log", "a")  # noqa: SIM115 - open for the whole run
        self.running: list[Job] = []
        self.summary: dict = {}
        self.sections: dict[int, str] = {}

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.t0:5.0f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def kill(self, job: Job) -> None:
        """The job's whole process group (torch.compile's workers too): SIGTERM, then SIGKILL after 3 s."""
        if job.proc is not None and job.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(job.proc.pid, sig)
                try:
                    job.proc.wait(timeout=3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.ended(job)

    def ended(self, job: Job) -> None:
        if job.log_handle is not None:
            job.log_handle.close()
            job.log_handle = None

    def start(self, job: Job, deadline: float) -> None:
        a = self.args
        cmd = [sys.executable, "-m", "bench.gpu_stages", "--job", str(job.stage), "--groups", ",".join(job.groups),
               "--result", str(job.result), "--deadline", f"{deadline - (2 if a.dry_run else GRACE_S):.3f}"]
        if a.dry_run:
            cmd.append("--dry-run")
        if a.inject:
            cmd += ["--inject", a.inject]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "1" if a.dry_run else "0",
               SMI_ENV: json.dumps(self.smi), TREE_ENV: json.dumps(self.tree)}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        # A process group of its own (same session, so the machine's clean-up still reaches it): killing the
        # group at the deadline takes torch.compile's worker processes with it.
        extra = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        job.log_handle = open(job.log, "w")  # noqa: SIM115 - closed when the job ends
        job.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=job.log_handle, stderr=subprocess.STDOUT, **extra)
        job.started, job.state = time.time(), "running"
        self.running.append(job)

    def run(self) -> int:
        a = self.args
        self.t0 = time.time()
        self.smi = nvidia_smi()
        self.tree = source_tree()
        stages = a.stages
        deadlines = budgets_for(stages, a.budgets, a.budget)
        self.summary = {"title": "fastsae GPU check" + (" (dry run: CPU, Triton's interpreter, tiny shapes)"
                                                          if a.dry_run else ""),
                        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "dry_run": a.dry_run, "budget_s": a.budget, "nvidia_smi": self.smi, "source": self.tree,
                        "host_python": platform.python_version(), "stages": {}}
        self.log(f"{self.summary['title']}: stages {stages}, budget {a.budget:.0f} s, out {self.out}")
        self.log(f"nvidia-smi: {self.smi}; source: {self.tree}")
        if not a.dry_run and self.smi is None:
            self.log("nvidia-smi found no GPU: the jobs will check torch.cuda themselves")
        for s in stages:
            self.run_stage(s, self.t0 + deadlines[s])
        self.summary["wall_s"] = round(time.time() - self.t0, 1)
        self.write_summary()
        self.log(env_line(self.summary.get("env")))
        bad = [s for s, v in self.summary["stages"].items() if v["status"] not in ("ok", "partial")]
        self.log(f"done in {self.summary['wall_s']:.0f} s; " + (f"stages not ok: {bad}" if bad else "every stage ok"))
        return 1 if bad else 0

    def run_stage(self, stage: int, deadline: float) -> None:
        name = STAGES[stage]
        start = time.time()
        left = deadline - start
        jobs, parallel = stage_jobs(stage, self.args.dry_run, self.scratch)
        if left < (1 if self.args.dry_run else MIN_START_S):
            self.log(f"stage {stage} ({name}): not run, {left:.0f} s left")
            for job in jobs:
                job.state = "not started"
            self.finish_stage(stage, jobs, start, deadline, "not run")
            return
        self.log(f"stage {stage} ({name}): {len(jobs)} job(s), {parallel} at a time, {left:.0f} s")
        pending = list(jobs)
        last_write = 0.0
        while pending or self.running:
            now = time.time()
            while pending and len(self.running) < parallel:
                job = pending.pop(0)
                if deadline - now < (1 if self.args.dry_run else GRACE_S + 2):
                    job.state = "not started"
                    continue
                self.start(job, deadline)
            for job in list(self.running):
                code = job.proc.poll()
                if code is not None:
                    job.ended, job.state = time.time(), "done" if code == 0 else "failed"
                    self.ended(job)
                    self.running.remove(job)
                    self.log(f"  {job.name}: {job.state} in {job.ended - job.started:.0f} s")
                    last_write = 0.0
            if time.time() > deadline:
                for job in list(self.running):
                    self.kill(job)
                    job.ended, job.state = time.time(), "killed"
                    self.running.remove(job)
                    self.log(f"  {job.name}: killed at the stage's deadline")
            if time.time() - last_write > 5:
                self.finish_stage(stage, jobs, start, deadline, "running")
                last_write = time.time()
            time.sleep(0.1)
        self.finish_stage(stage, jobs, start, deadline, None)

    def finish_stage(self, stage: int, jobs: list[Job], start: float, deadline: float, status: str | None) -> None:
        merged = merge(stage, jobs)
        merged.update(title=TITLES[stage], budget_s=round(deadline - start, 1),
                      wall_s=round(time.time() - start, 1), dry_run=self.args.dry_run)
        merged["status"] = status or stage_status(stage, merged)
        merged["headline"] = headline(stage, merged)
        merged["markdown"] = stage_markdown(stage, merged)
        write_json(self.out / f"{stage}-{STAGES[stage]}.json", merged)
        self.summary["stages"][stage] = {k: merged[k] for k in ("status", "headline", "wall_s", "budget_s")}
        self.sections[stage] = merged["markdown"]
        if status != "running":
            self.log(f"stage {stage}: {merged['status']}: {merged['headline']}")
        self.write_summary()

    def write_summary(self) -> None:
        env = next((e for e in (self._stage_env(s) for s in self.summary["stages"]) if e), {})
        self.summary["env"] = env
        write_json(self.out / "summary.json", self.summary)
        write_text(self.out / "summary.md", summary_markdown(self.summary, self.sections))

    def _stage_env(self, stage: int) -> dict | None:
        path = self.out / f"{stage}-{STAGES[stage]}.json"
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text()).get("env") or None
        return None

    def close(self) -> None:
        for job in list(self.running):
            self.kill(job)
        self.log_file.close()
        for path in self.scratch.glob("*"):
            path.unlink()
        with contextlib.suppress(OSError):
            self.scratch.rmdir()


def merge(stage: int, jobs: list[Job]) -> dict:
    """One stage's result from its jobs' files (rows in job order)."""
    out = {"stage": stage, "name": STAGES[stage], "env": None, "rows": [], "skipped": [], "errors": [], "info": {},
           "jobs": []}
    for job in jobs:
        data = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(job.result.read_text())
        out["env"] = out["env"] or data.get("env")
        out["rows"] += data.get("rows", [])
        out["skipped"] += data.get("skipped", [])
        out["errors"] += data.get("errors", [])
        out["info"].update(data.get("info", {}))
        entry = {"job": job.name, "state": job.state, "finished": bool(data.get("finished")),
                 "seconds": round(job.ended - job.started, 1) if job.started and job.ended else None}
        if job.state in ("failed", "killed") and job.log.exists():
            entry["log_tail"] = job.log.read_text(errors="replace")[-3000:]
        if job.state == "not started":
            out["skipped"].append({"what": f"job {job.name}", "reason": "no time left in the stage's budget"})
        out["jobs"].append(entry)
    return out


def stage_status(stage: int, m: dict) -> str:
    states = {j["state"] for j in m["jobs"]}
    if "killed" in states:
        return "killed"
    if "failed" in states or m["errors"]:
        return "error"
    if stage == 1 and any(not r.get("passed") for r in m["rows"]):
        return "fail"
    if m["skipped"]:
        return "partial"
    return "ok" if m["rows"] else "empty"


# ---- the job side: one stage (or some of stage 1's groups) in this process -------------------------------


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


# ---- what gets timed -------------------------------------------------------------------------------------


def case(op: str, d_sae: int, k: int | None, shape: dict, activation: str = "topk", density: float | None = None):
    from bench.suite import Case

    return Case(op, activation, shape["n"], shape["d_in"], d_sae, k, density)


def gemm_closure(c, ctx: Ctx, dtype):
    """The floor's GEMM, x @ W_enc^T, of the case's shape (the vendor library's)."""
    import torch

    x = torch.randn(c.n, c.d_in, device=ctx.device, dtype=dtype)
    W = torch.randn(c.d_sae, c.d_in, device=ctx.device, dtype=dtype)
    return lambda: x @ W.T


def fastsae_closure(op: str, c, ctx: Ctx, dtype, mixed: bool = False):
    """One iteration of fastsae on the Triton backend (Triton's interpreter in the dry run) with the fused
    optimizer the trainer picks on CUDA. Ops: the suite's (bench/suite.py), and forward_backward (the step
    without its optimizer) and trainer_step (Trainer.step, metrics off; mixed: fp32 master weights and bf16
    compute, the trainer's mixed precision)."""
    import torch

    from bench import suite
    from fastsae import use_backend
    from fastsae.train import TrainConfig, Trainer

    x = torch.randn(c.n, c.d_in, device=ctx.device, dtype=dtype)
    if op in ("decode", "resample"):
        return suite._build_fastsae(c, "triton", x)
    sae = suite._sae(c, ctx.device, torch.float32 if mixed else dtype)
    if op == "encode":
        sae.eval()

        def encode():
            with use_backend("triton"), torch.no_grad():
                return sae.encode(x)
        return encode
    if op == "encoder":
        def encoder():
            sae.zero_grad(set_to_none=True)
            with use_backend("triton"):
                sae.encode(x).values.float().sum().backward()
        return encoder
    trainer = Trainer(sae, TrainConfig.flat(lr=1e-4, progress=False, optimizer="fused",
                                            mixed_precision="bfloat16" if mixed else None))
    opt = trainer.optimizer
    if op == "optimizer":
        for p in sae.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)

        def optimizer():
            with use_backend("triton"):
                opt.step()
        return optimizer
    if op == "trainer_step":
        def trainer_step():
            with use_backend("triton"):
                trainer.step(x, metrics=False)
        return trainer_step

    def step():
        opt.zero_grad(set_to_none=True)
        with use_backend("triton"):
            sae(x).loss.backward()
            if op == "step":
                opt.step()
    if op not in ("step", "forward_backward"):
        raise ValueError(f"unknown op {op!r}")
    return step


def naive_closure(op: str, c, ctx: Ctx, dtype, compile_backend: str | None = None):
    """The plain dense SAE of bench/suite.py (the (N, d_sae) activations exist), eager or torch.compile'd with
    compile_backend ("inductor" on a GPU; "eager" in the dry run: dynamo's tracing without code generation)."""
    import torch

    from bench import suite

    x = torch.randn(c.n, c.d_in, device=ctx.device, dtype=dtype)
    if op not in ("encoder", "step"):
        return None if compile_backend else suite._build_naive(c, x, compiled=False)
    sae = suite._sae(c, ctx.device, dtype)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    wrap = (lambda f: torch.compile(f, dynamic=False, backend=compile_backend)) if compile_backend else (lambda f: f)
    if op == "encoder":
        encode = wrap(suite.naive_encode)

        def encoder():
            for p in params:
                p.grad = None
            encode(x, sae.W_enc, sae.b_enc, sae.b_dec, c.activation, c.k).float().sum().backward()
        return encoder
    forward = wrap(suite.naive_forward)
    opt = torch.optim.Adam(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        forward(x, *params, c.activation, c.k, sae.cfg.l1_coefficient).backward()
        sae.remove_parallel_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()
    return step


def compile_limits() -> None:
    """Room for every shape of the sweep in dynamo's cache (past its default limit of 8 recompiles per
    function it would silently run the sweep's later shapes eagerly)."""
    import torch._dynamo

    for name, value in (("cache_size_limit", 64), ("recompile_limit", 64), ("accumulated_cache_size_limit", 512),
                        ("accumulated_recompile_limit", 512)):
        if hasattr(torch._dynamo.config, name):
            with contextlib.suppress(Exception):  # an alias a torch version has retired
                setattr(torch._dynamo.config, name, value)


def metrics(row: dict, c, dtype, gemm_ms: float | None, bandwidth: float | None, op: str | None = None) -> dict:
    """TFLOP/s (dense-equivalent), GB/s over the op's minimum bytes, x floor (GEMM + min bytes / copy
    bandwidth, bench/suite.py) and x GEMM."""
    from bench.suite import OPS, dense_flops, min_bytes

    if row.get("status") != "ok":
        return row
    op = op or c.op
    c = dataclasses.replace(c, op=op) if op in OPS else c
    seconds = row["ms"] * 1e-3
    if op in OPS:
        flops = dense_flops(c)
        row["tflops"] = flops / seconds / 1e12 if flops else None
        row["gbps"] = min_bytes(c, dtype) / seconds / 1e9
        if gemm_ms and bandwidth:
            floor = (gemm_ms if op in ("encode", "encoder", "step") else 0) + min_bytes(c, dtype) / bandwidth * 1e3
            row["x_floor"] = row["ms"] / floor
    if gemm_ms:
        row["x_gemm"] = row["ms"] / gemm_ms
    return row


# ---- stage 1: kernels --------------------------------------------------------------------------------------


def stage_kernels(rec: Recorder, ctx: Ctx, groups: list[str]) -> None:
    from bench import gpu_correctness

    for i, group in enumerate(groups):
        try:
            gpu_correctness.run_group(group, rec, ctx)
        except OutOfTime as err:
            rec.skip(f"group {group} from check '{err}'", "over budget")
            for rest in groups[i + 1:]:
                rec.skip(f"group {rest}", "over budget")
            return
        except Exception as err:  # noqa: BLE001 - the next group still runs
            rec.error(f"group {group}", err)


# ---- stage 2: targets ---------------------------------------------------------------------------------------


def stage_targets(rec: Recorder, ctx: Ctx, _groups) -> None:
    import torch

    from fastsae.kernels import _autotune

    shape = DRY["target"] if ctx.dry else TARGET
    dtype = torch.bfloat16
    d_sae, k = shape["d_sae"], shape["k"]
    bandwidth = copy_bandwidth(ctx)
    rec.data["info"]["copy_gbps"] = bandwidth / 1e9
    rec.data["info"]["shape"] = {**shape, "dtype": "bfloat16"}
    found: dict[str, dict] = {}

    def run(label, op, impl, make, metric_op=None):
        if ctx.left() <= (0 if ctx.dry else 3):
            rec.skip(label, "over budget")
            return
        row = {"label": label, "op": op, "impl": impl, **measure(make, ctx)}
        if op == "gemm":
            found["gemm"] = row
            if row["status"] == "ok":
                row["tflops"] = 2 * shape["n"] * shape["d_in"] * d_sae / (row["ms"] * 1e-3) / 1e12
        else:
            c = case(metric_op or op, d_sae, k, shape)
            found[label] = metrics(row, c, dtype, found.get("gemm", {}).get("ms"), bandwidth)
        rec.add(row)

    def fast(op, mixed=False):
        return lambda: fastsae_closure(op, case(op, d_sae, k, shape), ctx, dtype, mixed=mixed)

    run("encoder GEMM x @ W_enc^T (torch)", "gemm", "torch",
        lambda: gemm_closure(case("encode", d_sae, k, shape), ctx, dtype))
    run("fastsae TopK forward + backward", "encoder", "fastsae_triton", fast("encoder"))
    run("fastsae training step", "step", "fastsae_triton", fast("step"))
    run("fastsae fused Adam", "optimizer", "fastsae_triton", fast("optimizer"))
    targets(rec, found, bandwidth, shape, dtype)
    run("fastsae TopK forward", "encode", "fastsae_triton", fast("encode"))
    run("fastsae forward + backward (step without Adam)", "forward_backward", "fastsae_triton",
        fast("forward_backward"), metric_op="step")
    run("fastsae Trainer.step (metrics off)", "trainer_step", "fastsae_triton", fast("trainer_step"),
        metric_op="step")
    for op, label in (("encoder", "naive TopK forward + backward"), ("step", "naive training step"),
                      ("optimizer", "naive torch.optim.Adam + constraint")):
        run(label, op, "naive", lambda op=op: naive_closure(op, case(op, d_sae, k, shape), ctx, dtype))
    targets(rec, found, bandwidth, shape, dtype)
    rec.data["info"]["autotuned"] = {" ".join(map(str, key[:4])): c.label() for key, c in _autotune._chosen.items()}


def targets(rec: Recorder, found: dict, bandwidth: float, shape: dict, dtype) -> None:
    """The issue's two targets, and two other views of the step, from the rows measured so far."""
    from bench.suite import min_bytes

    gemm = found.get("gemm", {}).get("ms")
    enc = found.get("fastsae TopK forward + backward", {}).get("ms")
    step = found.get("fastsae training step", {}).get("ms")
    adam = found.get("fastsae fused Adam", {}).get("ms")
    adam_traffic_ms = min_bytes(case("optimizer", shape["d_sae"], shape["k"], shape), dtype) / bandwidth * 1e3
    step_bytes_ms = min_bytes(case("step", shape["d_sae"], shape["k"], shape), dtype) / bandwidth * 1e3
    out = []

    def add(name, num, den, limit=None):
        if num is None or not den:
            out.append({"target": name, "ratio": None, "limit": limit, "met": None})
            return
        ratio = num / den
        out.append({"target": name, "ratio": ratio, "limit": limit, "met": None if limit is None else ratio <= limit,
                    "ms": num, "floor_ms": den})

    names = list(LIMITS)
    add(names[0], enc, gemm, LIMITS[names[0]])
    add(names[1], step, gemm and gemm + adam_traffic_ms, LIMITS[names[1]])
    add("training step / (GEMM + measured fused Adam)", step, gemm and adam and gemm + adam)
    add("training step / (GEMM + every minimum byte), the suite's x floor", step, gemm and gemm + step_bytes_ms)
    rec.data["info"]["targets"] = out
    rec.data["info"]["adam_traffic_ms"] = adam_traffic_ms
    rec.flush()


# ---- stage 3: sweep ----------------------------------------------------------------------------------------------


def sweep_plan(dry: bool) -> list[tuple[str, int, int | None, str]]:
    """(impl, d_sae, k, op) in priority order: the GEMM floor of each d_sae; the target point (d_sae 65,536,
    k 64) with all three implementations; the other points eager, k 64 and the larger d_sae first; then
    torch.compile at the other points (20-40 s a shape on a GPU), skipped when the budget runs out."""
    d_saes, ks = (DRY["sweep_d_sae"], DRY["sweep_k"]) if dry else (SWEEP_D_SAE, SWEEP_K)
    target = DRY["target"] if dry else TARGET
    by_d = sorted(d_saes, key=lambda d: (d != target["d_sae"], -d))
    by_k = sorted(ks, key=lambda k: (k != target["k"], k))
    points = [(d, k) for k in by_k for d in by_d]  # the target point first
    plan = [("floor", d_sae, None, "gemm") for d_sae in by_d]
    eager = [(impl, d, k, op) for d, k in points for op in ("encoder", "step") for impl in ("fastsae_triton", "naive")]
    compiled = [("naive_compile", d, k, op) for d, k in points for op in ("encoder", "step")]
    return plan + eager[:4] + compiled[:2] + eager[4:] + compiled[2:]


def stage_sweep(rec: Recorder, ctx: Ctx, _groups) -> None:
    import torch

    shape = DRY["target"] if ctx.dry else TARGET
    dtype = torch.bfloat16
    compile_limits()
    bandwidth = copy_bandwidth(ctx)
    rec.data["info"].update(copy_gbps=bandwidth / 1e9, n=shape["n"], d_in=shape["d_in"], dtype="bfloat16",
                            compile_backend="eager" if ctx.dry else "inductor")
    gemm_ms: dict[int, float] = {}
    # seconds a measurement may need: an eager point about 2 s, a torch.compile'd one 20-40 s
    need = {"floor": 2, "fastsae_triton": 4, "naive": 3, "naive_compile": 40}
    for impl, d_sae, k, op in sweep_plan(ctx.dry):
        label = f"{op} d_sae {d_sae}" + (f" k {k}" if k else "") + f" {impl}"
        if ctx.left() < (0 if ctx.dry else need[impl]):
            rec.skip(label, f"over budget ({max(ctx.left(), 0):.0f} s left)")
            continue
        c = case(op if op != "gemm" else "encode", d_sae, k, shape)
        if impl == "floor":
            make = lambda c=c: gemm_closure(c, ctx, dtype)  # noqa: E731
        elif impl == "fastsae_triton":
            make = lambda c=c: fastsae_closure(c.op, c, ctx, dtype)  # noqa: E731
        else:
            backend = None if impl == "naive" else ("eager" if ctx.dry else "inductor")
            make = lambda c=c, b=backend: naive_closure(c.op, c, ctx, dtype, compile_backend=b)  # noqa: E731
        row = {"op": op, "d_sae": d_sae, "k": k, "impl": impl, **measure(make, ctx, max_s=0.5)}
        if impl == "floor" and row["status"] == "ok":
            gemm_ms[d_sae] = row["ms"]
            row["tflops"] = 2 * shape["n"] * shape["d_in"] * d_sae / (row["ms"] * 1e-3) / 1e12
        elif impl != "floor":
            metrics(row, c, dtype, gemm_ms.get(d_sae), bandwidth)
        rec.add(row)


# ---- stage 4: capacity ----------------------------------------------------------------------------------------------


def stage_capacity(rec: Recorder, ctx: Ctx, _groups) -> None:
    """Largest d_sae whose TopK training step (Trainer.step, bf16 weights, fp32 Adam moments, the fused
    kernels) fits: powers of two upward from 2^17 until one does not fit, then bisection to 2^14. The
    dry run pretends the device holds fake_memory_latents latents and nothing more."""
    import dataclasses

    import torch

    from fastsae.train.plan import GIB, PlanConfig, largest_d_sae, plan

    os.environ["FASTSAE_AUTOTUNE"] = "0"  # the first tile config: memory hardly depends on it, and no timing
    shape = DRY["target"] if ctx.dry else TARGET
    n, d_in, k = shape["n"], shape["d_in"], shape["k"]
    cfg = PlanConfig(d_in, 2**14, k, n, weights="bfloat16", compute="bfloat16", moments="float32",
                     backend="triton", optimizer="fused")
    if ctx.dry:
        memory = plan(dataclasses.replace(cfg, d_sae=DRY["fake_memory_latents"])).total
        start, step = DRY["capacity_start"], DRY["capacity_step"]
    else:
        memory = torch.cuda.mem_get_info(ctx.device)[1]
        start, step = 2**17, 2**14
    planned = largest_d_sae(cfg, memory)
    rec.data["info"].update(n=n, d_in=d_in, k=k, memory_gib=memory / GIB, planned_largest=planned,
                            plan_config=dataclasses.asdict(cfg), step=step)
    rec.flush()
    good = bad = None
    d_sae = start
    while True:
        if ctx.left() < (0 if ctx.dry else 6):
            rec.skip(f"probe d_sae {d_sae}", f"over budget; the answer lies in [{good}, {bad})")
            break
        row = {"d_sae": d_sae, **probe_capacity(ctx, d_sae, n, d_in, k)}
        p = plan(dataclasses.replace(cfg, d_sae=d_sae))
        reserve = p.terms.get("CUDA context + allocator slack", 0)
        row.update(planned_mib=p.total / 2**20, planned_without_reserve_mib=(p.total - reserve) / 2**20)
        if row.get("peak_allocated_mib"):
            row["plan_error"] = row["planned_without_reserve_mib"] / row["peak_allocated_mib"] - 1
        rec.add(row)
        if row["status"] == "ok":
            good = d_sae
        else:
            bad = d_sae
        if bad is None:
            d_sae *= 2
        elif good is None:
            d_sae = d_sae // 2 // step * step
            if d_sae < step:
                break
        elif bad - good <= step:
            break
        else:
            d_sae = (good + bad) // 2 // step * step
    rec.data["info"].update(measured_largest=good, first_failing=bad)
    if good and planned:
        rec.data["info"]["planned_over_measured"] = planned / good - 1
    rec.flush()


def probe_capacity(ctx: Ctx, d_sae: int, n: int, d_in: int, k: int) -> dict:
    import torch

    cuda = ctx.device.type == "cuda"
    cleanup(ctx)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        _train_two_steps(ctx, d_sae, n, d_in, k)
        out = {"status": "ok"}
    except Exception as err:  # noqa: BLE001 - an OOM is the answer; anything else is recorded
        out = {"status": "oom" if is_oom(err) else "error", "error": f"{type(err).__name__}: {err}"[:300]}
    out["seconds"] = round(time.perf_counter() - start, 2)
    if cuda:
        with contextlib.suppress(Exception):
            out["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            out["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    cleanup(ctx)
    return out


def _train_two_steps(ctx: Ctx, d_sae: int, n: int, d_in: int, k: int) -> None:
    import torch

    from fastsae import SAE, SAEConfig, use_backend
    from fastsae.train import TrainConfig, Trainer

    if ctx.dry and d_sae > DRY["fake_memory_latents"]:
        raise torch.OutOfMemoryError(f"dry run: the pretend device holds {DRY['fake_memory_latents']} latents")
    sae = SAE(SAEConfig(d_in, d_sae, activation="topk", k=k, dtype="bfloat16"), device=ctx.device, seed=0)
    sae.check_finite = False
    trainer = Trainer(sae, TrainConfig.flat(lr=1e-4, progress=False, optimizer="fused"))
    x = torch.randn(n, d_in, device=ctx.device, dtype=torch.bfloat16)
    with use_backend("triton"):
        # two steps on a GPU: the second's forward holds the first's gradients and Adam's moments (the peak)
        for _ in range(1 if ctx.dry else 2):
            trainer.step(x, metrics=False)
    ctx.sync()


# ---- stage 5: extra ----------------------------------------------------------------------------------------------


EXTRA = [  # (label, op, activation, k, density, impls, mixed)
    ("BatchTopK training step", "step", "batchtopk", 64, None, ("fastsae_triton", "naive"), False),
    ("ReLU (1% active) training step", "step", "relu", None, 0.01, ("fastsae_triton", "naive"), False),
    ("TopK Trainer.step, fp32 master weights + bf16 compute", "trainer_step", "topk", 64, None, ("fastsae_triton",),
     True),
    ("BatchTopK encoder forward + backward", "encoder", "batchtopk", 64, None, ("fastsae_triton", "naive"), False),
    ("ReLU (1% active) encoder forward + backward", "encoder", "relu", None, 0.01, ("fastsae_triton", "naive"), False),
    ("TopK decode forward + backward", "decode", "topk", 64, None, ("fastsae_triton", "naive"), False),
    ("TopK resampling (10% dead, pool 4N)", "resample", "topk", 64, None, ("fastsae_triton",), False),
]


def stage_extra(rec: Recorder, ctx: Ctx, _groups) -> None:
    import torch

    shape = DRY["target"] if ctx.dry else TARGET
    dtype = torch.bfloat16
    d_sae = shape["d_sae"]
    bandwidth = copy_bandwidth(ctx)
    gemm = measure(lambda: gemm_closure(case("encode", d_sae, None, shape), ctx, dtype), ctx)
    gemm_ms = gemm.get("ms")
    rec.data["info"].update(copy_gbps=bandwidth / 1e9, gemm_ms=gemm_ms, shape={**shape, "dtype": "bfloat16"})
    rec.flush()
    for label, op, activation, k, density, impls, mixed in EXTRA:
        k = None if k is None else min(k, shape["k"])
        for impl in impls:
            if ctx.left() < (0 if ctx.dry else 5):
                rec.skip(f"{label} ({impl})", "over budget")
                continue
            c = case(op, d_sae, k, shape, activation=activation, density=density)
            if impl == "fastsae_triton":
                make = lambda c=c, m=mixed: fastsae_closure(c.op, c, ctx, dtype, mixed=m)  # noqa: E731
            else:
                make = lambda c=c: naive_closure(c.op, c, ctx, dtype)  # noqa: E731
            row = {"label": label, "op": op, "activation": activation, "k": k, "impl": impl, **measure(make, ctx)}
            metrics(row, c, dtype, gemm_ms, bandwidth, op="step" if op == "trainer_step" else None)
            rec.add(row)


STAGE_FUNCS = {1: stage_kernels, 2: stage_targets, 3: stage_sweep, 4: stage_capacity, 5: stage_extra}


def job_main(args) -> int:
    stage = args.job
    inject = dict(item.split("=") for item in args.inject.split(",")) if args.inject else {}
    if inject.get(str(stage)) == "fail":  # for tests: a stage that fails at once
        write_json(Path(args.result), {"rows": [], "skipped": [], "info": {}, "finished": False,
                                       "errors": [{"what": "job", "error": "injected failure (--inject)"}]})
        print("injected failure (--inject)", file=sys.stderr)
        return 1
    if inject.get(str(stage)) == "hang":  # for tests: a stage that never ends
        time.sleep(3600)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check needs CUDA (or --dry-run for the CPU check)", file=sys.stderr)
        write_json(Path(args.result), {"rows": [], "skipped": [], "info": {}, "finished": False,
                                       "errors": [{"what": "job", "error": "torch.cuda.is_available() is False"}]})
        return 1
    import gc

    gc.freeze()  # what is loaded by now stays: later collections (one before each measurement) scan less
    device = torch.device("cpu" if args.dry_run else "cuda")
    ctx = Ctx(device, args.dry_run, args.deadline)
    groups = [g for g in args.groups.split(",") if g]
    rec = Recorder(Path(args.result), ctx, stage=stage, groups=groups, env=environment(device, args.dry_run))
    torch.manual_seed(0)
    try:
        STAGE_FUNCS[stage](rec, ctx, groups)
    except OutOfTime as err:
        rec.skip(str(err), "over budget")
    except Exception as err:  # noqa: BLE001 - recorded, and the driver goes on to the next stage
        rec.error(f"stage {stage}", err)
        traceback.print_exc()
        return 1
    rec.data["finished"] = True
    rec.flush()
    return 0


# ---- reports ------------------------------------------------------------------------------------------------------


def _f(value, spec: str = ".2f", empty: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def env_line(env: dict | None) -> str:
    if not env:
        return "environment: not recorded"
    parts = [env.get("device"), f"driver {env.get('driver')}" if env.get("driver") else None,
             f"torch {env.get('torch')}", f"CUDA {env.get('cuda')}" if env.get("cuda") else None,
             f"triton {env.get('triton')}", f"Python {env.get('python')}", env.get("date")]
    if env.get("source"):
        src = env["source"]
        parts.append(f"kernels+ops sha256 {src.get('kernels_ops_sha256')}"
                     + (f", git {src['git_commit'][:10]}{'+dirty' if src.get('git_dirty') else ''}"
                        if src.get("git_commit") else ""))
    return " · ".join(str(p) for p in parts if p)


def headline(stage: int, m: dict) -> str:
    rows, info = m["rows"], m["info"]
    if stage == 1:
        failed = [r for r in rows if not r.get("passed")]
        text = f"{len(rows) - len(failed)}/{len(rows)} checks pass"
        if failed:
            text += "; FAIL: " + "; ".join(f"{r['kernel']} {r['dtype']} ({r.get('shape')}, {r.get('config')})"
                                           for r in failed[:6]) + (" …" if len(failed) > 6 else "")
    elif stage == 2:
        parts = []
        for t in info.get("targets", [])[:2]:
            if t["ratio"] is None:
                parts.append(f"{t['target']}: not measured")
            else:
                parts.append(f"{t['target']} = {t['ratio']:.2f} (limit {t['limit']}: "
                             f"{'met' if t['met'] else 'NOT met'})")
        text = "; ".join(parts) or "no targets measured"
        if m.get("dry_run"):
            text += " (dry run: times in Triton's interpreter, which mean nothing)"
    elif stage in (3, 5):
        ok = sum(r.get("status") == "ok" for r in rows)
        text = f"{ok} measured, {len(rows) - ok} oom/error/n.a., {len(m['skipped'])} skipped over budget"
    else:
        good, planned = info.get("measured_largest"), info.get("planned_largest")
        text = (f"largest d_sae that trains: {_f(good, ',')} measured (first failing "
                f"{_f(info.get('first_failing'), ',')}), {_f(planned, ',')} planned in "
                f"{_f(info.get('memory_gib'), '.1f')} GiB")
        if info.get("planned_over_measured") is not None:
            text += f" ({info['planned_over_measured']:+.1%})"
    if m["errors"]:
        text += f"; {len(m['errors'])} error(s): {m['errors'][0]['error'][:160]}"
    return text


def stage_markdown(stage: int, m: dict) -> str:
    lines = [f"## {stage}. {TITLES[stage]}", "",
             f"status **{m['status']}** · {m['wall_s']:.0f} s of {m['budget_s']:.0f} s · {m['headline']}", ""]
    rows, info = m["rows"], m["info"]
    if stage in (2, 5) and info.get("shape"):
        sh = info["shape"]
        lines += [f"N {sh['n']}, d_in {sh['d_in']}, d_sae {sh['d_sae']}, k {sh['k']}, {sh['dtype']}"
                  + (" (the dry run's tiny shape)" if m.get("dry_run") else ""), ""]
    if stage == 1:
        lines += ["| kernel | dtype | shape | config | max abs err | rel err | err / tol | ok |",
                  "|---|---|---|---|---:|---:|---:|---|"]
        for r in rows:
            lines.append(f"| {r.get('kernel')} | {r.get('dtype')} | {r.get('shape')} | {r.get('config', '')}"
                         f"{' ' + r['variant'] if r.get('variant') else ''} | {_f(r.get('max_abs_err'), '.2e')} | "
                         f"{_f(r.get('rel_err'), '.1e')} | {_f(r.get('tol_ratio'), '.2f')} | "
                         f"{'yes' if r.get('passed') else '**NO** ' + (r.get('error') or r.get('note') or '')[:120]} |")
    elif stage == 2:
        if info.get("targets"):
            lines += ["| target | ratio | limit | met |", "|---|---:|---:|---|"]
            for t in info["targets"]:
                met = "" if t["met"] is None else ("yes" if t["met"] else "**NO**")
                lines.append(f"| {t['target']} | {_f(t['ratio'])} | {_f(t['limit'], 'g')} | {met} |")
            lines += ["", f"copy bandwidth {_f(info.get('copy_gbps'), '.0f')} GB/s; Adam's memory traffic alone "
                          f"{_f(info.get('adam_traffic_ms'), '.2f')} ms", ""]
        lines += ["| measurement | ms | TFLOP/s | GB/s | x GEMM | x floor | peak MiB | first call s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            ms = _f(r.get("ms"), ".3f") if r.get("status") == "ok" else r.get("status")
            lines.append(f"| {r['label']} | {ms} | {_f(r.get('tflops'), '.0f')} | {_f(r.get('gbps'), '.0f')} | "
                         f"{_f(r.get('x_gemm'))} | {_f(r.get('x_floor'))} | {_f(r.get('peak_mib'), '.0f')} | "
                         f"{_f(r.get('first_call_s'), '.1f')} |")
    elif stage in (3, 5):
        if stage == 3:
            lines += [f"N {info.get('n')}, d_in {info.get('d_in')}, bf16; copy bandwidth "
                      f"{_f(info.get('copy_gbps'), '.0f')} GB/s; torch.compile backend "
                      f"{info.get('compile_backend')}", ""]
        lines += ["| case | impl | ms | TFLOP/s | GB/s | x floor | x GEMM | peak MiB | first call s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        if stage == 3:  # measured in priority order, shown by case
            impls = ("floor", "fastsae_triton", "naive", "naive_compile")
            rows = sorted(rows, key=lambda r: (r["op"] != "gemm", r["op"], r["d_sae"], r.get("k") or 0,
                                               impls.index(r["impl"])))
        for r in rows:
            what = r.get("label") or (f"{r['op']} d_sae {r['d_sae']:,}" + (f" k {r['k']}" if r.get("k") else ""))
            ms = _f(r.get("ms"), ".3f") if r.get("status") == "ok" else r.get("status")
            lines.append(f"| {what} | {r['impl']} | {ms} | {_f(r.get('tflops'), '.0f')} | {_f(r.get('gbps'), '.0f')} "
                         f"| {_f(r.get('x_floor'))} | {_f(r.get('x_gemm'))} | {_f(r.get('peak_mib'), '.0f')} | "
                         f"{_f(r.get('first_call_s'), '.1f')} |")
    elif stage == 4:
        lines += [f"N {info.get('n')}, d_in {info.get('d_in')}, k {info.get('k')}, bf16 weights, fp32 Adam moments, "
                  f"Trainer.step; {_f(info.get('memory_gib'), '.1f')} GiB on the device; the planner's largest "
                  f"d_sae {_f(info.get('planned_largest'), ',')}", "",
                  "| d_sae | status | peak allocated MiB | peak reserved MiB | planned MiB (without reserve) | "
                  "plan error | s |", "|---:|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['d_sae']:,} | {r['status']} | {_f(r.get('peak_allocated_mib'), ',.0f')} | "
                         f"{_f(r.get('peak_reserved_mib'), ',.0f')} | {_f(r.get('planned_mib'), ',.0f')} "
                         f"({_f(r.get('planned_without_reserve_mib'), ',.0f')}) | {_f(r.get('plan_error'), '+.1%')} | "
                         f"{_f(r.get('seconds'), '.1f')} |")
    if m["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{s['what']} ({s['reason']})" for s in m["skipped"][:40])
                  + (f"; and {len(m['skipped']) - 40} more" if len(m["skipped"]) > 40 else "")]
    for e in m["errors"]:
        lines += ["", f"Error in {e['what']}: `{e['error'][:300]}`"]
    for j in m["jobs"]:
        if j["state"] in ("failed", "killed", "not started"):
            lines += ["", f"Job {j['job']}: {j['state']}"]
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict, sections: dict[int, str]) -> str:
    lines = [f"# {summary['title']}", "", env_line(summary.get("env")), "",
             f"Started {summary['started']}; budget {summary['budget_s']:.0f} s"
             + (f"; wall {summary['wall_s']:.0f} s" if summary.get("wall_s") else " (running)"), "",
             "| stage | status | s | budget s | result |", "|---|---|---:|---:|---|"]
    for s, v in summary["stages"].items():
        lines.append(f"| {s}. {STAGES[int(s)]} | {v['status']} | {v['wall_s']:.0f} | {v['budget_s']:.0f} | "
                     f"{v['headline']} |")
    lines.append("")
    for s in sorted(sections):
        lines += [sections[s]]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------------------------


def default_out(dry: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    if dry:
        return Path(tempfile.gettempdir()) / "fastsae-gpu-check-dry-run"
    smi = nvidia_smi() or {}
    device = "".join(c if c.isalnum() else "-" for c in smi.get("name", "gpu").lower()).strip("-")
    return ROOT / "bench" / "results" / f"gpu-{device}-{dt.date.today().isoformat()}"


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
    parser.add_argument("--out", type=Path, help="where the files go (default $OUT, else bench/results/gpu-<device>-"
                                                 "<date>/; the dry run: a temporary folder)")
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
