"""A latent-sharded run of the command line, a rank killed, resumed on another grid or the same one.

    torchrun --nproc-per-node 2 -m fastsae train ... --shard-latents --checkpoint-every 2 --steps 6

is killed (tests/kill_at.py) mid-step or inside a checkpoint write, and its run directory resumed each
way a user would: the same command with --resume on 2 ranks, one process with the same flags or with
only `--out --resume`, and 4 ranks. Each must end where the uninterrupted 2-rank run ends: bit for bit on
the same grid (the same reductions in the same order; the resumed state is the checkpoint's, exactly);
on another grid within 1e-5 (fp32 rounding: the encoder GEMM and the decode's sums split another way,
as tests/train/test_distributed_train.py explains), the discrete choices (which latents fire) being the same.

Each torchrun costs ~10 s on 2 cores (three interpreters importing torch), so the sizes are tiny and each
kill is resumed in one process (cheap, in this one) as well as on a grid.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from spawn import free_port

from fastsae import SAE
from fastsae.cli import main

from helpers import KILL_AT

STEPS, EVERY = 6, 2
# 32 latents split 16/16 (or 8 each on 4 ranks); d_in 8; batches of 16 rows of a fixed array
FLAGS = ["--activation", "topk", "--k", "2", "--d-sae", "32", "--batch-size", "16", "--steps", str(STEPS),
         "--checkpoint-every", str(EVERY), "--auxk", "0.03125", "--no-progress"]


def torchrun(ranks: int, *args: str, kill: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node ranks -m fastsae args`; with kill (KILL_AT_* settings and "n"), through
    tests/kill_at.py, so that one rank dies at a chosen moment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTSAE_DIST_TIMEOUT": "60"}
    program = ["-m", "fastsae"]
    if kill is not None:
        env.update({k: v for k, v in kill.items() if k != "n"})
        program = [KILL_AT, str(kill["n"]), *program]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(free_port()), *program, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((512, 8)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run."""
    out = tmp_path_factory.mktemp("reference")
    ok(torchrun(2, "train", "--data", str(data), *FLAGS, "--out", str(out), "--shard-latents"))
    return out


def killed_run(data: Path, out: Path, kill: dict, latest: int) -> Path:
    """The 2-rank run killed as kill says; its newest complete checkpoint must be that of step latest."""
    done = torchrun(2, "train", "--data", str(data), *FLAGS, "--out", str(out), "--shard-latents", kill=kill)
    assert done.returncode != 0, "the kill should have stopped the job"
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{latest:08d}", done.stderr[-3000:]
    assert not (out / "sae").exists()
    return out


# Where a rank dies: (the kill_at settings, the newest checkpoint then).
KILLS = {
    # Rank 0 (the writer, holding the run's lock) as step 5's forward begins, rank 1 inside that step's
    # collectives: the checkpoint of step 4 is the newest.
    "mid_step": (dict(n=5, KILL_AT_RANK="0", KILL_AT_CALL="fastsae.train.sharded:ShardedSAE.forward"), 4),
    # Rank 1 before its 2nd commit: its shard of checkpoint 4 is on disk under a temporary name inside the
    # checkpoint being built, never published, while rank 0 waits for it at the barrier before the
    # manifest. The checkpoint of step 2 is the newest; the half-built one goes (rank 0 removes it as its
    # barrier fails, or, were it stopped first, the next writer does).
    "checkpoint_write": (dict(n=2, KILL_AT_RANK="1"), 2),
}


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory):
    """killed(name): the run directory of the 2-rank run killed as KILLS[name] says (each killed once, on
    first use, and copied by every test that resumes it)."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            kill, latest = KILLS[name]
            runs[name] = killed_run(data, tmp_path_factory.mktemp(name) / "run", kill, latest)
        return runs[name]

    return get


def copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def assert_ends_like(run: Path, reference: Path, exact: bool) -> None:
    """run's final SAE (and metrics) are the reference's: bit for bit when exact, else within 1e-5."""
    got, want = SAE.load(run / "sae"), SAE.load(reference / "sae")
    assert got.metadata == want.metadata
    for name, t in want.state_dict().items():
        if exact:
            assert torch.equal(got.state_dict()[name], t), name
        else:
            torch.testing.assert_close(got.state_dict()[name], t, atol=1e-5, rtol=1e-5, msg=name)
    # the resumed run logged the steps after its checkpoint again, once each
    metrics = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (run, reference)]
    assert [m["step"] for m in metrics[0]] == [m["step"] for m in metrics[1]]
    for mine, theirs in zip(*metrics, strict=True):
        for key in ("loss", "mse", "l0", "fvu", "auxk", "dead_fraction", "lr", "tokens"):
            assert mine[key] == (theirs[key] if exact or theirs[key] is None else pytest.approx(theirs[key], rel=1e-4))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000004", "step-00000006"]


@pytest.mark.parametrize("kill", list(KILLS))
def test_one_process_resumes_with_only_out_and_resume(killed, kill, reference, tmp_path):
    """`python -m fastsae train --out RUN --resume`: one process reads the sharded checkpoint whole."""
    run = killed(kill)
    one = copy(run, tmp_path / "one")
    assert main(["train", "--out", str(one), "--resume", "--no-progress"]) == 0
    assert_ends_like(one, reference, exact=False)


@pytest.mark.parametrize("kill", list(KILLS))
def test_one_process_resumes_with_the_original_flags(killed, kill, data, reference, tmp_path):
    """The original command's flags, --steps among them, in one process with --resume."""
    run = killed(kill)
    one = copy(run, tmp_path / "one")
    assert main(["train", "--data", str(data), *FLAGS, "--out", str(one), "--resume"]) == 0
    assert_ends_like(one, reference, exact=False)


def test_the_same_command_resumes_on_two_ranks_bit_for_bit(killed, data, reference, tmp_path):
    """The same torchrun command with --resume, after the kill mid-step: the same grid, so the same bits as
    never having stopped. (One kill for each grid: a torchrun costs ~10 s.)"""
    run = killed("mid_step")
    same = copy(run, tmp_path / "same")
    ok(torchrun(2, "train", "--data", str(data), *FLAGS, "--out", str(same), "--shard-latents", "--resume"))
    assert_ends_like(same, reference, exact=True)


def test_more_ranks_resume_resharded(killed, data, reference, tmp_path):
    """4 ranks, 4 latent shards, after the kill inside a checkpoint write, from the checkpoint of 2 shards:
    each rank reads its rows from the shards that hold them."""
    run = killed("checkpoint_write")
    more = copy(run, tmp_path / "more")
    ok(torchrun(4, "train", "--data", str(data), *FLAGS, "--out", str(more), "--shard-latents", "--resume"))
    assert_ends_like(more, reference, exact=False)
