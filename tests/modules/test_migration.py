"""Runs saved before the configs were split by concern (format 1, tests/data/v1, written by that code)
stay readable, and a resumed one ends where the old code ended (to float rounding: the CPU step's sums have
since changed order, fused Adam and per-latent segment sums, which moves weights by ~1e-8; a setting lost
in the migration moves them by ~lr = 4e-4 per step)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from fastsae import SAE
from fastsae.cli import main
from fastsae.harvest import ActivationStore, harvested_windows
from fastsae.pipeline import read_run, settings_from
from fastsae.train import TrainConfig

V1 = Path(__file__).resolve().parents[1] / "data" / "v1"


def test_an_old_run_resumes_to_the_old_codes_result(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(V1 / "run-toy", run)
    assert "format_version" not in json.loads((run / "run.json").read_text())
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    expected, resumed = SAE.load(V1 / "run-toy-final-sae"), SAE.load(run / "sae")
    assert resumed.cfg == expected.cfg
    for name, t in expected.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], t, rtol=0, atol=1e-6, msg=name)
    saved = json.loads((run / "run.json").read_text())  # rewritten in the new format, same settings
    assert saved["format_version"] == 2 and saved["train"]["dead_latents"]["resample_every"] == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_an_old_run_config_migrates_by_concern():
    settings = read_run(V1 / "run-store.json")
    train = settings.train
    assert train == TrainConfig.flat(total_steps=4, checkpoint_every=2)
    assert train.optimizer.betas == (0.9, 0.999) and train.dead_latents.window_tokens == 1_000_000
    assert settings.data.source == "/tmp/h11-fix/store" and settings.data.site == "resid_post.0"
    assert settings.data.normalize is True and settings.data.batch_size == 8
    assert settings.sae["d_in"] == 32 and settings.sae["activation"] == "topk"


def test_an_old_checkpoints_trainer_config_migrates():
    meta = json.loads((V1 / "run-toy" / "checkpoints" / "step-00000002" / "trainer.json").read_text())
    assert "format_version" not in meta
    cfg = TrainConfig.from_dict(meta["config"], version=meta.get("format_version", 1))
    assert cfg.dead_latents.auxk_coefficient == 0.03125 and cfg.checkpoints.every == 2
    assert cfg.logging.progress is False


def test_an_old_store_records_its_windows_by_sequences_done(tmp_path):
    shutil.copy(V1 / "store-manifest.json", tmp_path / "manifest.json")
    store = ActivationStore(tmp_path)
    assert "windows" not in store.meta["source"]
    record = harvested_windows(store)
    assert record == {"corpus": "english-classics", "text_field": "text", "context_size": 32, "seed": 0,
                      "ranges": [[0, 64]]}


def test_a_config_file_takes_flat_or_nested_train_settings(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"train": {"lr": 1e-3, "resample_every": 5}, "data": {"batch_size": 16}}))
    settings = settings_from(flat, train={"lr": 2e-3}, data={"seed": 3})
    assert settings.train.optimizer.lr == 2e-3 and settings.train.dead_latents.resample_every == 5
    assert settings.train.schedule.total_steps == 2000  # fastsae train's default length
    assert settings.data.batch_size == 16 and settings.data.seed == 3 and settings.data.source == "toy"
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"format_version": 2, "train": TrainConfig.flat(lr=1e-3, total_steps=7).to_dict()}))
    assert settings_from(nested).train == TrainConfig.flat(lr=1e-3, total_steps=7)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": {"batch": 16}}))
    with pytest.raises(ValueError, match=r"bad\.json.*DataConfig got unknown fields \['batch'\]"):
        settings_from(bad)
