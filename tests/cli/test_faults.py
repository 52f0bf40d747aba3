"""Faults: SIGKILLs at chosen moments of a save and a harvest, a full disk (injected, and a real tmpfs), concurrent
writers (other processes, other threads), leftovers, file modes.

Each kill is repeatable: tests/kill_at.py kills the child just before its n-th commit (rename), so every
window between two commits of a write is tried, not whichever a timer happened to hit. The training
counterpart is tests/train/test_checkpoint.py::test_sigkill_during_training_resumes_cleanly.
"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fastsae import SAE, SAEConfig, io
from fastsae.harvest import ActivationStore, StoreWriter, harvest

from conftest import make_sae
from helpers import KILL_AT, cli_error

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

    from helpers import TESTS

    table = (TESTS / "FAULTS.md").read_text()
    files = {p.name: p for p in TESTS.rglob("test_*.py")}
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", table))
    defined = {}
    fault_files = ("test_bad_inputs.py", "test_integrity.py", "test_faults.py", "test_cli_errors.py")
    for file in {f for f, _ in named} | set(fault_files):
        tree = ast.parse(files[file].read_text())
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


# ---- a full disk ----------------------------------------------------------------------------------------

# What safetensors raises when the disk fills under save_file (0.8, on a tmpfs that is full).
SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"


def _full_after(monkeypatch, good: int = 0) -> None:
    """safetensors.torch.save_file fails as it does on a full disk after `good` calls: half a file, then its
    SafetensorError."""
    import safetensors
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) <= good:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 100)
        raise safetensors.SafetensorError(SAFETENSORS_ENOSPC)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _json_full(monkeypatch) -> None:
    """json.dump (io.write_json) fails as a file write does on a full disk, after half its text."""
    import json

    def dump(obj, f, **kwargs):
        f.write(json.dumps(obj)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", dump)


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if io.is_temporary(p.name))


@pytest.fixture
def small_disk(tmp_path):
    """mount(kib) -> a fresh tmpfs of that size: a disk that really fills. Skipped where this process may not
    mount one (not root, no CAP_SYS_ADMIN)."""
    mounted = []

    def mount(kib: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)],
                                  capture_output=True, text=True)
        except OSError as err:
            pytest.skip(f"cannot mount a tmpfs here: {err}")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("fails", ["sae.safetensors", "cfg.json"])
def test_a_full_disk_under_sae_save_keeps_the_old_sae_and_names_the_file(tmp_path, monkeypatch, fails):
    old = make_sae(7, 19, "relu", seed=0)
    old.save(tmp_path / "sae")
    (_full_after if fails == "sae.safetensors" else _json_full)(monkeypatch)
    with pytest.raises(OSError) as raised:
        make_sae(7, 19, "topk", k=3, seed=5).save(tmp_path / "sae")
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value) == f"no space left on device writing {tmp_path / 'sae' / fails}"
    monkeypatch.undo()
    assert _same(SAE.load(tmp_path / "sae"), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # nothing half-written beside it


def test_sae_save_onto_a_full_tmpfs_keeps_the_old_sae(small_disk):
    disk = small_disk(64)
    old = make_sae(4, 8)
    old.save(disk / "sae")
    with pytest.raises(OSError) as raised:
        make_sae(64, 512).save(disk / "sae")  # 256 KiB of weights
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value) == f"no space left on device writing {disk / 'sae' / 'sae.safetensors'}"
    assert _same(SAE.load(disk / "sae"), old)
    assert sorted(str(p.relative_to(disk)) for p in disk.rglob("*")) == ["sae", "sae/cfg.json", "sae/sae.safetensors"]


def _train_argv(out: Path) -> list[str]:
    return ["train", "--out", str(out), "--steps", "6", "--batch-size", "16", "--d-sae", "256", "--activation",
            "topk", "--k", "4", "--checkpoint-every", "2", "--no-progress"]


def test_fastsae_train_on_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    _full_after(monkeypatch, good=3)  # the first checkpoint (SAE, optimizer, trainer state), not the second
    line = cli_error(capsys, _train_argv(tmp_path / "run"))
    step2 = tmp_path / "run" / "checkpoints" / "step-00000004" / "sae" / "sae.safetensors"
    assert line == f"fastsae train: no space left on device writing {step2}"
    from fastsae.train.checkpoint import latest_checkpoint, verify_checkpoint

    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"  # the one before: intact, still latest
    verify_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002")
    assert _leftovers(tmp_path) == []


def test_fastsae_train_that_fills_a_tmpfs_is_one_line_naming_the_file(small_disk, capsys):
    disk = small_disk(192)  # run.json and part of the first checkpoint (SAE 128 KiB, Adam state 256 KiB)
    line = cli_error(capsys, _train_argv(disk / "run"))
    assert re.fullmatch(rf"fastsae train: no space left on device writing {re.escape(str(disk))}/run/\S+", line), line
    assert _leftovers(disk) == []
    assert (disk / "run" / "run.json").is_file()


def test_a_full_disk_mid_harvest_keeps_the_committed_shards_and_resumes(tmp_path, monkeypatch):
    from fastsae.model import random_causal_lm

    model, _ = random_causal_lm()
    windows = torch.randint(4, 40, (24, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(batch_size=4, shard_rows=40, progress=False, model_name="tiny")
    ref = harvest(model, ["resid_post.1"], windows, tmp_path / "ref", **kw)
    _full_after(monkeypatch, good=1)
    with pytest.raises(OSError) as raised:
        harvest(model, ["resid_post.1"], windows, tmp_path / "full", **kw)
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value) == f"no space left on device writing {tmp_path / 'full' / 'shard-00001.safetensors'}"
    assert len(ActivationStore(tmp_path / "full").shards) == 1  # the committed shard, intact
    ActivationStore(tmp_path / "full").verify()
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()  # space freed: the harvest resumes where it stopped
    resumed = harvest(model, ["resid_post.1"], windows, tmp_path / "full", resume=True, **kw)
    assert resumed.meta == ref.meta


def test_a_harvest_that_fills_a_tmpfs_leaves_a_store_that_reads(small_disk):
    from fastsae.model import random_causal_lm

    disk = small_disk(64)
    model, _ = random_causal_lm()
    windows = torch.randint(4, 40, (64, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(OSError) as raised:
        harvest(model, ["resid_post.1"], windows, disk / "store", batch_size=4, shard_rows=64, progress=False,
                dtype=torch.float32)
    assert raised.value.errno == errno.ENOSPC
    assert re.fullmatch(rf"no space left on device writing {re.escape(str(disk))}/store/"
                        r"(shard-\d{5}\.safetensors|manifest\.json)", str(raised.value)), str(raised.value)
    ActivationStore(disk / "store").verify()  # every committed shard reads back
    assert _leftovers(disk) == []


def test_metrics_on_a_full_tmpfs_end_in_a_whole_line(small_disk):
    from fastsae.toy import ToyDictionary
    from fastsae.train import TrainConfig, Trainer

    run = small_disk(8) / "run"  # a page for the lock's holder, one for metrics.jsonl
    toy = ToyDictionary.random(d_in=12, n_features=40, seed=0)
    cfg = TrainConfig.flat(lr=1e-3, total_steps=200, log_every=1, progress=False)
    with pytest.raises(OSError) as raised:
        Trainer(SAE(SAEConfig(12, 24, activation="topk", k=3), seed=0), cfg, run).fit(toy.batches(16, 200))
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value) == f"no space left on device writing {run / 'metrics.jsonl'}"
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(line)["step"] for line in text.splitlines()][:2] == [1, 2]


def test_a_metrics_line_cut_short_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    log = io.AppendLog(tmp_path / "metrics.jsonl")
    log.write('{"step": 1}\n')
    real = os.write

    def write(fd, data):  # the disk fills after 5 bytes of the next line
        if fd != log._fd:
            return real(fd, data)
        if len(data) > 5:
            return real(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError, match=re.escape(f"no space left on device writing {tmp_path / 'metrics.jsonl'}")):
        log.write('{"step": 2, "loss": 0.5}\n')
    monkeypatch.undo()
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("raised", [
    lambda: __import__("safetensors").SafetensorError(SAFETENSORS_ENOSPC),
    lambda: OSError(errno.ENOSPC, "No space left on device", "/data/x.png"),
])
def test_a_full_disk_anywhere_is_one_line_never_an_unexpected_error(tmp_path, capsys, monkeypatch, raised):
    """A writer outside fastsae.io (a plot, a third-party library) that meets a full disk: still one line."""
    import fastsae.demo

    def demo(*args, **kwargs):
        raise raised()

    monkeypatch.setattr(fastsae.demo, "run_recovery", demo)
    line = cli_error(capsys, ["demo", "--out", str(tmp_path)])
    assert line in ("fastsae demo: no space left on device while writing",
                    "fastsae demo: no space left on device writing /data/x.png"), line


# ---- one writer per directory, within a process too ------------------------------------------------------


def test_a_second_trainer_in_another_thread_is_refused_and_nested_use_still_works(tmp_path):
    from fastsae.toy import ToyDictionary
    from fastsae.train import TrainConfig, Trainer

    toy = ToyDictionary.random(d_in=12, n_features=40, seed=0)
    cfg = TrainConfig.flat(lr=1e-3, total_steps=4, checkpoint_every=2, progress=False)
    started, go_on, failures = threading.Event(), threading.Event(), []

    def slow_batches():
        for x in toy.batches(16, 4):
            started.set()
            go_on.wait(60)
            yield x

    def first():
        try:
            Trainer(SAE(SAEConfig(12, 24, activation="topk", k=3), seed=0), cfg, tmp_path).fit(slow_batches())
        except BaseException as err:  # noqa: BLE001 - reported by the test
            failures.append(err)

    writer = threading.Thread(target=first, name="first-trainer")
    writer.start()
    try:
        assert started.wait(60)
        second = SAE(SAEConfig(12, 24, activation="topk", k=3), seed=1)
        before = {k: v.clone() for k, v in second.state_dict().items()}
        with pytest.raises(io.DirectoryLockedError, match=re.escape(f"{tmp_path} is being written by another thread "
                                                                    "of this process (thread 'first-trainer', "
                                                                    "training since")):
            Trainer(second, cfg, tmp_path).fit(toy.batches(16, 4))
        assert all(torch.equal(v, second.state_dict()[k]) for k, v in before.items())  # not one step taken
    finally:
        go_on.set()
        writer.join(60)
    assert failures == [] and (tmp_path / "checkpoints" / "step-00000004").is_dir()
    # one thread taking the lock again, as the pipeline does around Trainer.fit: allowed
    with io.DirectoryLock(tmp_path / "nested", "fastsae train"):
        Trainer(SAE(SAEConfig(12, 24, activation="topk", k=3), seed=0), cfg, tmp_path / "nested").fit(
            toy.batches(16, 4))
    assert (tmp_path / "nested" / "checkpoints" / "step-00000004").is_dir()
