"""Crosscoders latent-sharded and data parallel, on two gloo ranks against one process: one step of a sharded
crosscoder (loss and terms, x_hat, latents, every gathered gradient, the parameters after one Adam step), its
per-site scales folded on each rank's rows and its sharded files consolidated (n_sites and metadata included);
DistributedTrainer against Trainer over a few steps (data parallel and latents sharded); the store loader's
side-by-side sites split over data ranks; and `torchrun -m fastsae train --kind crosscoder --sites …` data
parallel against one process.

Odd shapes: 3 sites of width 5 (d_in 15), 37 latents split 19 | 18, 19 rows. The step cases run in float64 (the
reference backend matches to float64 rounding, the torch backend to fp32's: its decoder weight gradient accumulates
in fp32); training runs in fp32 with the tolerance of tests/train/test_distributed_train.py.
"""

import os

import pytest
import torch
from sharded_steps import assert_step_matches, one_step, record_sharded_step
from spawn import run_ranks

from fastsae import SAE, SAEConfig, use_backend
from fastsae.crosscoder import fold_site_scales_
from fastsae.losses import l1_penalty
from fastsae.ops.distributed import ProcessGrid
from fastsae.toy import ToyDictionary
from fastsae.train import TrainConfig, Trainer
from fastsae.train.distributed_training import DistributedTrainer, slice_batches
from fastsae.train.sharded import ShardedSAE, consolidate, gather_sae, save_sharded

from conftest import make_sae
from helpers import assert_close

L, D, D_SAE, N, K_AUX = 3, 5, 37, 19, 5
CC = dict(kind="crosscoder", n_sites=L)
SCALES = (0.5, 3.0, 1.25)
# name: (config, backend)
CASES = {
    "relu_l1": (dict(activation="relu", l1_coefficient=0.3, **CC), "reference"),
    "relu_l1_torch": (dict(activation="relu", l1_coefficient=0.3, **CC), "torch"),
    "topk": (dict(activation="topk", k=4, **CC), "torch"),
    "batchtopk_matryoshka": (dict(activation="batchtopk", k=3, matryoshka_widths=(7, 19, 30), **CC), "reference"),
    "jumprelu_tanh": (dict(activation="jumprelu", jumprelu_sparsity="tanh", jumprelu_threshold=0.3,
                           jumprelu_bandwidth=0.2, l1_coefficient=0.2, **CC), "torch"),
}
STEPS, BATCH = 6, 32
TRAIN_CASES = {  # name: (latent shards, SAE config, train config)
    "dp_topk": (1, dict(activation="topk", k=3, **CC), dict(auxk_coefficient=1 / 32)),
    "shard_relu_l1": (2, dict(activation="relu", l1_coefficient=0.05, **CC), dict()),
    "shard_batchtopk": (2, dict(activation="batchtopk", k=3, **CC), dict(auxk_coefficient=1 / 32)),
}


def _inputs(name, float64=True):
    """The same crosscoder (its sites' decoders of different norms), batch and dead latents in every process."""
    cfg, _ = CASES[name]
    sae = make_sae(d_in=L * D, d_sae=D_SAE, seed=3, **cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.tensor([0.5, 1.0, 2.0]).repeat_interleave(D))  # so Σ_l ||W_dec^l|| ≠ ||W_dec||
        if sae.cfg.activation == "jumprelu":
            sae.threshold.copy_(0.3 + 0.1 * torch.rand(D_SAE, generator=gen))
    sae.metadata["sites"] = ["resid_post.0", "resid_post.1", "resid_post.2"]
    x = torch.randn(N, L * D, generator=gen) * 2
    dead = torch.rand(D_SAE, generator=gen) < 0.4
    return (sae.double(), x.double(), dead) if float64 else (sae, x, dead)


def _train_setup(name):
    _, sae_kw, train_kw = TRAIN_CASES[name]
    cfg = SAEConfig(L * D, D_SAE, **sae_kw)
    train = TrainConfig.flat(lr=3e-3, total_steps=STEPS, dead_window_tokens=64, log_every=2, progress=False, seed=1,
                             **train_kw)
    toy = ToyDictionary.random(d_in=L * D, n_features=16, active_per_sample=2.0, seed=0)
    return cfg, train, list(toy.batches(BATCH, STEPS))


