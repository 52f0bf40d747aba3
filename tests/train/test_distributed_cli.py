"""`torchrun --nproc-per-node 2 -m fastsae harvest|train`: the CLI finds the torchrun job by itself."""

import os
import subprocess
import sys

import pytest
import torch
from spawn import free_port

from fastsae import SAE
from fastsae.cli import main
from fastsae.harvest import ActivationStore
from fastsae.harvest.parallel import vectors_by_position

from helpers import tiny_causal_lm

pytest.importorskip("transformers")
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
       "must be in want of a wife.\n" * 30


def torchrun(*args: str, timeout: float = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTSAE_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "fastsae", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_torchrun_harvest_then_latent_sharded_train(tmp_path):
    tiny_causal_lm(tmp_path / "lm")
    (tmp_path / "book.txt").write_text(TEXT)
    harvest = ["harvest", "--model", str(tmp_path / "lm"), "--corpus", str(tmp_path / "book.txt"), "--sites",
               "resid_post.0", "--tokens", "1024", "--context-size", "32", "--dtype", "float32", "--no-progress",
               "--device", "cpu"]
    torchrun(*harvest, "--out", str(tmp_path / "two"))
    assert main(harvest + ["--out", str(tmp_path / "one")]) == 0
    two = vectors_by_position(ActivationStore(tmp_path / "two"))
    one = vectors_by_position(ActivationStore(tmp_path / "one"))
    assert sorted(two) == sorted(one)  # the same (window, position) pairs, and vectors
    torch.testing.assert_close(torch.stack([two[k] for k in sorted(one)]), torch.stack([one[k] for k in sorted(one)]))

    train = ["train", "--data", str(tmp_path / "two"), "--activation", "topk", "--k", "4", "--d-sae", "64",
             "--steps", "6", "--batch-size", "64", "--checkpoint-every", "3", "--auxk", "0.03125", "--no-progress"]
    torchrun(*train, "--out", str(tmp_path / "sharded"), "--shard-latents")
    assert main(train + ["--out", str(tmp_path / "single")]) == 0
    sharded, single = SAE.load(tmp_path / "sharded" / "sae"), SAE.load(tmp_path / "single" / "sae")
    assert sharded.metadata == single.metadata
    for name, t in single.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], t, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "sharded" / "sae-sharded" / "manifest.json").is_file()
    assert (tmp_path / "sharded" / "metrics.jsonl").read_text() .count("\n") == \
        (tmp_path / "single" / "metrics.jsonl").read_text().count("\n")
