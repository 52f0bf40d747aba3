"""`fastsae train --kl`, `--resample anthropic` and `--tied --no-b-dec`, end to end through the command line."""

import json
import math

import pytest
import torch

from fastsae import SAE
from fastsae.cli import main

from helpers import cli_error, tiny_causal_lm

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
       "must be in want of a wife.\n" * 30


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_kl_training_on_a_store_counts_no_bos_position(tmp_path, capsys):
    pytest.importorskip("transformers")
    tiny_causal_lm(tmp_path / "lm")
    (tmp_path / "book.txt").write_text(TEXT)
    assert main(["harvest", "--model", str(tmp_path / "lm"), "--corpus", str(tmp_path / "book.txt"), "--sites",
                 "resid_post.0", "--tokens", "512", "--context-size", "32", "--dtype", "float32", "--out",
                 str(tmp_path / "store"), "--no-progress", "--device", "cpu"]) == 0
    run = tmp_path / "kl"
    assert main(["train", "--data", str(tmp_path / "store"), "--activation", "topk", "--k", "4", "--d-sae", "64",
                 "--steps", "3", "--batch-size", "64", "--kl", "0.5", "--out", str(run), "--no-progress"]) == 0
    (last,) = _metrics(run)  # logged at the last step
    assert math.isfinite(last["kl"]) and last["kl"] > 0
    assert last["loss"] == pytest.approx(last["mse"] + 0.5 * last["kl"], rel=1e-5)
    # 64 rows a batch: two windows of 32, each opened by BOS, which is neither trained on nor counted
    assert last["tokens"] == 3 * 2 * 31
    settings = json.loads((run / "run.json").read_text())
    assert settings["train"]["kl_coefficient"] == 0.5
    sae = SAE.load(run / "sae")  # folded to take raw activations, as an MSE run on the store is
    assert sae.metadata["input_scale_folded"] > 0 and sae.metadata["site"] == "resid_post.0"
    assert "--kl" in cli_error(capsys, ["train", "--data", "toy", "--kl", "1", "--steps", "2", "--out",
                                        str(tmp_path / "toy"), "--no-progress"])


def test_resample_anthropic_scales_to_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "toy", "--activation", "relu", "--l1", "0.3", "--d-sae", "96", "--steps", "10",
                 "--batch-size", "64", "--resample", "anthropic", "--out", str(run), "--no-progress"]) == 0
    dead = json.loads((run / "run.json").read_text())["train"]["dead_latents"]
    assert dead["resample_at"] == [2, 4, 6, 8] and dead["window_tokens"] == 64 and dead["resample_every"] is None
    assert [m["step"] for m in _metrics(run) if "resampled" in m] == [2, 4, 6, 8]
    assert "not both" in cli_error(capsys, ["train", "--data", "toy", "--resample", "anthropic", "--resample-every",
                                            "5", "--out", str(tmp_path / "x"), "--no-progress"])


def test_tied_without_b_dec(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "toy", "--activation", "relu", "--d-sae", "96", "--steps", "5", "--batch-size",
                 "64", "--tied", "--no-b-dec", "--out", str(run), "--no-progress"]) == 0
    sae = SAE.load(run / "sae")
    assert sae.cfg.tied and not sae.cfg.apply_b_dec_to_input and torch.equal(sae.b_dec, torch.zeros(sae.cfg.d_in))
    assert json.loads((run / "run.json").read_text())["train"]["b_dec_init"] == "none"
    assert "--b-dec-init" in cli_error(capsys, ["train", "--data", "toy", "--no-b-dec", "--b-dec-init", "mean",
                                                "--out", str(tmp_path / "x"), "--no-progress"])
