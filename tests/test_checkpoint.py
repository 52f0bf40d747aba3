"""Checkpoints: resume ends where an uninterrupted run ends; a SIGKILL at any moment loses nothing."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.toy import ToyDictionary
from fastsae.train import TrainConfig, Trainer
from fastsae.train.checkpoint import latest_checkpoint

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


def test_stale_temporaries_are_ignored(tmp_path):
    _run(tmp_path, "topk", 4, {}, stop_after=9)
    root = tmp_path / "checkpoints"
    (root / ".tmp-00000012-999").mkdir()
    (root / ".tmp-00000012-999" / "half-written").write_text("x")
    assert latest_checkpoint(tmp_path).name == "step-00000008"
    assert not (root / ".tmp-00000012-999").exists()
    (root / "latest").unlink()  # a missing pointer falls back to the newest complete directory
    assert latest_checkpoint(tmp_path).name == "step-00000008"


def _cli(out, *extra):
    return [sys.executable, "-m", "fastsae", "train", "--out", str(out), "--steps", "40", "--batch-size", "64",
            "--activation", "topk", "--k", "4", "--d-sae", "96", "--checkpoint-every", "1", "--no-progress", *extra]


@pytest.mark.slow
def test_sigkill_during_training_resumes_cleanly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(tmp_path / "ref"), check=True, env=env, capture_output=True)
    rng = random.Random(0)
    out = tmp_path / "killed"
    for _ in range(3):  # kill it several times, at random moments (often mid-checkpoint: one per step)
        proc = subprocess.Popen(_cli(out, "--resume"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while latest_checkpoint(out) is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_cli(out, "--resume"), check=True, env=env, capture_output=True)
    ref = SAE.load(tmp_path / "ref" / "sae")
    got = SAE.load(out / "sae")
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after SIGKILLs and resume"
