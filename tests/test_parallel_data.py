"""Data for several ranks: the loader's rank split, and harvesting one store from several processes."""

import pytest
import torch

from fastsae.harvest import CorruptShardError, ShuffledLoader, harvest

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
