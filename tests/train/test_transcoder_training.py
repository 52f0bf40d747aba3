"""Training transcoders: the loader's aligned (x, y) pairs of two sites, the trainer on (x, y) batches, and
`fastsae train --kind transcoder --in-site … --out-site …` end to end on a store of a tiny model."""

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.harvest import ShuffledLoader
from fastsae.train import TrainConfig, train

from helpers import tiny_harvest

T = pytest.importorskip("transformers")
SITES = ["mlp_in.1", "mlp_out.1"]


def tiny_store(out):
    return tiny_harvest(out, SITES, num_layers=2)


def test_the_loader_serves_aligned_pairs_with_the_single_site_shuffle(tmp_path):
    store = tiny_store(tmp_path / "store")
    both = {s: torch.cat([store.load_shard(i, keys=(s,))[s] for i in range(len(store.shards))]) for s in SITES}
    pairs = ShuffledLoader(store, SITES[0], 16, seed=3, target_site=SITES[1], shards_in_memory=2, normalize=True)
    solo = ShuffledLoader(store, SITES[0], 16, seed=3, shards_in_memory=2, normalize=True)
    index = ShuffledLoader(store, SITES[0], 16, seed=3, shards_in_memory=2, with_index=True)
    served = 0
    for (x, y), x_solo, (_, rows) in zip(pairs, solo, index, strict=True):
        torch.testing.assert_close(x, x_solo, rtol=0, atol=0)  # the pair's x is the single-site batch
        torch.testing.assert_close(x, both[SITES[0]][rows] * store.norm_scale(SITES[0]))
        torch.testing.assert_close(y, both[SITES[1]][rows] * store.norm_scale(SITES[1]))  # same tokens
        served += x.shape[0]
    assert served == store.tokens
    with pytest.raises(ValueError, match="target_site must be a site of the store"):
        ShuffledLoader(store, SITES[0], 16, target_site="resid_post.0")


def test_the_trainer_trains_a_skip_transcoder_on_pairs_and_refuses_single_tensors():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(16, 16, generator=gen) / 4
    xs = [torch.randn(64, 16, generator=gen) for _ in range(40)]
    pairs = [(x, x @ W.T + torch.relu(x[:, :1])) for x in xs]  # a linear map plus a sparse part
    cfg = SAEConfig(d_in=16, d_sae=32, activation="topk", k=2, kind="skip_transcoder", apply_b_dec_to_input=False)
    sae = SAE(cfg, seed=0)
    tc = TrainConfig.flat(lr=1e-2, total_steps=40, b_dec_init="mean", log_every=1, progress=False,
                          auxk_coefficient=1 / 32)
    history = train(sae, pairs, tc).history
    assert history[-1]["fvu"] < 0.3 < history[0]["fvu"]  # fvu of y: the skip term learns the linear map
    plain = SAE(SAEConfig(**{**cfg.to_dict(), "kind": "transcoder"}), seed=0)
    assert train(plain, pairs, tc).history[-1]["fvu"] > 0.5  # 2 latents alone cannot carry a dense map
    assert sae.W_skip.abs().sum() > 0
    with pytest.raises(TypeError, match=r"\(x, y\) pairs for a skip_transcoder"):
        train(SAE(cfg), xs[:2], TrainConfig.flat(total_steps=2, progress=False))
    with pytest.raises(ValueError, match="without DeadLatentConfig.resample_every"):
        train(SAE(cfg), pairs, TrainConfig.flat(total_steps=2, progress=False, resample_every=1))


def test_cli_trains_a_transcoder_from_a_store_and_records_both_sites(tmp_path):
    from fastsae.cli import main

    store = tiny_store(tmp_path / "store")
    assert main(["train", "--data", str(tmp_path / "store"), "--kind", "transcoder", "--in-site", SITES[0],
                 "--out-site", SITES[1], "--activation", "topk", "--k", "4", "--d-sae", "64", "--steps", "4",
                 "--batch-size", "16", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    sae = SAE.load(tmp_path / "run" / "sae")
    assert sae.cfg.kind == "transcoder" and not sae.cfg.apply_b_dec_to_input
    assert sae.metadata["site"] == SITES[0] and sae.metadata["out_site"] == SITES[1]
    assert sae.metadata["input_scale_folded"] == pytest.approx(store.norm_scale(SITES[0]))
    assert sae.metadata["output_scale_folded"] == pytest.approx(store.norm_scale(SITES[1]))
    for extra, field, want in ((["--activation", "topk", "--k", "4", "--matryoshka-widths", "16"],
                                "matryoshka_widths", (16, 64)),
                               (["--activation", "jumprelu", "--jumprelu-sparsity", "tanh"],
                                "jumprelu_sparsity", "tanh")):
        out = tmp_path / field
        assert main(["train", "--data", str(tmp_path / "store"), "--site", SITES[0], "--d-sae", "64", "--steps", "2",
                     "--batch-size", "16", "--out", str(out), "--no-progress", *extra]) == 0
        assert getattr(SAE.load(out / "sae").cfg, field) == want
