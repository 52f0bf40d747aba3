"""fastsae patch / circuit / steer end to end on tiny random models saved to disk."""

import json

import pytest

from fastsae.analysis.features.activation_chunks import ModelSource
from fastsae.analysis.features.feature_pass import FeatureConfig, collect_features
from fastsae.analysis.interventions import ioi
from fastsae.cli import main
from fastsae.harvest import token_windows
from fastsae.model import capture

from conftest import make_sae
from helpers import tiny_causal_lm, word_level_lm

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def _save_sae(path, site, seed=0):
    sae = make_sae(32, 40, "topk", k=5, seed=seed)
    sae.metadata["site"] = site
    sae.save(path)
    return sae


def test_fastsae_patch_writes_the_curves_and_their_plot(tmp_path, capsys):
    model, tok = word_level_lm(ioi.vocabulary(), num_layers=2)
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    _save_sae(tmp_path / "sae0", "resid_post.0")
    _save_sae(tmp_path / "sae1", "resid_post.1", seed=1)
    assert main(["patch", "--model", str(tmp_path / "lm"), "--sae", str(tmp_path / "sae1"), str(tmp_path / "sae0"),
                 "--prompts", "6", "--max-m", "3", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "patch.json").read_text())
    assert list(report["results"]) == ["resid_post.0", "resid_post.1"]  # a layer sweep, lowest first
    assert set(report["results"]["resid_post.0"]["curves"]) == {"sae", "pca", "neurons"}
    assert (tmp_path / "out" / "patch.png").stat().st_size > 1000
    assert "| resid_post.1 | sae |" in capsys.readouterr().out
    first = (tmp_path / "out" / "patch.json").read_text()
    assert main(["patch", "--model", str(tmp_path / "lm"), "--sae", str(tmp_path / "sae1"), str(tmp_path / "sae0"),
                 "--prompts", "6", "--max-m", "3", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "patch.json").read_text() == first  # resumed: every site was there already
    # --corpus: the baselines fitted on general-corpus activations, the prompt-fitted PCA kept as a labelled row
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(ioi.vocabulary()[(i * 7) % len(ioi.vocabulary())] for i in range(400)))
    assert main(["patch", "--model", str(tmp_path / "lm"), "--sae", str(tmp_path / "sae0"), "--prompts", "6",
                 "--max-m", "3", "--corpus", str(corpus), "--fit-tokens", "128", "--context-size", "16",
                 "--out", str(tmp_path / "corpus")]) == 0
    result = json.loads((tmp_path / "corpus" / "patch.json").read_text())["results"]["resid_post.0"]
    assert result["baselines_fitted_on"] == "corpus (120 activations)"  # 8 windows of 16, BOS left out
    assert set(result["curves"]) == {"sae", "pca", "neurons", "pca_prompts"}
    prompts_pca = json.loads(first)["results"]["resid_post.0"]["curves"]["pca"]["fraction"]
    assert result["curves"]["pca_prompts"]["fraction"] == pytest.approx(prompts_pca)
    assert result["curves"]["pca"]["fraction"] != pytest.approx(prompts_pca)


def test_fastsae_circuit_and_steer(tmp_path, capsys):
    model, tok = tiny_causal_lm(tmp_path / "lm")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    _save_sae(tmp_path / "sae0", "resid_post.0")
    sae1 = _save_sae(tmp_path / "sae1", "resid_post.1", seed=1)
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    fires = sae1.encode(capture(model, ["resid_post.1"], input_ids=ids)["resid_post.1"]).indices[0, -1, 0]
    assert main(["circuit", "--model", str(tmp_path / "lm"), "--sae", str(tmp_path / "sae0"), str(tmp_path / "sae1"),
                 "--latent", str(int(fires)), "--corpus", str(corpus), "--tokens", "512", "--context-size", "16",
                 "--contexts", "4", "--depth", "1", "--keep", "2", "--candidates", "3",
                 "--browser", "resid_post.1=../b1", "--out", str(tmp_path / "circuit")]) == 0
    graph = json.loads((tmp_path / "circuit" / "circuit.json").read_text())
    assert graph["root"] == f"1_{int(fires)}" and len(graph["edges"]) == 2
    assert (tmp_path / "circuit" / "circuit.png").is_file() and (tmp_path / "circuit" / "circuit.svg").is_file()
    assert "circuit of 1_" in capsys.readouterr().out
    # contexts from a feature cache (fastsae features), the circuit written into its browser annotations
    windows = token_windows(tok, [corpus.read_text()], 16, 512)
    cfg = FeatureConfig(top=4, samples=2, quantiles=2, before=5, after=2, token_sample=8, random_contexts=2)
    collect_features(sae1, ModelSource(model, "resid_post.1", windows), tmp_path / "cache", cfg, progress=False)
    assert main(["circuit", "--model", str(tmp_path / "lm"), "--sae", str(tmp_path / "sae0"), str(tmp_path / "sae1"),
                 "--latent", str(int(fires)), "--feature-cache", str(tmp_path / "cache"), "--depth", "1",
                 "--keep", "1", "--candidates", "2", "--annotate", f"resid_post.1={tmp_path / 'cache'}",
                 "--out", str(tmp_path / "circuit2")]) == 0
    graph = json.loads((tmp_path / "circuit2" / "circuit.json").read_text())
    assert graph["contexts"] == 4 and len(graph["edges"]) == 1
    notes = json.loads((tmp_path / "cache" / "annotations" / "circuit.json").read_text())["features"]
    assert notes[str(int(fires))]["text"].startswith("In the circuit of 1_")
    capsys.readouterr()
    assert main(["steer", "--model", str(tmp_path / "lm"), "--sae", str(tmp_path / "sae0"), "--latent", "3",
                 "--prompt", "the cat", "--alphas", "0", "5", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "steer")]) == 0
    result = json.loads((tmp_path / "steer" / "steer.json").read_text())
    assert [r["alpha"] for r in result["rows"]] == [0.0, 5.0] and result["site"] == "resid_post.0"
    assert (tmp_path / "steer" / "steer.png").is_file()
    assert "α=5" in capsys.readouterr().out
