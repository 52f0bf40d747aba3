"""The GPU check's driver (bench/gpu_stages.py): each stage runs as processes of its own with a deadline,
killed (process group and all) at it; their result files are merged into the stage's file as they come,
and the summary is rewritten after every change, so that a run cut off still returns what it measured."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.gpu_job import write_json
from bench.gpu_plan import GRACE_S, MIN_START_S, ROOT, SMI_ENV, STAGES, TITLES, TREE_ENV, budgets_for
from bench.gpu_reports import env_line, headline, stage_markdown, summary_markdown


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
