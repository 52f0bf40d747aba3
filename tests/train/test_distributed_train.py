"""Training on two gloo ranks (data parallel, and latents sharded) against one process with the same
global batch; checkpoints, a killed rank, and resuming on another grid.

Tolerance: 1e-5 absolute and relative on weights after 12 Adam steps (fp32). Two ranks add the same
terms as one process in another order (each rank's half-batch sums, then the all-reduce; half of W_enc's
GEMM on each shard), a few ulps per step; Adam divides by sqrt(v), so a gradient near 0 can carry such a
difference into an update of up to lr·1e-3 relative. Discrete choices (TopK indices, resampled latents)
must agree exactly, and do at these sizes.
"""

import json
import multiprocessing
import os

import pytest
import torch
from spawn import TIMEOUT_S, _worker, free_port, run_ranks

from fastsae import SAE, SAEConfig
from fastsae.ops.distributed import ProcessGrid
from fastsae.toy import ToyDictionary
from fastsae.train import TrainConfig, Trainer
from fastsae.train.distributed_training import DistributedTrainer, slice_batches
from fastsae.train.sharded import ShardedSAE, gather_sae

STEPS, BATCH = 12, 64
CASES = {  # name: (latent shards, SAE config, train config)
    "dp_topk": (1, dict(activation="topk", k=4), dict(auxk_coefficient=1 / 32, resample_every=5)),
    "dp_batchtopk_fused": (1, dict(activation="batchtopk", k=3), dict(optimizer="fused")),
    "dp_relu": (1, dict(activation="relu", l1_coefficient=0.2), dict(resample_every=5, optimizer="fused")),
    "shard_topk": (2, dict(activation="topk", k=4), dict(auxk_coefficient=1 / 32, resample_every=5)),
    "shard_batchtopk_fused": (2, dict(activation="batchtopk", k=3), dict(optimizer="fused", resample_every=5)),
    "shard_jumprelu_tied": (2, dict(activation="jumprelu", tied=True, l1_coefficient=0.2, jumprelu_sparsity="l1"),
                            dict()),
}


def _setup(name):
    _, sae_kw, train_kw = CASES[name]
    cfg = SAEConfig(12, 64, **sae_kw)
    train = TrainConfig.flat(lr=3e-3, total_steps=STEPS, dead_window_tokens=128, resample_pool=128, log_every=4,
                        checkpoint_every=4, progress=False, seed=1, **train_kw)
    toy = ToyDictionary.random(d_in=12, n_features=16, active_per_sample=2.0, seed=0)  # many latents die
    return cfg, train, toy.batches(BATCH, STEPS)


def _train_worker(rank, world, out_dir, names):
    for name in names:
        cfg, train, batches = _setup(name)
        torch.manual_seed(0)
        grid = ProcessGrid.create(latent_size=CASES[name][0])
        trainer = DistributedTrainer(ShardedSAE(cfg, grid, seed=0), train, out_dir / name)
        result = trainer.fit(slice_batches(batches, grid))
        state = gather_sae(trainer.model).state_dict()
        if rank == 0:
            torch.save({"state": state, "history": result.history}, out_dir / f"{name}.pt")


def _single(name, run_dir):
    cfg, train, batches = _setup(name)
    torch.manual_seed(0)
    return Trainer(SAE(cfg, seed=0), train, run_dir).fit(batches)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_ranks(_train_worker, 2, out, [n for n in CASES if n not in GRID])
    return out


def assert_state_close(got: dict, want: dict, tol=1e-5):
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


GRID = ["grid_topk", "grid_batchtopk"]  # 4 ranks: 2 data replicas x 2 latent shards
CASES["grid_topk"] = CASES["shard_topk"]
CASES["grid_batchtopk"] = CASES["shard_batchtopk_fused"]


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    run_ranks(_train_worker, 4, out, GRID)
    return out


@pytest.mark.parametrize("name", [n for n in CASES if n not in GRID])
def test_two_ranks_train_like_one_process(two_rank_runs, tmp_path, name):
    check_like_one_process(two_rank_runs, tmp_path, name)


@pytest.mark.parametrize("name", GRID)
def test_a_2x2_grid_trains_like_one_process(grid_runs, tmp_path, name):
    check_like_one_process(grid_runs, tmp_path, name)


