"""fastsae train's JumpReLU flags: a jumprelu trained from flags trains θ by default (a config file without the
field stays the frozen-θ "l1" it was written as), and θ's start and bandwidth reach the SAE."""

import json

from fastsae import SAE
from fastsae.cli import main


def _train(tmp_path, name, *flags):
    out = tmp_path / name
    assert main(["train", "--activation", "jumprelu", "--steps", "2", "--d-sae", "32", "--batch-size", "16",
                 "--out", str(out), "--no-progress", *flags]) == 0
    return SAE.load(out / "sae").cfg


def test_jumprelu_from_flags_trains_theta_and_takes_its_start_and_bandwidth(tmp_path):
    assert _train(tmp_path, "default").jumprelu_sparsity == "step"
    cfg = _train(tmp_path, "set", "--jumprelu-threshold", "0.5", "--jumprelu-bandwidth", "0.01")
    assert (cfg.jumprelu_threshold, cfg.jumprelu_bandwidth) == (0.5, 0.01)
    old = tmp_path / "old.json"  # a config file from before θ trained
    old.write_text(json.dumps({"sae": {"d_in": 64, "d_sae": 32, "activation": "jumprelu"}}))
    assert _train(tmp_path, "old", "--config", str(old)).jumprelu_sparsity == "l1"


def test_a_bad_bandwidth_names_its_flag(tmp_path, capsys):
    assert main(["train", "--activation", "jumprelu", "--jumprelu-bandwidth", "-1", "--out", str(tmp_path)]) != 0
    assert capsys.readouterr().err.startswith("fastsae train: --jumprelu-bandwidth: SAEConfig.jumprelu_bandwidth")


def test_the_dead_window_reaches_the_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--activation", "topk", "--k", "4", "--auxk", "0.03", "--dead-window", "4096",
                 "--steps", "2", "--d-sae", "32", "--batch-size", "16", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "run.json").read_text())["train"]["dead_latents"]["window_tokens"] == 4096
