"""Faults: SIGKILLs at chosen moments of a save and a harvest, concurrent writers, leftovers, file modes.

Each kill is repeatable: tests/kill_at.py kills the child just before its n-th commit (rename), so every
window between two commits of a write is tried, not whichever a timer happened to hit. The training
counterpart is tests/test_checkpoint.py::test_sigkill_during_training_resumes_cleanly.
"""

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsae import SAE, io
from fastsae.harvest import ActivationStore, StoreWriter, harvest

from conftest import make_sae
from helpers import cli_error

KILL_AT = str(Path(__file__).with_name("kill_at.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _kill_at(n: int, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, KILL_AT, str(n), "-c", code], env=ENV, capture_output=True, text=True)


def _same(a: SAE, b: SAE) -> bool:
    return a.cfg == b.cfg and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                                      b.state_dict().values(), strict=True))


def test_sigkill_during_sae_save_leaves_the_old_sae_or_the_new_one(tmp_path):
    """Saving over an SAE of another config (same shapes, so a mixed pair would load): each kill leaves
    exactly one of the two, never one's weights beside the other's cfg.json."""
    target, new_ref = tmp_path / "sae", tmp_path / "new"
    old, new = make_sae(7, 19, "relu", seed=0), make_sae(7, 19, "topk", k=3, seed=5)
    new.save(new_ref)
    code = f"from fastsae import SAE; SAE.load({str(new_ref)!r}).save({str(target)!r})"
    outcomes, leftovers = [], []
    for n in range(1, 10):
        old.save(target)
        proc = _kill_at(n, code)
        loaded = SAE.load(target)
        if proc.returncode == 0:
            assert _same(loaded, new)
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert _same(loaded, old) or _same(loaded, new), f"a kill before commit {n} left a mix"
        outcomes.append("old" if _same(loaded, old) else "new")
        leftovers.append(any(io.is_temporary(p.name) for p in tmp_path.iterdir()))  # the half-built copy
    assert outcomes == ["old"] * 3  # weights, cfg.json, then the swap: the old SAE until the swap
    assert all(leftovers)
    # each save removed the temporaries of the dead writers before it
    assert [p.name for p in tmp_path.iterdir() if io.is_temporary(p.name)] == []


HARVEST = """
import torch
from fastsae.harvest import harvest
from fastsae.model import random_causal_lm
model, _ = random_causal_lm()
windows = torch.randint(4, 40, (24, 16), generator=torch.Generator().manual_seed(0))
harvest(model, ["resid_post.1"], windows, {out!r}, batch_size=4, shard_rows=40, resume=True, progress=False,
        model_name="tiny")
"""


