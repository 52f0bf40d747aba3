"""`fastsae features` and `fastsae browse` end to end on a tiny saved model."""

import pytest

from fastsae.analysis.features.feature_pass import FeatureCache
from fastsae.cli import main

from helpers import tiny_causal_lm

pytest.importorskip("transformers")

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
       "must be in want of a wife.\n" * 30


def test_features_then_browse_on_the_sae_store(tmp_path, capsys):
    tiny_causal_lm(tmp_path / "lm")
    (tmp_path / "book.txt").write_text(TEXT)
    assert main(["harvest", "--model", str(tmp_path / "lm"), "--corpus", str(tmp_path / "book.txt"), "--sites",
                 "resid_post.1", "--tokens", "1024", "--context-size", "32", "--dtype", "float32", "--out",
                 str(tmp_path / "store"), "--no-progress"]) == 0
    assert main(["train", "--data", str(tmp_path / "store"), "--activation", "topk", "--k", "4", "--d-sae", "48",
                 "--steps", "4", "--batch-size", "64", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    capsys.readouterr()
    args = ["features", "--sae", str(tmp_path / "run" / "sae"), "--top", "5", "--effects", "3", "--out",
            str(tmp_path / "features"), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    assert "feature cache of 48 latents over 992 tokens" in capsys.readouterr().out
    cache = FeatureCache.load(tmp_path / "features")
    assert cache.meta["source"]["kind"] == "store" and cache.meta["meta"]["site"] == "resid_post.1"
    examples = [ex for j in range(48) for ex in cache.top(j)]
    assert all("".join(ex.tokens).removeprefix("<bos>") in TEXT for ex in examples)  # decoded, in order
    assert any(ex.tokens[0] == "<bos>" for ex in examples if ex.start == 0)  # BOS, from the rebuilt windows
    effects = (tmp_path / "features" / "effects.json").read_text()
    assert '"measured": [' in effects
    assert main(args) == 0  # a finished cache is reused
    assert main(["browse", "--cache", str(tmp_path / "features"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    index = tmp_path / "features" / "browser" / "index.html"
    assert f"feature browser: {index.resolve()}" in printed and "| latent | one-token score |" in printed
    assert (tmp_path / "features" / "browser" / "data" / "shard-00000.js").is_file()
    assert main(["features", "--sae", str(tmp_path / "run" / "sae"), "--effects", "some", "--out",
                 str(tmp_path / "f2")]) == 2
    assert capsys.readouterr().err == "fastsae features: --effects must be a count or 'all', got 'some'\n"
