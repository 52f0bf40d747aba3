"""The memory planner: its arithmetic, the largest d_sae, and `fastsae plan`. (Its accuracy against
measured peaks is bench/plan_check.py's job: within a few percent on CPU.)"""

import dataclasses

import pytest

from fastsae.cli import main
from fastsae.train.plan import GIB, PlanConfig, comm_per_step, largest_d_sae, plan


def test_per_rank_terms_follow_the_layout():
    cfg = PlanConfig(d_in=2048, d_sae=1 << 20, k=64, batch=8192, gpus=8)
    p = plan(cfg)
    assert p.latents_per_rank == (1 << 17) and p.rows_per_rank == 8192
    assert p.terms["weights"] == (2 * (1 << 17) * 2048 + (1 << 17) + 2048) * 4  # W_enc, W_dec, b_enc, b_dec
    assert p.terms["optimizer state"] == 2 * p.terms["weights"]
    bf16 = plan(dataclasses.replace(cfg, moments="bfloat16"))
    assert bf16.terms["optimizer state"] == p.terms["weights"]
    data = plan(dataclasses.replace(cfg, latent_shards=1))  # 8 data replicas: all latents, 1/8 of the rows
    assert data.latents_per_rank == 1 << 20 and data.rows_per_rank == 1024
    assert data.total > 6 * p.total
    dense = plan(dataclasses.replace(cfg, backend="torch", optimizer="torch"))
    assert dense.terms["workspace (largest transient)"] >= 8192 * (1 << 17) * 2  # the (b, n) pre-activations
    with pytest.raises(ValueError, match="divide"):
        PlanConfig(2048, 1 << 20, gpus=8, latent_shards=3)
    with pytest.raises(ValueError, match="batch"):
        PlanConfig(2048, 1 << 20, batch=100, gpus=8, latent_shards=1)


@pytest.mark.parametrize("gpus,shards", [(1, 1), (8, 8), (8, 2)])
def test_largest_d_sae_is_the_edge_of_the_budget(gpus, shards):
    cfg = PlanConfig(d_in=2048, d_sae=1 << 16, k=64, batch=8192, gpus=gpus, latent_shards=shards)
    budget = 80 * GIB
    top = largest_d_sae(cfg, budget)
    assert top % shards == 0
    assert plan(dataclasses.replace(cfg, d_sae=top)).total <= budget
    assert plan(dataclasses.replace(cfg, d_sae=top + shards)).total > budget


def test_communication_per_step():
    cfg = PlanConfig(d_in=512, d_sae=16384, k=32, batch=4096, gpus=2, latent_shards=1)
    grads = (2 * 16384 * 512 + 16384 + 512) * 4
    assert comm_per_step(cfg) == {"gradients all-reduce (data)": grads, "fired latents all-reduce (data)": 16384}
    sharded = comm_per_step(dataclasses.replace(cfg, latent_shards=2))
    assert sharded["candidates all-gather (latent)"] == 4096 * 32 * 8
    assert sharded["x_hat all-reduce (latent)"] == 4096 * 512 * 4
    assert comm_per_step(dataclasses.replace(cfg, gpus=1)) == {}


def test_plan_command(capsys):
    assert main(["plan", "--d-in", "2048", "--d-sae", "1048576", "--k", "64", "--batch", "8192", "--gpus", "8",
                 "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    for words in ("weights", "gradients", "optimizer state", "activations", "workspace", "fp32 moments",
                  "bf16 moments", "largest d_sae that fits (float32 moments)", "8 latent shard(s)"):
        assert words in out
    assert main(["plan", "--d-in", "64", "--d-sae", "1024", "--gpus", "4", "--latent-shards", "3"]) == 2
    assert capsys.readouterr().err.startswith("fastsae plan: latent_shards")
