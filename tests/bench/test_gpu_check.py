"""bench/gpu_check.sh checked end to end without a GPU (issue 29): its dry run runs every stage on CPU at
tiny shapes, with the kernels in Triton's interpreter, so that the script a GPU session will run once is
known to run; and a stage that fails, hangs or runs out of time is recorded while the next stage still runs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = {1: "1-kernels.json", 2: "2-targets.json", 3: "3-sweep.json", 4: "4-capacity.json", 5: "5-extra.json"}
KERNELS = {"encoder_topk", "encoder_threshold", "sparse_decode", "sparse_value_grad", "prefix_decode", "segment_reduce",
           "adam",
           "resample", "SAE forward + backward", "encoder_topk (Triton backend op)"}


def _script(out: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET", "FASTSAE_BACKEND")}
    env["PYTHON"] = sys.executable
    start = time.time()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - start


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc, wall = _script(out)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return out, proc.stdout, wall


def _load(out: Path, stage: int) -> dict:
    return json.loads((out / FILES[stage]).read_text())


@pytest.mark.slow
def test_dry_run_writes_every_stage_and_a_summary(dry_run):
    out, stdout, wall = dry_run
    # the device tool brings back 8 files at most
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES.values(), "summary.json", "summary.md",
                                                            "gpu-check.log"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and set(summary["stages"]) == {"1", "2", "3", "4", "5"}
    assert all(v["status"] == "ok" for v in summary["stages"].values()), summary["stages"]
    assert summary["wall_s"] < wall and "every stage ok" in stdout
    md = (out / "summary.md").read_text()
    for stage in FILES:
        data = _load(out, stage)
        assert data["status"] == "ok" and data["rows"] and not data["errors"] and not data["skipped"], stage
        assert all(j["state"] == "done" and j["finished"] for j in data["jobs"])
        env = data["env"]
        assert env["device"].startswith("cpu") and env["dry_run"] and env["triton_interpret"]
        for key in ("torch", "triton", "cuda", "driver", "python", "date"):
            assert key in env, key
        assert env["source"]["kernels_ops_sha256"]
        assert data["markdown"] in md and data["markdown"].startswith(f"## {stage}.")


@pytest.mark.slow
def test_dry_run_checks_every_kernel_and_dtype_against_float64(dry_run):
    rows = _load(dry_run[0], 1)["rows"]
    assert {r["kernel"] for r in rows} == KERNELS
    assert all(r["passed"] and r["tol_ratio"] <= 1 for r in rows), [r for r in rows if not r["passed"]]
    assert {r["dtype"] for r in rows if r["kernel"] == "encoder_topk"} == {"bf16", "fp16", "tf32", "fp32"}
    for kernel in ("sparse_decode", "sparse_value_grad", "segment_reduce"):
        assert {r["dtype"] for r in rows if r["kernel"] == kernel} == {"bf16", "fp16", "fp32"}
    assert all(r["deterministic"] for r in rows if r["kernel"] == "segment_reduce")
    assert {r["config"] for r in rows if r["kernel"] == "SAE forward + backward" and r["dtype"] == "fp32"} == {
        "relu", "jumprelu", "topk k 2", "batchtopk k 2"}


@pytest.mark.slow
def test_dry_run_measures_the_targets_the_sweep_and_the_capacity(dry_run):
    out = dry_run[0]
    targets = _load(out, 2)["info"]["targets"]
    assert [t["limit"] for t in targets[:2]] == [1.5, 1.3]
    assert all(t["ratio"] > 0 and isinstance(t["met"], bool) for t in targets[:2])
    rows = {r["label"]: r for r in _load(out, 2)["rows"]}
    assert rows["encoder GEMM x @ W_enc^T (torch)"]["ms"] > 0
    assert rows["fastsae training step"]["x_gemm"] > 0 and rows["fastsae training step"]["gbps"] > 0

    sweep = _load(out, 3)
    measured = {(r["impl"], r["op"], r["d_sae"], r["k"]) for r in sweep["rows"] if r["status"] == "ok"}
    for d_sae in (20, 30):
        assert ("floor", "gemm", d_sae, None) in measured
        for k in (2, 4):
            for op in ("encoder", "step"):
                assert {("fastsae_triton", op, d_sae, k), ("naive", op, d_sae, k),
                        ("naive_compile", op, d_sae, k)} <= measured
    assert all(r["x_floor"] > 0 and r["tflops"] is not None for r in sweep["rows"] if r["impl"] != "floor")

    capacity = _load(out, 4)
    # the dry run's pretend device holds 30 latents: 16 fits, 32 does not, the bisection lands on 24
    assert [(r["d_sae"], r["status"]) for r in capacity["rows"]] == [(16, "ok"), (32, "oom"), (24, "ok")]
    info = capacity["info"]
    assert (info["measured_largest"], info["first_failing"], info["planned_largest"]) == (24, 32, 30)

    extra = _load(out, 5)
    assert {r["impl"] for r in extra["rows"]} == {"fastsae_triton", "naive"}
    assert all(r["status"] == "ok" for r in extra["rows"])


@pytest.mark.slow
def test_a_failing_stage_and_a_hanging_one_are_recorded_and_the_run_goes_on(tmp_path):
    """Stage 2 fails at once, stage 5 never ends: 2 is an error with its message, 5 is killed at its deadline,
    each still has its file and its line in the summary, and the run says so in its exit status."""
    proc, wall = _script(tmp_path, "--stages", "2,5", "--budgets", "2=10", "--budget", "13",
                         "--inject", "2=fail,5=hang", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert wall < 60
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {s: v["status"] for s, v in summary["stages"].items()} == {"2": "error", "5": "killed"}
    assert "injected failure" in _load(tmp_path, 2)["errors"][0]["error"]
    assert _load(tmp_path, 5)["jobs"][0]["state"] == "killed"
    assert "**error**" in (tmp_path / "summary.md").read_text()


def test_over_budget_work_is_skipped_and_listed(tmp_path):
    """A job whose deadline has passed measures nothing more and lists what it skipped."""
    import torch

    from bench.gpu_job import Ctx, Recorder
    from bench.gpu_stage_jobs import stage_kernels, stage_sweep, sweep_plan

    ctx = Ctx(torch.device("cpu"), dry=True, deadline=time.time() - 1)
    rec = Recorder(tmp_path / "sweep.json", ctx)
    stage_sweep(rec, ctx, [])
    assert not rec.data["rows"] and len(rec.data["skipped"]) == len(sweep_plan(dry=True))
    rec = Recorder(tmp_path / "kernels.json", ctx)
    stage_kernels(rec, ctx, ["topk-bf16", "adam-resample"])
    assert not rec.data["rows"]
    assert [s["what"].split(" from ")[0] for s in rec.data["skipped"]] == ["group topk-bf16", "group adam-resample"]
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert saved["skipped"] == rec.data["skipped"]


def test_stage_deadlines_are_cumulative_and_keep_the_later_stages_share():
    from bench.gpu_plan import BUDGETS, TOTAL_S, budgets_for

    deadlines = budgets_for([1, 2, 3, 4, 5], {}, TOTAL_S)
    assert deadlines[1] == BUDGETS[1] and deadlines[4] == sum(BUDGETS[s] for s in (1, 2, 3, 4))
    assert deadlines[5] == TOTAL_S and sum(BUDGETS[s] for s in (1, 2, 3, 4)) < TOTAL_S <= 8 * 60 - 20
    assert budgets_for([2, 5], {2: 3}, 6) == {2: 3, 5: 6}
    assert budgets_for([1, 2], {1: 100, 2: 100}, 150) == {1: 50, 2: 150}  # stage 2's share is kept
