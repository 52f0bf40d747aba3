"""Latent sharding: two gloo ranks, each holding half of the latents, against the unsharded SAE.

Tolerance: fp32 (the dtype's 2e-5 of tests/helpers.py). The sharded encoder runs the same GEMM on half of
W_enc's rows and the decode adds two partial sums instead of one, so results differ from one process by
fp32 rounding only; TopK indices are compared exactly.
"""

import pytest
import torch
from sharded_steps import assert_grads_and_step_match, one_step
from spawn import run_ranks

from fastsae import SAE, SAEConfig, use_backend
from fastsae.ops.distributed import ProcessGrid, latent_bounds
from fastsae.train.sharded import (
    ShardedSAE,
    consolidate,
    gather_rows,
    gather_sae,
    load_sharded,
    save_sharded,
    shard_sae,
)

from conftest import make_sae
from helpers import assert_close

D_IN, D_SAE, N, K_AUX = 13, 37, 23, 6  # 37 latents: shards of 19 and 18
CASES = {
    "topk": dict(activation="topk", k=5),
    "topk_tied": dict(activation="topk", k=5, tied=True),
    "topk_triton": dict(activation="topk", k=5),
    "topk_bf16": dict(activation="topk", k=5),  # mixed precision: bf16 compute on fp32 master weights
    "batchtopk": dict(activation="batchtopk", k=4),
    "relu": dict(activation="relu", l1_coefficient=0.3),
    "jumprelu": dict(activation="jumprelu", jumprelu_threshold=0.05, l1_coefficient=0.3, jumprelu_sparsity="l1"),
}


def _inputs(name):
    """The same SAE, batch and dead latents in every process."""
    sae = make_sae(d_in=D_IN, d_sae=D_SAE, seed=3, **CASES[name])
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, D_IN, generator=gen) * 2
    dead = torch.rand(D_SAE, generator=gen) < 0.4
    if name.endswith("bf16"):
        sae.compute_dtype, x = torch.bfloat16, x.bfloat16()
    return sae, x, dead


def _sharded_worker(rank, world, out_dir):
    grid = ProcessGrid.create(latent_size=world)
    results = {}
    for name in CASES:
        sae, x, dead = _inputs(name)
        model = ShardedSAE.from_sae(sae, grid)
        s = model.shard
        with use_backend("triton" if name.endswith("triton") else "torch"):
            out, grads = one_step(model, x, dead[s.start:s.stop], K_AUX, adam=False)  # SAEAdam: the trainer's
        for n, g in grads.items():
            results[f"{name}.grad.{n}"] = gather_rows(g, s) if n in model.row_tensors else g
        for n, t in gather_sae(model).state_dict().items():
            results[f"{name}.after.{n}"] = t
        results[f"{name}.x_hat"] = out.x_hat.detach()
        results[f"{name}.loss"] = out.loss.detach()
        results[f"{name}.dense"] = out.latents.detach().to_dense()
        if out.auxk is not None:
            results[f"{name}.auxk"] = out.auxk.detach()
        if name.startswith("topk"):
            results[f"{name}.indices"] = out.latents.indices
        save_sharded(model, out_dir / f"{name}-sharded")
    if rank == 0:
        torch.save(results, out_dir / "results.pt")


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sharded")
    run_ranks(_sharded_worker, 2, out_dir)
    return out_dir, torch.load(out_dir / "results.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_step_equals_unsharded(sharded_results, name):
    _, got = sharded_results
    sae, x, dead = _inputs(name)
    out, grads = one_step(sae, x, dead, K_AUX, adam=False)
    tol = torch.bfloat16 if name.endswith("bf16") else torch.float32
    assert_close(got[f"{name}.x_hat"], out.x_hat.detach(), tol)
    assert_close(got[f"{name}.loss"], out.loss.detach(), tol)
    assert_close(got[f"{name}.dense"], out.latents.detach().to_dense(), tol)
    if out.auxk is not None:
        assert out.auxk > 0
        assert_close(got[f"{name}.auxk"], out.auxk.detach(), tol)
    if name.startswith("topk") and tol == torch.float32:  # bf16 values tie too often to compare slots
        assert torch.equal(got[f"{name}.indices"], out.latents.indices)
    assert_grads_and_step_match(got, name, sae, grads, tol)


@pytest.mark.parametrize("name", ["topk", "batchtopk", "jumprelu"])
def test_sharded_files_consolidate_and_reshard(sharded_results, tmp_path, name):
    out_dir, got = sharded_results
    sae = consolidate(out_dir / f"{name}-sharded", tmp_path / "sae")
    for n, t in SAE.load(tmp_path / "sae").state_dict().items():
        assert torch.equal(t, got[f"{name}.after.{n}"]), n
    # and back: 3 shards on disk, read into 2 (each rank's rows come from the shards that hold them)
    shard_sae(sae, tmp_path / "three", 3)
    for r, (start, stop) in enumerate(latent_bounds(D_SAE, 2)):
        part = load_sharded(tmp_path / "three", ProcessGrid(latent_size=2, latent_rank=r))
        assert torch.equal(part.W_dec, sae.W_dec[start:stop]) and torch.equal(part.b_dec, sae.b_dec)
        assert torch.equal(part.b_enc, sae.b_enc[start:stop])


def test_sharded_init_holds_the_rows_of_the_sae():
    cfg = SAEConfig(3, 70_001, activation="topk", k=2)  # past one piece of the sliced generator
    rows = [ShardedSAE(cfg, ProcessGrid(latent_size=3, latent_rank=r), seed=7).W_dec for r in range(3)]
    assert torch.equal(torch.cat(rows), SAE(cfg, seed=7).W_dec)


def test_consolidate_refuses_what_is_not_sharded(tmp_path):
    make_sae().save(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        consolidate(tmp_path / "plain")
