"""The activation store: harvest, resume, corruption, and the shuffling loader."""

import json

import pytest
import torch

from fastsae.harvest import ActivationStore, CorruptShardError, ShuffledLoader, harvest
from fastsae.harvest import harvester as harvest_module
from fastsae.model import capture

from helpers import tiny_pythia

T = pytest.importorskip("transformers")
SITES = ["resid_post.0", "mlp_hidden.1"]


def sequences(n=12, t=8):
    ids = torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1  # BOS at every start, a pad and an EOS here and there
    ids[3, 5], ids[7, 2] = 0, 2
    return ids


def _run(out, **kw):
    return harvest(tiny_pythia(), SITES, sequences(), out, batch_size=3, dtype=torch.float32, shard_rows=20,
                   progress=False, **kw)


def test_store_holds_every_kept_token_with_its_activations(tmp_path):
    store = _run(tmp_path)
    ids = sequences()
    assert store.meta["excluded_token_ids"] == [0, 1, 2] and store.meta["context_size"] == 8
    assert store.tokens == int((ids > 2).sum()) and len(store.shards) > 2
    assert store.sites == {"resid_post.0": 32, "mlp_hidden.1": 48}
    direct = capture(tiny_pythia(), SITES, input_ids=ids)
    for i in range(len(store.shards)):
        shard = store.load_shard(i)
        for site in SITES:
            expected = direct[site][shard["sequence"], shard["position"].long()]
            torch.testing.assert_close(shard[site], expected)
        assert torch.equal(shard["token_ids"], ids[shard["sequence"], shard["position"].long()])
        assert (shard["token_ids"] > 2).all()  # BOS/EOS/pad positions are not stored
    every = torch.cat([store.load_shard(i, keys=("mlp_hidden.1",))["mlp_hidden.1"] for i in range(len(store.shards))])
    assert torch.equal(store.first_rows("mlp_hidden.1", 25), every[:25])  # across the first shard's 20 rows
    assert torch.equal(store.first_rows("mlp_hidden.1", 10**6), every)
    with pytest.raises(ValueError, match="'bogus' is not in the store"):
        store.first_rows("bogus", 5)


def test_interrupted_harvest_resumes_to_the_same_store(tmp_path, monkeypatch):
    _run(tmp_path / "full")
    real, calls = harvest_module.capture, []

    def dies(*args, **kw):
        calls.append(1)
        if len(calls) == 4:  # the probe, then 3 batches; the 3rd batch never lands
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(harvest_module, "capture", dies)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut")
    monkeypatch.setattr(harvest_module, "capture", real)
    partial = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert 0 < partial["sequences_done"] < 12
    (tmp_path / "cut" / "shard-00099.safetensors").write_bytes(b"an uncommitted leftover")
    with pytest.raises(FileExistsError):
        _run(tmp_path / "cut")
    resumed = _run(tmp_path / "cut", resume=True)
    full = ActivationStore(tmp_path / "full")
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in full.shards]
    assert resumed.meta == full.meta
    assert not (tmp_path / "cut" / "shard-00099.safetensors").exists()


def test_resume_refuses_other_settings(tmp_path):
    _run(tmp_path)
    with pytest.raises(ValueError, match="context_size|sites"):
        harvest(tiny_pythia(), SITES[:1], sequences(), tmp_path, resume=True, progress=False)


def test_corrupt_shards_are_reported(tmp_path):
    store = _run(tmp_path)
    path = tmp_path / store.shards[1].file
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=store.shards[1].file):
        store.verify()
    with pytest.raises(CorruptShardError, match="SHA-256"):
        list(ShuffledLoader(store, "resid_post.0", 7, shards_in_memory=1))
    path.unlink()
    with pytest.raises(CorruptShardError, match="missing"):
        store.load_shard(1)
    meta = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**meta, "tokens": meta["tokens"] + 1}))
    with pytest.raises(CorruptShardError, match="manifest says"):
        ActivationStore(tmp_path)


@pytest.mark.parametrize("batch_size,in_memory", [(7, 1), (16, 2), (1000, 3)])
def test_loader_serves_every_vector_once_per_epoch(tmp_path, batch_size, in_memory):
    store = _run(tmp_path)
    loader = ShuffledLoader(store, "mlp_hidden.1", batch_size, seed=3, shards_in_memory=in_memory, with_index=True)
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(b.shape == (batch_size, 48) for b, _ in batches[:-1])
        index = torch.cat([i for _, i in batches])
        assert torch.equal(index.sort().values, torch.arange(store.tokens))  # each vector exactly once
        epochs.append(index)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch
    again = ShuffledLoader(store, "mlp_hidden.1", batch_size, seed=3, shards_in_memory=in_memory, with_index=True)
    assert torch.equal(torch.cat([i for _, i in again]), epochs[0])  # and deterministic given the seed
    rows = torch.cat([store.load_shard(i)["mlp_hidden.1"] for i in range(len(store.shards))])
    first_batch, first_index = batches[0]
    torch.testing.assert_close(first_batch, rows[first_index])


def test_loader_mixes_sequences_and_feeds_the_trainer(tmp_path):
    from fastsae import SAE, SAEConfig
    from fastsae.train import TrainConfig, train

    store = _run(tmp_path)
    batch, index = next(iter(ShuffledLoader(store, "resid_post.0", 16, with_index=True)))
    seq = torch.cat([store.load_shard(i)["sequence"] for i in range(len(store.shards))])[index]
    assert seq.unique().numel() > 3
    sae = SAE(SAEConfig(32, 64, activation="topk", k=4), seed=0)
    result = train(sae, ShuffledLoader(store, "resid_post.0", 16), TrainConfig.flat(progress=False, log_every=1))
    assert len(result.history) == len(ShuffledLoader(store, "resid_post.0", 16))
    with pytest.raises(ValueError, match="not in the store"):
        ShuffledLoader(store, "resid_post.5", 16)


