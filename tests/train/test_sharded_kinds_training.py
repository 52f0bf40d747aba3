"""Training the new kinds on two gloo ranks (data parallel, latents sharded) against one process on the same global
batches: skip transcoders on (x, y) pairs (W_skip replicated and averaged over the data ranks), JumpReLU with θ
trained, Matryoshka; and the store loader's (x, y) pairs split over data ranks.

Tolerance as tests/train/test_distributed_train.py: 1e-5 on the weights after the Adam steps (fp32).
"""

import pytest
import torch
from spawn import run_ranks

from fastsae import SAE, SAEConfig
from fastsae.ops.distributed import ProcessGrid
from fastsae.toy import ToyDictionary
from fastsae.train import TrainConfig, Trainer
from fastsae.train.distributed_training import DistributedTrainer, slice_batches
from fastsae.train.sharded import ShardedSAE, gather_sae

STEPS, BATCH, D_IN, D_SAE = 6, 32, 12, 38
TC = dict(kind="skip_transcoder", apply_b_dec_to_input=False)
CASES = {  # name: (latent shards, SAE config, train config)
    "dp_skip_topk": (1, dict(activation="topk", k=3, **TC), dict(auxk_coefficient=1 / 32)),
    "shard_skip_jumprelu_matryoshka": (2, dict(activation="jumprelu", jumprelu_sparsity="quadratic", k=3,
                                               jumprelu_threshold=0.05, jumprelu_bandwidth=0.05, l1_coefficient=0.1,
                                               matryoshka_widths=(9, 19, 25), **TC), dict()),
    "shard_transcoder_batchtopk": (2, dict(activation="batchtopk", k=3, kind="transcoder",
                                           apply_b_dec_to_input=False), dict(auxk_coefficient=1 / 32)),
}


def _setup(name):
    _, sae_kw, train_kw = CASES[name]
    cfg = SAEConfig(D_IN, D_SAE, **sae_kw)
    train = TrainConfig.flat(lr=3e-3, total_steps=STEPS, dead_window_tokens=64, log_every=2, progress=False, seed=1,
                             **train_kw)
    toy = ToyDictionary.random(d_in=D_IN, n_features=16, active_per_sample=2.0, seed=0)
    W = torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(2)) / 4
    return cfg, train, [(x, x @ W.T + torch.relu(x[:, :2]).sum(1, keepdim=True)) for x in toy.batches(BATCH, STEPS)]


def _train_worker(rank, world, out_dir):
    for name, (latent, _, _) in CASES.items():
        cfg, train, batches = _setup(name)
        torch.manual_seed(0)
        grid = ProcessGrid.create(latent_size=latent)
        trainer = DistributedTrainer(ShardedSAE(cfg, grid, seed=0), train, out_dir / name)
        trainer.fit(slice_batches(batches, grid))
        state = gather_sae(trainer.model).state_dict()
        if rank == 0:
            torch.save(state, out_dir / f"{name}.pt")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_kinds")
    run_ranks(_train_worker, 2, out)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_train_as_one_process(two_rank_runs, tmp_path, name):
    cfg, train, batches = _setup(name)
    torch.manual_seed(0)
    sae = SAE(cfg, seed=0)
    start = {n: t.clone() for n, t in sae.state_dict().items()}
    Trainer(sae, train, tmp_path / name).fit(batches)
    got = torch.load(two_rank_runs / f"{name}.pt")
    for n, t in sae.state_dict().items():
        torch.testing.assert_close(got[n], t, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    moved = [n for n in ("W_skip", "threshold") if n in start]
    assert moved and all(not torch.equal(start[n], sae.state_dict()[n]) for n in moved)  # they trained


def test_rank_pair_loaders_join_into_the_single_process_pairs(tmp_path):
    pytest.importorskip("transformers")
    from test_transcoder_training import SITES, tiny_store

    from fastsae.harvest import ShuffledLoader

    store = tiny_store(tmp_path / "store")
    kw = dict(seed=3, shards_in_memory=2, normalize=True, target_site=SITES[1])
    steps = 2 * len(ShuffledLoader(store, SITES[0], 10, **kw)) + 1  # past two epochs
    single = list(ShuffledLoader(store, SITES[0], 10, **kw).batches(steps))
    ranks = [list(ShuffledLoader(store, SITES[0], 10, rank=r, world_size=2, **kw).batches(steps)) for r in range(2)]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][step][0] for r in range(2)]), x), step
        assert torch.equal(torch.cat([ranks[r][step][1] for r in range(2)]), y), step
