"""Checkpoints: resume ends where an uninterrupted run ends; a SIGKILL at any moment loses nothing."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.io import CorruptFileError, DirectoryLockedError, is_temporary, temp_name
from fastsae.toy import ToyDictionary
from fastsae.train import TrainConfig, Trainer
from fastsae.train.checkpoint import complete_checkpoints, latest_checkpoint, verify_checkpoint, write_checkpoint

from helpers import KILL_AT

CASES = [
    ("topk", 4, dict(auxk_coefficient=1 / 32, resample_every=7)),
    ("relu", None, dict(resample_every=9)),
    ("batchtopk", 3, {}),
    ("topk", 4, dict(optimizer="fused", optimizer_state_dtype="bfloat16", resample_every=7)),
]


class Interrupted(Exception):
    pass


def _run(run_dir, activation, k, extra, stop_after=None, resume=False):
    torch.manual_seed(0)
    toy = ToyDictionary.random(d_in=12, n_features=40, active_per_sample=3.0, seed=0)
    sae = SAE(SAEConfig(12, 48, activation=activation, k=k, l1_coefficient=None if k else 0.2), seed=0)
    cfg = TrainConfig.flat(lr=3e-3, total_steps=30, checkpoint_every=4, dead_window_tokens=256, resample_pool=512,
                      progress=False, log_every=5, **extra)
    batches = toy.batches(64, 30)

    def stream():
        for i, x in enumerate(batches):
            if stop_after is not None and i == stop_after:
                raise Interrupted
            yield x

    trainer = Trainer(sae, cfg, run_dir)
    try:
        trainer.fit(stream(), resume=resume)
    except Interrupted:
        pass
    return sae, trainer


@pytest.mark.parametrize("activation,k,extra", CASES)
def test_resume_equals_uninterrupted(tmp_path, activation, k, extra):
    full, full_trainer = _run(tmp_path / "full", activation, k, extra)
    _run(tmp_path / "cut", activation, k, extra, stop_after=18)  # dies between checkpoints (last at 16)
    resumed, trainer = _run(tmp_path / "cut", activation, k, extra, resume=True)
    assert trainer.step_count == 30
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"

    def log(run):  # every logged metric but the throughput: no line lost, none duplicated
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]

    assert log("cut") == log("full")


def test_stale_temporaries_are_ignored_by_readers_and_removed_by_the_next_writer(tmp_path):
    _run(tmp_path, "topk", 4, {}, stop_after=9)
    root = tmp_path / "checkpoints"
    dead = [root / ".tmp-00000012-999", root / ".step-00000012.999-0a1b2c3d.tmp"]  # old and new naming
    for tmp in dead:
        tmp.mkdir()
        (tmp / "half-written").write_text("x")
    (root / ".latest.999-0a1b2c3d.tmp").write_text("step-000")
    (tmp_path / ".sae.999-0a1b2c3d.tmp").mkdir()
    mine = root / temp_name("step-00000012")  # a live writer's (this process, by its pid and its tag)
    mine.mkdir()
    assert latest_checkpoint(tmp_path).name == "step-00000008"
    assert all(p.exists() for p in dead)  # a reader deletes nothing: it may be looking at a live writer
    (root / "latest").unlink()  # a missing pointer falls back to the newest complete directory
    assert latest_checkpoint(tmp_path).name == "step-00000008"
    _run(tmp_path, "topk", 4, {}, stop_after=10, resume=True)  # the next writer cleans up, under its lock
    assert not any(p.exists() for p in dead) and not (root / ".latest.999-0a1b2c3d.tmp").exists()
    assert not (tmp_path / ".sae.999-0a1b2c3d.tmp").exists()
    assert mine.exists()


def test_a_reader_during_a_write_cannot_publish_an_incomplete_checkpoint(tmp_path):
    """latest_checkpoint() polled while a checkpoint is being written (as the SIGKILL test does) once deleted
    the writer's temporary directory; the writer's mkdir(parents=True) recreated it half-empty and published it."""
    sae = SAE(SAEConfig(6, 12), seed=0)

    def write(tmp):
        (tmp / "optimizer.json").write_text("{}")
        assert latest_checkpoint(tmp_path) is None  # a concurrent reader
        sae.save(tmp / "sae")

    final = write_checkpoint(tmp_path, 4, write)
    assert (final / "optimizer.json").is_file() and (final / "sae" / "cfg.json").is_file()
    verify_checkpoint(final)


def _flip_byte(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    extra = dict(auxk_coefficient=1 / 32, resample_every=7)
    full, _ = _run(tmp_path / "full", "topk", 4, extra)
    _run(tmp_path / "cut", "topk", 4, extra, stop_after=18)  # checkpoints at 12 and 16 kept
    root = tmp_path / "cut" / "checkpoints"
    assert [p.name for p in complete_checkpoints(tmp_path / "cut")] == ["step-00000012", "step-00000016"]
    _flip_byte(root / "step-00000016" / "optimizer.safetensors")  # one bit of the moments' data
    with pytest.raises(CorruptFileError, match="optimizer.safetensors: SHA-256"):
        verify_checkpoint(root / "step-00000016")
    with pytest.warns(UserWarning, match=r"from step-00000012.*step-00000016.*optimizer.safetensors"):
        resumed, trainer = _run(tmp_path / "cut", "topk", 4, extra, resume=True)
    assert trainer.step_count == 30
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resuming from the older checkpoint"


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _run(tmp_path, "topk", 4, {}, stop_after=9)
    for path in complete_checkpoints(tmp_path):
        _flip_byte(path / "sae" / "sae.safetensors")
    with pytest.raises(CorruptFileError, match="no intact checkpoint"):
        _run(tmp_path, "topk", 4, {}, resume=True)


def test_metrics_log_half_written_last_line_is_tolerated_a_bad_middle_line_named(tmp_path):
    _run(tmp_path, "topk", 4, {}, stop_after=18)
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines) + '\n{"step": 20, "loss": 0.')  # killed mid-line
    _, trainer = _run(tmp_path, "topk", 4, {}, resume=True)
    assert trainer.step_count == 30
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 30
    log.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(CorruptFileError, match=r"metrics.jsonl:2: not a JSON line"):
        _run(tmp_path, "topk", 4, {}, resume=True)


def test_resuming_with_another_optimizer_kind_is_refused(tmp_path):
    _run(tmp_path, "topk", 4, {}, stop_after=9)  # optimizer "auto" on CPU: torch's Adam
    with pytest.raises(ValueError, match=r"optimizer is 'torch'.*kind gives 'fused'.*OptimizerConfig\(kind='torch'\)"):
        _run(tmp_path, "topk", 4, dict(optimizer="fused"), resume=True)


@pytest.mark.parametrize("name,content,reason", [
    ("trainer.json", b'{"step": "12"}', "field 'step' must be an integer, got '12'"),
    ("trainer.json", b'{"step": 12}', "field 'tokens' is missing"),
    ("trainer.json", b"[1, 2]", "expected a JSON object, got a JSON array"),
    ("optimizer.json", b'{"param_groups": {}, "scalars": {}}', "field 'param_groups' must be an array"),
    ("trainer.safetensors", b"\x80\x04\x95", "pickle"),
])
def test_damaged_checkpoint_files_are_named(tmp_path, name, content, reason):
    _run(tmp_path, "topk", 4, {}, stop_after=9)
    for path in complete_checkpoints(tmp_path):
        (path / "checkpoint.json").unlink()  # as written before checksums: the loaders see the damage
        (path / name).write_bytes(content)
    with pytest.raises(CorruptFileError, match=re.escape(name) + ".*" + re.escape(reason)):
        _run(tmp_path, "topk", 4, {}, resume=True)


def test_a_second_writer_of_a_run_directory_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastsae.io import DirectoryLock; "
                               f"DirectoryLock({str(tmp_path)!r}, 'training').acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryLockedError, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
            _run(tmp_path, "topk", 4, {})
        assert not (tmp_path / "checkpoints").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    _run(tmp_path, "topk", 4, {}, stop_after=5)  # the kernel dropped the dead holder's lock


def _cli(out, *extra):
    return [sys.executable, "-m", "fastsae", "train", "--out", str(out), "--steps", "24", "--batch-size", "64",
            "--activation", "topk", "--k", "4", "--d-sae", "96", "--checkpoint-every", "1", "--no-progress", *extra]




@pytest.mark.slow
def test_sigkill_during_training_resumes_cleanly(tmp_path):
    """Killed at chosen commits (tests/kill_at.py), not at random moments: deterministic. A fresh run commits
    run.json, then per checkpoint (one per step here) the SAE's weights, cfg.json and directory, the optimizer
    and trainer files, checkpoint.json, the checkpoint directory, and `latest`; a resumed run also rewrites
    run.json and metrics.jsonl first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(tmp_path / "ref"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    # mid-SAE of checkpoint 2; before checkpoint 2 is published; before `latest` moves to it; mid checkpoint 3
    for n in (14, 11, 12, 25):
        proc = subprocess.run([sys.executable, KILL_AT, str(n), "-m", *_cli(out, "--resume")[2:]], env=env,
                              capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert latest_checkpoint(out) is not None
    subprocess.run(_cli(out, "--resume"), check=True, env=env, capture_output=True)
    ref = SAE.load(tmp_path / "ref" / "sae")
    got = SAE.load(out / "sae")
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after SIGKILLs and resume"
    assert [p for p in out.rglob("*") if is_temporary(p.name)] == []  # the killed runs' leftovers are gone
    for checkpoint in complete_checkpoints(out):
        verify_checkpoint(checkpoint)


def test_a_temporary_directory_deleted_under_the_writer_is_never_published(tmp_path):
    """Even if something else deletes the half-built checkpoint (as latest_checkpoint once did), the writer's
    mkdir(parents=True) re-creating it cannot publish the remains."""
    sae = SAE(SAEConfig(6, 12), seed=0)

    def write(tmp):
        (tmp / "optimizer.json").write_text("{}")
        shutil.rmtree(tmp)  # another process
        sae.save(tmp / "sae")

    with pytest.raises(RuntimeError, match="was deleted and re-created while .*step-00000004 was being written"):
        write_checkpoint(tmp_path, 4, write)
    assert complete_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