def test_norm_statistics_normalised_loader_and_fixed_step_batches(tmp_path):
    store = _run(tmp_path)
    rows = torch.cat([store.load_shard(i)["resid_post.0"] for i in range(len(store.shards))]).double()
    mean_norm = rows.norm(dim=1).mean().item()
    assert store.mean_norm("resid_post.0") == pytest.approx(mean_norm, rel=1e-12)
    assert store.norm_scale("resid_post.0") == pytest.approx(32 ** 0.5 / mean_norm, rel=1e-12)
    loader = ShuffledLoader(store, "resid_post.0", 8, normalize=True, drop_last=True)
    batches = list(loader)
    assert len(batches) == store.tokens // 8 and all(b.shape[0] == 8 for b in batches)
    served = torch.cat(batches).double()
    assert served.norm(dim=1).mean().item() == pytest.approx(32 ** 0.5, rel=0.05)  # drop_last leaves a few out
    steps = list(ShuffledLoader(store, "resid_post.0", 8, drop_last=True).batches(2 * len(batches) + 1))
    assert len(steps) == 2 * len(batches) + 1  # whole epochs, then one more batch


def test_a_prefix_is_the_first_whole_shards_with_their_own_norms(tmp_path):
    from fastsae.pipeline.data_sources import DataConfig, open_data

    store = _run(tmp_path)
    first = store.shards[0].rows  # shards of about 20 rows (whole sequences)
    view = store.prefix(first + 1)  # the first two
    two = first + store.shards[1].rows
    assert view.tokens == two and len(view.shards) == 2 and store.tokens > two
    rows = torch.cat([store.load_shard(i)["resid_post.0"] for i in range(2)]).double()
    assert view.mean_norm("resid_post.0") == pytest.approx(rows.norm(dim=1).mean().item(), rel=1e-12)
    assert view.mean_norm("resid_post.0") != pytest.approx(store.mean_norm("resid_post.0"), rel=1e-9)
    last = store.load_shard(1, keys=("sequence",))["sequence"]
    assert view.meta["sequences_done"] == int(last.max()) + 1 < store.meta["sequences_done"]
    assert store.prefix(store.tokens) is store and store.prefix(10**9) is store
    served = torch.cat(list(ShuffledLoader(view, "resid_post.0", 8)))
    assert sorted(served.sum(1).tolist()) == sorted(rows.float().sum(1).tolist())  # only the prefix, each once
    data = open_data(DataConfig(source=str(tmp_path), site="resid_post.0", tokens=first + 1, batch_size=8))
    assert data.provenance["rows"] == two and data.scale == pytest.approx(view.norm_scale("resid_post.0"))
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        store.prefix(0)


def test_fold_input_scale_gives_the_same_reconstruction_on_raw_inputs(tmp_path):
    from fastsae import SAE, SAEConfig

    for act, extra in (("topk", {"k": 5}), ("relu", {}), ("jumprelu", {})):
        sae = SAE(SAEConfig(16, 40, activation=act, **extra), seed=1)
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_(std=0.1)
        x = torch.randn(20, 16) * 7.0
        s = 0.3
        trained_on_scaled = sae(x * s)
        sae.fold_input_scale_(s)
        raw = sae(x)
        torch.testing.assert_close(raw.x_hat, trained_on_scaled.x_hat / s, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(raw.latents.to_dense(), trained_on_scaled.latents.to_dense(), rtol=1e-5, atol=1e-5)
        sae.save(tmp_path / act)
        assert SAE.load(tmp_path / act).metadata == {"input_scale_folded": s}
    with pytest.raises(ValueError, match="tied"):
        SAE(SAEConfig(16, 40, tied=True)).fold_input_scale_(2.0)
    with pytest.raises(ValueError, match="scale"):
        sae.fold_input_scale_(0.0)


def test_streaming_serves_every_kept_vector_once_from_a_mixing_buffer():
    from fastsae.harvest import StreamingActivations

    model, ids = tiny_pythia(), sequences()
    direct = capture(model, ["resid_post.0"], input_ids=ids)["resid_post.0"][ids > 2]
    stream = StreamingActivations(model, "resid_post.0", ids, 8, model_batch_size=2, buffer_rows=32, seed=1)
    batches = list(stream)
    served = torch.cat(batches)
    assert served.shape == direct.shape and all(b.shape[0] == 8 for b in batches[:-1])
    key = lambda t: t.sum(1) * 1000 + t[:, 0]  # a per-vector fingerprint: compare as multisets
    torch.testing.assert_close(key(served).sort().values, key(direct).sort().values)
    assert not torch.allclose(served[:8], direct[:8])  # mixed, not in model order
    again = torch.cat(list(StreamingActivations(model, "resid_post.0", ids, 8, model_batch_size=2, buffer_rows=32,
                                                seed=1)))
    assert torch.equal(served, again)
    scaled = torch.cat(list(StreamingActivations(model, "resid_post.0", ids, 8, model_batch_size=2, buffer_rows=32,
                                                 seed=1, scale=2.0)))
    torch.testing.assert_close(scaled, 2 * served)
    with pytest.raises(ValueError, match="buffer_rows"):
        StreamingActivations(model, "resid_post.0", ids, 8, buffer_rows=8)
