"""`fastsae harvest` and `fastsae train` on a store, end to end on a tiny saved model."""

import json

import pytest

from fastsae import SAE
from fastsae.cli import main
from fastsae.harvest import ActivationStore

from helpers import tiny_causal_lm

pytest.importorskip("transformers")

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
       "must be in want of a wife.\n" * 30


@pytest.fixture
def corpus_and_model(tmp_path):
    tiny_causal_lm(tmp_path / "lm")
    (tmp_path / "book.txt").write_text(TEXT)
    return tmp_path


def test_harvest_then_train_on_the_store(corpus_and_model, capsys):
    d = corpus_and_model
    args = ["harvest", "--model", str(d / "lm"), "--corpus", str(d / "book.txt"), "--sites", "resid_post.0",
            "mlp_hidden.1", "--tokens", "1024", "--context-size", "32", "--dtype", "float32", "--out",
            str(d / "store"), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and str((d / "store").resolve()) in printed
    store = ActivationStore(d / "store")
    assert store.sites == {"resid_post.0": 32, "mlp_hidden.1": 64}
    assert store.tokens == 32 * 31  # 32 windows of 32, BOS dropped
    assert store.meta["source"]["corpus"] == str(d / "book.txt") and store.meta["excluded_token_ids"] == [0, 1, 2]
    assert main(args + ["--resume"]) == 0  # a finished harvest resumes to itself
    with pytest.raises(FileExistsError):
        main(args)
    with pytest.raises(SystemExit, match="--site"):
        main(["train", "--data", str(d / "store"), "--out", str(d / "run"), "--steps", "3", "--no-progress"])
    assert main(["train", "--data", str(d / "store"), "--site", "resid_post.0", "--activation", "topk", "--k", "4",
                 "--d-sae", "64", "--steps", "6", "--batch-size", "64", "--out", str(d / "run"),
                 "--no-progress"]) == 0
    sae = SAE.load(d / "run" / "sae")
    assert sae.metadata["site"] == "resid_post.0" and sae.metadata["model"] == str(d / "lm")
    assert sae.metadata["input_scale_folded"] == pytest.approx(store.norm_scale("resid_post.0"))
    run = json.loads((d / "run" / "run.json").read_text())
    assert run["data"]["normalize"] is True
