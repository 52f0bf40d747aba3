"""The toy for transcoders and crosscoders (fastsae.toy.ToySites): one sparse code, a true dictionary per site.
A transcoder trained on its pairs finds the output site's dictionary, a crosscoder each site's, and both train
from the command line on it."""

import json

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.cli import main
from fastsae.toy import ToySites, mmcs
from fastsae.train import TrainConfig, train


def test_the_sites_share_one_code():
    toy = ToySites.random(3, pairs=False, d_in=8, n_features=20, seed=1)
    gen = torch.Generator().manual_seed(0)
    x = toy.sample(50, gen)
    codes = toy.sites[0].codes(50, torch.Generator().manual_seed(0))
    assert x.shape == (50, 24)
    for s in range(3):
        torch.testing.assert_close(x[:, 8 * s:8 * (s + 1)], codes @ toy.sites[s].features)
    x, y = ToySites.random(2, pairs=True, d_in=8, n_features=20, seed=1).sample(5, gen)
    assert x.shape == y.shape == (5, 8) and not torch.equal(x, y)
    with pytest.raises(ValueError, match="exactly 2 for pairs"):
        ToySites.random(3, pairs=True)


@pytest.mark.parametrize("kind", ["transcoder", "crosscoder"])
def test_the_true_dictionaries_are_recovered(kind):
    pairs = kind == "transcoder"
    toy = ToySites.random(2 if pairs else 3, pairs, d_in=32, n_features=128, active_per_sample=4.0, seed=0)
    extra = {"apply_b_dec_to_input": False} if pairs else {"n_sites": 3}
    sae = SAE(SAEConfig(d_in=32 if pairs else 96, d_sae=256, activation="topk", k=4, kind=kind, **extra), seed=0)
    train(sae, toy.batches(512, 400), TrainConfig.flat(lr=3e-3, total_steps=400, auxk_coefficient=1 / 32))
    W = sae.W_dec.detach()
    if pairs:  # the decoder writes the output site's features
        assert mmcs(toy.sites[1].features, W) > 0.95
    else:
        assert min(mmcs(toy.sites[s].features, W[:, 32 * s:32 * (s + 1)]) for s in range(3)) > 0.95


def test_both_train_on_the_toy_from_the_command_line(tmp_path, capsys):
    for kind, extra in (("skip_transcoder", []), ("crosscoder", ["--sites", "a", "b", "c"])):
        out = tmp_path / kind
        assert main(["train", "--kind", kind, *extra, "--steps", "3", "--d-sae", "32", "--activation", "topk",
                     "--k", "2", "--batch-size", "16", "--out", str(out), "--no-progress"]) == 0
        sae = SAE.load(out / "sae")
        assert sae.cfg.kind == kind
        meta = json.loads((out / "sae" / "cfg.json").read_text())
        assert ("toy:y" in json.dumps(meta)) == (kind != "crosscoder")
    assert sae.cfg.n_sites == 3 and sae.cfg.d_in == 3 * 64
    assert main(["train", "--kind", "transcoder", "--data", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "x")]) != 0
    assert "--out-site: a transcoder predicts another site" in capsys.readouterr().err