@pytest.mark.slow
def test_sigkill_during_harvest_resumes_to_the_same_store_and_cleans_up(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    exec(HARVEST.format(out=str(ref)), {})  # the uninterrupted reference, in this process
    # commits: the empty manifest, then (shard, manifest) per shard; each resumed child counts from 1
    for n in (3, 4, 2):  # a shard written but not committed; a manifest not replaced; a shard not renamed
        proc = _kill_at(n, HARVEST.format(out=str(out)))
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert any(io.is_temporary(p.name) for p in out.iterdir())  # what the last kill left half-done
    subprocess.run([sys.executable, "-c", HARVEST.format(out=str(out))], env=ENV, check=True, capture_output=True)
    a, b = ActivationStore(ref), ActivationStore(out)
    assert a.meta == b.meta  # same shards (by SHA-256), rows, norm sums, sequences
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no temporaries left
    b.verify()


def test_a_resumed_harvest_removes_the_shard_a_killed_writer_with_its_pid_left(tmp_path):
    """In a fresh container a resumed run often gets the pid of the run that was killed: the killed run's
    half-written shard (its temporary carries that pid) is still not this process's, and goes."""
    kw = dict(model="m", sites={"s": 4}, dtype=torch.float32, context_size=8, excluded_token_ids=[])
    StoreWriter(tmp_path, **kw).close()
    left = tmp_path / f".shard-00000.safetensors.{os.getpid()}-0123abcd4567cdef.tmp"
    left.write_bytes(b"half a shard")
    mine = tmp_path / io.temp_name("shard-00001.safetensors")
    mine.write_bytes(b"being written")
    StoreWriter(tmp_path, **kw, resume=True).close()
    assert not left.exists() and mine.exists()


def test_a_second_harvest_into_a_store_is_refused_naming_the_first(tmp_path):
    kw = dict(model="m", sites={"s": 4}, dtype=torch.float32, context_size=8, excluded_token_ids=[])
    with StoreWriter(tmp_path, **kw):
        second = subprocess.run([sys.executable, "-c", "import torch; from fastsae.harvest import StoreWriter; "
                                 f"StoreWriter({str(tmp_path)!r}, model='m', sites={{'s': 4}}, dtype=torch.float32, "
                                 "context_size=8, excluded_token_ids=[], resume=True)"],
                                env=ENV, capture_output=True, text=True)
    assert second.returncode == 1
    assert (f"DirectoryLockedError: {tmp_path} is being written by another process (pid {os.getpid()} on host "
            f"{socket.gethostname()}, harvest since") in second.stderr
    StoreWriter(tmp_path, **kw, resume=True).close()  # released: the next writer gets in


def test_harvest_gives_the_lock_back_when_it_fails(tmp_path):
    from fastsae.model import random_causal_lm

    model, _ = random_causal_lm()
    windows = torch.randint(4, 40, (4, 8), generator=torch.Generator().manual_seed(0))
    harvest(model, ["resid_post.1"], windows, tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        harvest(model, ["resid_post.1"], windows, tmp_path, progress=False)
    other = subprocess.run([sys.executable, "-c", f"from fastsae.io import DirectoryLock; "
                            f"DirectoryLock({str(tmp_path)!r}, 'check').acquire()"], env=ENV)
    assert other.returncode == 0


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_respect_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        make_sae(5, 9).save(tmp_path / "sae")
        io.write_json(tmp_path / "f.json", {"a": 1})
    finally:
        os.umask(previous)
    for path in (tmp_path / "sae", tmp_path / "sae" / "cfg.json", tmp_path / "sae" / "sae.safetensors",
                 tmp_path / "f.json"):
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, f"{path.name}: {oct(path.stat().st_mode & 0o777)}"


def test_the_faults_table_is_current():
    """tests/FAULTS.md names only tests that exist, and every test of the fault files is in it."""
    import ast
    import re

    here = Path(__file__).parent
    table = (here / "FAULTS.md").read_text()
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", table))
    defined = {}
    fault_files = ("test_bad_inputs.py", "test_integrity.py", "test_faults.py", "test_cli_errors.py")
    for file in {f for f, _ in named} | set(fault_files):
        tree = ast.parse((here / file).read_text())
        defined[file] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    assert [f"{f}::{t}" for f, t in sorted(named) if t not in defined[f]] == []
    unlisted = [f"{f}::{t}" for f in fault_files
                for t in sorted(defined[f]) if (f, t) not in named and t != "test_the_faults_table_is_current"]
    assert unlisted == []


def test_a_second_fastsae_train_into_a_run_directory_leaves_its_configuration_alone(tmp_path, capsys):

    (tmp_path / "run.json").write_text('{"mine": true}\n')
    holder = subprocess.Popen([sys.executable, "-c", "import time; from fastsae.io import DirectoryLock; "
                               f"DirectoryLock({str(tmp_path)!r}, 'fastsae train').acquire(); print('held', "
                               "flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = cli_error(capsys, ["train", "--out", str(tmp_path), "--steps", "2", "--batch-size", "8",
                                  "--no-progress"])
        assert re.search(rf"^fastsae train: .*pid {holder.pid} on host .*fastsae train", line), line
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "run.json").read_text() == '{"mine": true}\n'
