"""Training crosscoders: the loader's concatenation of several sites' rows (each scaled by its own norm_scale),
and `fastsae train --kind crosscoder --sites …` end to end on a store of a tiny model, whose saved crosscoder
takes raw activations (the per-site scales folded) and records its sites in order."""

import pytest
import torch

from fastsae import SAE
from fastsae.crosscoder import fold_site_scales_
from fastsae.harvest import ShuffledLoader

from helpers import tiny_harvest

T = pytest.importorskip("transformers")
SITES = ["resid_post.0", "resid_post.1", "resid_post.2"]


def tiny_store(out):
    return tiny_harvest(out, SITES, hidden_size=16, num_layers=3, intermediate_size=24)


def test_the_loader_serves_the_sites_side_by_side_each_scaled_by_its_own(tmp_path):
    store = tiny_store(tmp_path / "store")
    every = {s: torch.cat([store.load_shard(i, keys=(s,))[s] for i in range(len(store.shards))]) for s in SITES}
    scales = [store.norm_scale(s) for s in SITES]
    assert len({round(s, 6) for s in scales}) == 3  # the sites' norms differ, so a shared scale would be wrong
    joint = ShuffledLoader(store, SITES[0], 16, seed=3, sites=SITES, shards_in_memory=2, normalize=True,
                           with_index=True)
    assert joint.site_scales == tuple(scales)
    served = 0
    for x, rows in joint:
        assert x.shape[1] == 3 * 16
        # the same tokens' rows at every site
        want = torch.cat([every[s][rows] * scale for s, scale in zip(SITES, scales, strict=True)], dim=1)
        torch.testing.assert_close(x, want)
        served += x.shape[0]
    assert served == store.tokens
    for bad, match in ((["resid_post.1", "resid_post.2"], "the first being site"), ([SITES[0]], ">= 2 distinct"),
                       ([SITES[0], "nope"], ">= 2 distinct")):
        with pytest.raises(ValueError, match=match):
            ShuffledLoader(store, SITES[0], 16, sites=bad)
    with pytest.raises(ValueError, match="without target_site"):
        ShuffledLoader(store, SITES[0], 16, sites=SITES, target_site=SITES[1])


def test_cli_trains_a_crosscoder_from_a_store_that_takes_raw_activations(tmp_path):
    from fastsae.cli import main

    store = tiny_store(tmp_path / "store")
    assert main(["train", "--data", str(tmp_path / "store"), "--kind", "crosscoder", "--sites", *SITES,
                 "--activation", "topk", "--k", "4", "--d-sae", "64", "--steps", "4", "--batch-size", "16",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    sae = SAE.load(tmp_path / "run" / "sae")
    assert sae.cfg.kind == "crosscoder" and sae.cfg.n_sites == 3 and sae.cfg.d_in == 48
    assert sae.metadata["sites"] == SITES and sae.metadata["site"] == SITES[0]
    assert sae.metadata["site_scales_folded"] == pytest.approx([store.norm_scale(s) for s in SITES])
    assert "input_scale_folded" not in sae.metadata  # the per-site fold, not one shared scale
    # the saved crosscoder on raw activations = the trained one on scaled activations, rescaled per site
    raw = torch.cat([store.load_shard(0, keys=(s,))[s] for s in SITES], dim=1)
    scales = [store.norm_scale(x) for x in SITES]
    s = torch.tensor(scales).repeat_interleave(16)
    trained = fold_site_scales_(SAE.load(tmp_path / "run" / "sae"), [1 / v for v in scales])  # as it trained
    with torch.no_grad():
        torch.testing.assert_close(sae(raw).x_hat, trained(raw * s).x_hat / s, rtol=1e-4, atol=1e-5)

def test_cli_refuses_sites_for_another_kind(tmp_path, capsys):
    from fastsae.cli import main

    tiny_store(tmp_path / "store")
    assert main(["train", "--data", str(tmp_path / "store"), "--kind", "transcoder", "--sites", *SITES,
                 "--out", str(tmp_path / "bad"), "--no-progress"]) != 0
    assert "--sites: a crosscoder (--kind crosscoder) reads --sites" in capsys.readouterr().err
