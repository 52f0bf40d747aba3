"""Data for several ranks: the loader's rank split, and harvesting one store from several processes."""

import pytest
import torch
from spawn import run_ranks

from fastsae.harvest import ActivationStore, CorruptShardError, ShuffledLoader, harvest
from fastsae.harvest import harvester as harvest_module
from fastsae.harvest.harvester import harvest_parallel
from fastsae.harvest.parallel import part_dir, vectors_by_position

from helpers import assert_close

T = pytest.importorskip("transformers")
SITE = "resid_post.0"


def tiny_model():
    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=48, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.GPTNeoXForCausalLM(cfg).eval()


def windows(n=13, t=8):
    ids = torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1  # BOS, excluded from the store
    return ids


def small_store(path):
    return harvest(tiny_model(), [SITE], windows(), path, batch_size=3, dtype=torch.float32, shard_rows=17,
                   progress=False)


@pytest.mark.parametrize("world,batch_size,in_memory,drop_last", [(2, 8, 1, False), (3, 9, 2, True),
                                                                   (2, 7, 3, False)])
def test_ranks_batches_join_into_the_single_process_batch(tmp_path, world, batch_size, in_memory, drop_last):
    store = small_store(tmp_path)
    kw = dict(seed=3, shards_in_memory=in_memory, with_index=True, drop_last=drop_last, normalize=True)
    steps = 2 * len(ShuffledLoader(store, SITE, batch_size, **kw)) + 1  # past two epochs
    single = list(ShuffledLoader(store, SITE, batch_size, **kw).batches(steps))
    ranks = [list(ShuffledLoader(store, SITE, batch_size, rank=r, world_size=world, **kw).batches(steps))
             for r in range(world)]
    assert all(len(r) == len(single) == steps for r in ranks)
    for step, (batch, index) in enumerate(single):
        parts = [ranks[r][step] for r in range(world)]
        assert [len(i) for _, i in parts] == [len(p) for p in index.tensor_split(world)]
        assert torch.equal(torch.cat([i for _, i in parts]), index), f"step {step}"
        assert torch.equal(torch.cat([b for b, _ in parts]), batch), f"step {step}"


def test_rank_loader_checks_its_shards(tmp_path):
    store = small_store(tmp_path)
    path = tmp_path / store.shards[1].file
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    # shard 1 is checked by rank 1 of 2: it reads the file whole once and refuses it
    with pytest.raises(CorruptShardError, match="SHA-256"):
        list(ShuffledLoader(store, SITE, 8, rank=1, world_size=2))
    with pytest.raises(ValueError, match="rank"):
        ShuffledLoader(store, SITE, 8, rank=2, world_size=2)


def _harvest_part(out, rank, world, **kw):
    return harvest_parallel(tiny_model(), [SITE], windows(), out, rank=rank, world_size=world, batch_size=3,
                            dtype=torch.float32, shard_rows=17, progress=False, **kw)


def assert_same_vectors(store, reference):
    got, want = vectors_by_position(store), vectors_by_position(reference)
    assert sorted(got) == sorted(want)  # the same (window, position) pairs
    # the same vectors, to fp32 rounding: the model ran on other batches of windows
    assert_close(torch.stack([got[key] for key in sorted(want)]), torch.stack([want[key] for key in sorted(want)]),
                 torch.float32)


def _harvest_worker(rank, world, out):
    store = _harvest_part(out, rank, world)
    assert store.tokens > 0


def test_two_process_harvest_holds_the_single_process_vectors(tmp_path):
    run_ranks(_harvest_worker, 2, tmp_path / "two")
    store = ActivationStore(tmp_path / "two")
    assert {s.file for s in store.shards} == {f"shard-{i:05d}.safetensors" for i in range(len(store.shards))}
    reference = small_store(tmp_path / "one")
    assert store.tokens == reference.tokens and store.meta["sequences_done"] == reference.meta["sequences_done"]
    assert store.meta["source"] == reference.meta["source"]
    assert store.norm_scale(SITE) == pytest.approx(reference.norm_scale(SITE), rel=1e-6)
    assert_same_vectors(store, reference)


def test_parallel_harvest_resumes_per_rank(tmp_path, monkeypatch):
    """Without a process group: each part by itself, the last to finish merges. Rank 0 is killed
    mid-harvest and resumes; rank 1's finished part is kept."""
    out = tmp_path / "store"
    real, calls = harvest_module.capture, []

    def dies(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # the probe, one batch, then the rank dies
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(harvest_module, "capture", dies)
    with pytest.raises(KeyboardInterrupt):
        _harvest_part(out, 0, 2)
    monkeypatch.setattr(harvest_module, "capture", real)
    assert _harvest_part(out, 1, 2) is None  # rank 0's part is unfinished: nothing merged yet
    rank1 = sorted(p.name for p in part_dir(out, 1, 2).iterdir())
    with pytest.raises(ValueError, match="another number of processes"):
        _harvest_part(out, 0, 3, resume=True)
    store = _harvest_part(out, 0, 2, resume=True)
    assert sorted(p.name for p in part_dir(out, 1, 2).iterdir()) == rank1
    assert_same_vectors(store, small_store(tmp_path / "one"))