def check_like_one_process(runs, tmp_path, name):
    got = torch.load(runs / f"{name}.pt")
    want = _single(name, tmp_path / "single")
    assert_state_close(got["state"], want.sae.state_dict())
    assert [h["step"] for h in got["history"]] == [h["step"] for h in want.history]
    for mine, theirs in zip(got["history"], want.history, strict=True):
        assert mine.keys() == theirs.keys()
        assert mine.get("resampled") == theirs.get("resampled")
        for key in ("loss", "mse", "l1", "auxk", "l0", "fvu", "dead_fraction", "tokens"):
            expected = None if theirs[key] is None else pytest.approx(theirs[key], rel=1e-4, abs=1e-6)
            assert mine[key] == expected, key
    if "resample_every" in CASES[name][2] and "topk" in name:
        assert any(h.get("resampled") for h in want.history), "the case should resample something"
    # rank 0 wrote the metrics once, in the single-process format
    lines = (runs / name / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [h["step"] for h in want.history]


@pytest.mark.parametrize("name", ["dp_topk", "shard_topk"])
def test_checkpoints_load_in_one_process(two_rank_runs, tmp_path, name):
    """Data parallel: the single-process checkpoint. Sharded: a sharded one, which a single process
    resumes (resharding 2 → 1) to the same state."""
    last = two_rank_runs / name / "checkpoints" / f"step-{STEPS:08d}"
    want = torch.load(two_rank_runs / f"{name}.pt")["state"]
    if name.startswith("dp"):
        single = _single(name, tmp_path / "single")
        files = sorted(p.relative_to(last).as_posix() for p in last.rglob("*"))
        ref = tmp_path / "single" / "checkpoints" / f"step-{STEPS:08d}"
        assert files == sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*"))
        assert_state_close(SAE.load(last / "sae").state_dict(), single.sae.state_dict())
    cfg, train, _ = _setup(name)
    one = DistributedTrainer(ShardedSAE(cfg, seed=5), train, two_rank_runs / name)  # one process, one shard
    assert one.resume() and one.step_count == STEPS
    assert_state_close(one.model.to_sae().state_dict(), want, tol=0)


@pytest.mark.parametrize("name", ["shard_topk", "shard_batchtopk_fused", "shard_jumprelu_tied"])
def test_a_plain_trainer_resumes_a_sharded_checkpoint(two_rank_runs, name):
    """Trainer.load_checkpoint reads a checkpoint of 2 latent shards whole: the same state, bit for bit, as
    the one-process DistributedTrainer reads (weights, Adam moments by parameter, dead-latent counters,
    resampling pool, generator, step, tokens), with either optimizer."""
    cfg, train, _ = _setup(name)
    run = two_rank_runs / name
    plain = Trainer(SAE(cfg, seed=5), train, run)
    assert plain.resume() and plain.step_count == STEPS
    one = DistributedTrainer(ShardedSAE(cfg, seed=6), train, run)
    assert one.resume()
    assert_state_close(plain.sae.state_dict(), torch.load(two_rank_runs / f"{name}.pt")["state"], tol=0)
    names = {id(p): n for n, p in plain.sae.named_parameters()} | {id(p): n for n, p in one.sae.named_parameters()}
    moments = [{names[id(p)]: s for p, s in t.optimizer.state.items()} for t in (plain, one)]
    trained = {n for n, p in plain.sae.named_parameters() if p.requires_grad}
    assert moments[0].keys() == moments[1].keys() == trained
    for name, state in moments[0].items():
        assert_state_close(state, moments[1][name], tol=0)
    assert torch.equal(plain.tokens_since_fired, one.tokens_since_fired) and torch.equal(plain.pool, one.pool)
    assert torch.equal(plain.generator.get_state(), one.generator.get_state())
    assert (plain.tokens_seen, plain.total_steps) == (one.tokens_seen, one.total_steps) == (STEPS * BATCH, STEPS)


# ---- a rank dies --------------------------------------------------------------------------------------

KILL = "shard_topk"


def _dying_worker(rank, world, out_dir, die_at):
    cfg, train, batches = _setup(KILL)
    torch.manual_seed(0)
    grid = ProcessGrid.create(latent_size=2)

    def stream():
        for step, x in enumerate(slice_batches(batches, grid)):
            if rank == 1 and step == die_at:
                os._exit(3)  # killed: no clean-up, no goodbye to the peer
            yield x

    DistributedTrainer(ShardedSAE(cfg, grid, seed=0), train, out_dir).fit(stream(), resume=die_at is None)


def test_a_killed_rank_fails_the_job_and_resume_continues(tmp_path, monkeypatch):
    """Rank 1 dies at step 7 (after the checkpoint of step 4); rank 0 must fail on its own, not hang,
    and a resumed run must end where an uninterrupted one does."""
    ctx = multiprocessing.get_context("spawn")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, _dying_worker, (tmp_path, 6))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=TIMEOUT_S + 60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert procs[1].exitcode == 3
    assert not procs[0].is_alive() and procs[0].exitcode != 0  # rank 0 failed by itself: no hang
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    run_ranks(_dying_worker, 2, tmp_path, None)  # --resume, on the same grid
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:08d}"
    single = _single(KILL, tmp_path / "single")
    resumed = DistributedTrainer(ShardedSAE(_setup(KILL)[0], seed=5), _setup(KILL)[1], tmp_path)
    assert resumed.resume() and resumed.step_count == STEPS
    assert_state_close(resumed.model.to_sae().state_dict(), single.sae.state_dict())