def _worker(rank, world, out_dir):
    grid = ProcessGrid.create(latent_size=world)
    results = {}
    for name, (_, backend) in CASES.items():
        sae, x, dead = _inputs(name)
        model = ShardedSAE.from_sae(sae, grid)
        s = model.shard
        with use_backend(backend):
            out, grads = one_step(model, x, dead[s.start:s.stop], K_AUX, adam=True)
        record_sharded_step(results, name, model, out, grads)
        # the per-site scales folded into this rank's rows, then the sharded files
        folded = fold_site_scales_(ShardedSAE.from_sae(_inputs(name, float64=False)[0], grid), SCALES)
        save_sharded(folded, out_dir / f"{name}-sharded")
    for name, (latent, _, _) in TRAIN_CASES.items():
        cfg, train, batches = _train_setup(name)
        torch.manual_seed(0)
        train_grid = ProcessGrid.create(latent_size=latent)
        trainer = DistributedTrainer(ShardedSAE(cfg, train_grid, seed=0), train, out_dir / name)
        trainer.fit(slice_batches(batches, train_grid))
        results[f"train.{name}"] = gather_sae(trainer.model).state_dict()
    if rank == 0:
        torch.save(results, out_dir / "results.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sharded_crosscoder")
    run_ranks(_worker, 2, out_dir)
    return out_dir, torch.load(out_dir / "results.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_crosscoder_step_equals_one_process(two_ranks, name):
    _, got = two_ranks
    sae, x, dead = _inputs(name)
    with use_backend(CASES[name][1]):
        out, grads = one_step(sae, x, dead, K_AUX, adam=True)
    assert_step_matches(got, name, sae, out, grads, torch.float64 if CASES[name][1] == "reference" else torch.float32)


def test_the_sharded_l1_is_weighted_by_the_summed_site_norms(two_ranks):
    """The sharded L1 is the crosscoder's Σ_i z_i Σ_l ||W_dec^l[i]||, not the whole row's norm (which it would be
    if the sharded path dropped the crosscoder's decoder_norms)."""
    _, got = two_ranks
    sae, x, _ = _inputs("relu_l1")
    with torch.no_grad(), use_backend("reference"):
        latents = sae.encode(x)
    W = sae.W_dec.detach()
    per_site = W.reshape(D_SAE, L, D).norm(dim=2).sum(1)
    want = l1_penalty(latents.values, latents.indices, norms=per_site)
    whole = l1_penalty(latents.values, latents.indices, W)
    assert not torch.allclose(want, whole, rtol=1e-3)
    assert_close(got["relu_l1.l1"], want, torch.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_crosscoder_folds_and_consolidates_to_the_sae(two_ranks, tmp_path, name):
    out_dir, _ = two_ranks
    sae = fold_site_scales_(_inputs(name, float64=False)[0], SCALES)
    back = consolidate(out_dir / f"{name}-sharded", tmp_path / "sae")
    assert back.cfg == sae.cfg and back.cfg.n_sites == L
    for loaded in (back, SAE.load(tmp_path / "sae")):
        assert loaded.metadata == sae.metadata
        assert loaded.metadata["site_scales_folded"] == list(SCALES)
        state = loaded.state_dict()
        assert set(state) == set(sae.state_dict())
        for n, t in sae.state_dict().items():
            assert torch.equal(state[n], t), n


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_two_ranks_train_a_crosscoder_as_one_process(two_ranks, tmp_path, name):
    _, got = two_ranks
    cfg, train, batches = _train_setup(name)
    torch.manual_seed(0)
    sae = SAE(cfg, seed=0)
    start = {n: t.clone() for n, t in sae.state_dict().items()}
    Trainer(sae, train, tmp_path / name).fit(batches)
    for n, t in sae.state_dict().items():
        torch.testing.assert_close(got[f"train.{name}"][n], t, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    assert not torch.equal(start["W_dec"], sae.W_dec.detach())  # it trained


def _store(tmp_path):
    pytest.importorskip("transformers")
    from test_crosscoder_training import SITES, tiny_store

    return tiny_store(tmp_path / "store"), SITES


@pytest.mark.parametrize("with_index", [False, True])
def test_rank_loaders_of_sites_join_into_the_single_process_batches(tmp_path, with_index):
    from fastsae.harvest import ShuffledLoader

    store, sites = _store(tmp_path)
    kw = dict(seed=3, shards_in_memory=2, normalize=True, sites=sites, with_index=with_index)
    steps = 2 * len(ShuffledLoader(store, sites[0], 10, **kw)) + 1  # past two epochs
    single = list(ShuffledLoader(store, sites[0], 10, **kw).batches(steps))
    ranks = [list(ShuffledLoader(store, sites[0], 10, rank=r, world_size=2, **kw).batches(steps)) for r in range(2)]
    assert len(single) == steps and all(len(r) == steps for r in ranks)
    for step, batch in enumerate(single):
        parts = [r[step] for r in ranks]
        if with_index:
            assert torch.equal(torch.cat([p[1] for p in parts]), batch[1]), step
            parts, batch = [p[0] for p in parts], batch[0]
        assert batch.shape[1] == L * store.sites[sites[0]]  # the last batch of an epoch is short: split unevenly
        assert torch.equal(torch.cat(parts), batch), step


def test_torchrun_trains_a_crosscoder_data_parallel_as_one_process(tmp_path):
    store, sites = _store(tmp_path)
    from test_distributed_cli import torchrun

    from fastsae.cli import main

    train = ["train", "--data", str(store.path), "--kind", "crosscoder", "--sites", *sites, "--activation", "topk",
             "--k", "4", "--d-sae", "40", "--steps", "4", "--batch-size", "16", "--auxk", "0.03125", "--no-progress"]
    torchrun(*train, "--out", str(tmp_path / "two"))
    assert main(train + ["--out", str(tmp_path / "one")]) == 0
    two, one = SAE.load(tmp_path / "two" / "sae"), SAE.load(tmp_path / "one" / "sae")
    assert two.cfg == one.cfg and two.cfg.n_sites == len(sites)
    assert two.metadata == one.metadata and two.metadata["sites"] == sites
    assert two.metadata["site_scales_folded"] == pytest.approx([store.norm_scale(s) for s in sites])
    for name, t in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], t, atol=1e-5, rtol=1e-5)
    assert os.path.getsize(tmp_path / "two" / "metrics.jsonl") > 0
