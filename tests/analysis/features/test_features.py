"""The feature pass: streaming top-n against a brute-force dense computation, resume, sources, the cache."""

import pytest
import torch

from fastsae.analysis.features.feature_contexts import Example
from fastsae.analysis.features.feature_pass import (
    FeatureCache,
    FeatureConfig,
    ModelSource,
    SplitSigns,
    StoreSource,
    active_entries,
    collect_features,
)
from fastsae.analysis.features.topn import BestN, best_per_latent, hash32
from fastsae.harvest import harvest

from conftest import make_sae

pytest.importorskip("transformers")
SITE = "resid_post.0"
CFG = FeatureConfig(top=4, samples=5, quantiles=3, before=3, after=2, token_sample=16, random_contexts=6,
                    histogram_bins=8, neighbours=3, batch_rows=100_000, checkpoint_seconds=1e9)


def windows(n=24, t=12, seed=0):
    ids = torch.randint(4, 60, (n, t), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1  # BOS opens every window; an EOS and a pad inside some
    ids[3, 7], ids[10, 4] = 2, 0
    return ids


@pytest.fixture(scope="module")
def tiny():
    from fastsae.model import random_causal_lm

    return random_causal_lm()


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    return harvest(tiny[0], [SITE], windows(), path, batch_size=4, dtype=torch.float32, shard_rows=30,
                   progress=False)


class Rounded:
    """Dense codes rounded to 1/4: many exact ties, to check the tie rule."""

    def __init__(self, sae):
        self.sae, self.d_codes, self.dtype = sae, sae.cfg.d_sae, torch.float32

    def encode(self, x):
        return (self.sae.encode(x).to_dense() * 4).round() / 4


@torch.no_grad()
def dense_codes(decomposition, store):
    """(N, d_sae) codes of every store row, shard by shard (as the pass encodes them), with their metadata."""
    z, seq, pos = [], [], []
    for i in range(len(store.shards)):
        shard = store.load_shard(i)
        codes = decomposition.encode(shard[SITE])
        z.append(codes if isinstance(codes, torch.Tensor) else codes.to_dense())
        seq.append(shard["sequence"].long())
        pos.append(shard["position"].long())
    return torch.cat(z).clamp_min(0), torch.cat(seq), torch.cat(pos)


def brute_top(z, seq, pos, n):
    """Per latent: [(value, sequence, position)] of the n best sequences (max per sequence, earliest position
    on ties; between sequences the higher value, then the earlier row)."""
    out = []
    for j in range(z.shape[1]):
        cands = []
        for s in seq.unique().tolist():
            rows = (seq == s).nonzero().squeeze(1)
            v = z[rows, j]
            if v.max() > 0:
                r = int(rows[int((v == v.max()).nonzero()[0])])  # earliest row holding the maximum
                cands.append((float(z[r, j]), r, s, int(pos[r])))
        cands.sort(key=lambda c: (-c[0], c[1]))
        out.append([(v, s, p) for v, _, s, p in cands[:n]])
    return out


def dense_window(z, seq, pos, j, s, start, width):
    acts = torch.zeros(width)
    for r in (seq == s).nonzero().squeeze(1).tolist():
        if start <= pos[r] < start + width:
            acts[pos[r] - start] = z[r, j]
    return acts


@pytest.mark.parametrize("kind", ["relu", "rounded ties", "topk"])
def test_streaming_top_n_equals_brute_force(store, tmp_path, kind):
    sae = make_sae(d_in=32, d_sae=37, activation="topk", k=5) if kind == "topk" else make_sae(d_in=32, d_sae=37)
    dec = Rounded(sae) if kind == "rounded ties" else sae
    cache = collect_features(dec, StoreSource(store, SITE, windows()), tmp_path, CFG, progress=False)
    z, seq, pos = dense_codes(dec, store)
    expected = brute_top(z, seq, pos, CFG.top)
    if kind == "rounded ties":
        assert sum(len(e) for e in expected) > 0 and any(len({v for v, _, _ in e}) < len(e) for e in expected)
    ids = windows()
    W = CFG.before + 1 + CFG.after
    for j in range(37):
        got = cache.top(j)
        assert [(ex.window, ex.meta["position"]) for ex in got] == [(s, p) for _, s, p in expected[j]], j
        for ex, (v, s, p) in zip(got, expected[j], strict=True):
            assert ex.max_activation == v and ex.activations[p - ex.start] == v
            assert ex.start == min(max(p - CFG.before, 0), ids.shape[1] - W) and len(ex.token_ids) == W
            assert ex.token_ids == ids[s, ex.start:ex.start + W].tolist()  # BOS/EOS included, from the windows
            torch.testing.assert_close(torch.tensor(ex.activations), dense_window(z, seq, pos, j, s, ex.start, W),
                                       rtol=0, atol=0)
        on = z[:, j] > 0
        stats = cache.stats(j)
        assert stats["count"] == int(on.sum()) and stats["density"] == int(on.sum()) / z.shape[0]
        if on.any():
            assert stats["max_activation"] == float(z[on, j].max())
            assert stats["mean_activation"] == pytest.approx(float(z[on, j].double().mean()), rel=1e-12)
            edges, counts = cache.histogram(j)
            top = float(edges[-1])
            assert top / 2 <= stats["max_activation"] < top  # the smallest power of two above the maximum
            assert torch.equal(counts, torch.histc(z[on, j].double(), bins=CFG.histogram_bins, min=0, max=top).long())


def test_samples_are_other_sequences_labelled_by_quantile(store, tmp_path):
    sae = make_sae(d_in=32, d_sae=37)
    cache = collect_features(sae, StoreSource(store, SITE, windows()), tmp_path, CFG, progress=False)
    z, seq, pos = dense_codes(sae, store)
    for j in range(37):
        top = {ex.window for ex in cache.top(j)}
        samples = cache.samples(j)
        fired = {s for s in seq.unique().tolist() if z[seq == s, j].max() > 0}
        assert len(samples) == min(CFG.samples, len(fired - top))
        assert {ex.window for ex in samples} <= fired - top and len({ex.window for ex in samples}) == len(samples)
        values = [ex.max_activation for ex in samples]
        assert values == sorted(values, reverse=True)
        for ex in samples:
            assert ex.max_activation == float(z[seq == ex.window, j].max())
        q = [ex.meta["quantile"] for ex in samples]
        assert q == sorted(q, reverse=True) and (not q or (q[-1] == 0 and q[0] == min(CFG.quantiles, len(q)) - 1))


def test_random_pool_activations_are_exact(store, tmp_path):
    sae = make_sae(d_in=32, d_sae=37)
    cache = collect_features(sae, StoreSource(store, SITE, windows()), tmp_path, CFG, progress=False)
    z, seq, pos = dense_codes(sae, store)
    W = CFG.before + 1 + CFG.after
    for j in (0, 5, 36):
        examples = cache.random_examples(j, 4, seed=j)
        assert len(examples) == 4 and len({(e.window, e.start) for e in examples}) == 4
        for ex in examples:
            assert ex.token_ids == windows()[ex.window, ex.start:ex.start + W].tolist()
            assert ex.activations == dense_window(z, seq, pos, j, ex.window, ex.start, W).tolist()
        assert cache.random_examples(j, 4, seed=j) == examples  # seeded
        quiet = cache.random_examples(j, 3, seed=1, nonactivating=True)
        assert all(ex.max_activation == 0 for ex in quiet)


def test_interrupted_pass_resumes_to_the_same_cache(store, tmp_path):
    sae = make_sae(d_in=32, d_sae=37, activation="topk", k=4)
    source = StoreSource(store, SITE, windows())
    assert source.n_chunks >= 4
    full = collect_features(sae, source, tmp_path / "full", CFG, progress=False)
    with pytest.raises(KeyboardInterrupt):
        collect_features(sae, source, tmp_path / "cut", CFG, progress=False, stop_after=2)
    assert not (tmp_path / "cut" / "features.json").exists()
    with pytest.raises(ValueError, match="other settings"):
        collect_features(make_sae(d_in=32, d_sae=37, seed=5), source, tmp_path / "cut", CFG, progress=False)
    resumed = collect_features(sae, source, tmp_path / "cut", CFG, progress=False)
    assert resumed.tensors.keys() == full.tensors.keys()
    for key, value in full.tensors.items():
        assert torch.equal(resumed.tensors[key], value), key
    assert not (tmp_path / "cut" / "partial").exists()
    with pytest.raises(FileExistsError):  # a finished cache is not silently replaced by another dictionary's
        collect_features(make_sae(d_in=32, d_sae=37, seed=5), source, tmp_path / "cut", CFG, progress=False)


def test_model_source_matches_the_store(tiny, store, tmp_path):
    sae = make_sae(d_in=32, d_sae=37)
    from_store = collect_features(sae, StoreSource(store, SITE, windows()), tmp_path / "a", CFG, progress=False)
    source = ModelSource(tiny[0], SITE, windows(), batch_size=4, chunk_windows=5)
    from_model = collect_features(sae, source, tmp_path / "b", CFG, progress=False)
    assert from_model.tokens_seen == from_store.tokens_seen == store.tokens
    assert torch.equal(from_model.tensors["count"], from_store.tensors["count"])
    for key in ("top.sequence", "top.position", "top.tokens"):
        assert torch.equal(from_model.tensors[key], from_store.tensors[key]), key
    torch.testing.assert_close(from_model.tensors["top.acts"], from_store.tensors["top.acts"])


def test_store_without_windows_marks_left_out_tokens(store, tmp_path):
    cache = collect_features(make_sae(d_in=32, d_sae=37), StoreSource(store, SITE), tmp_path, CFG, progress=False)
    t = cache.tensors
    valid = t["top.sequence"] >= 0
    cols = t["top.start"][valid][:, None] + torch.arange(CFG.before + 1 + CFG.after)
    truth = windows()[t["top.sequence"][valid][:, None], cols]  # (K, W)
    got = t["top.tokens"][valid].long()
    assert torch.equal(got == -1, truth <= 2)  # the store left out BOS, EOS and pad
    assert torch.equal(got[got >= 0], truth[got >= 0]) and (got == -1).any()
    with pytest.raises(ValueError, match="windows"):
        StoreSource(store, SITE, windows()[:, :5])
    with pytest.raises(ValueError, match="differ"):
        next(StoreSource(store, SITE, windows(seed=1)).chunks())


def test_baselines_are_read_the_same_way(store, tmp_path):
    from fastsae.evaluation.baselines import fit

    x = torch.cat([store.load_shard(i)[SITE] for i in range(len(store.shards))])
    pca = fit("pca", x, 8, 3)
    cache = collect_features(SplitSigns(pca), StoreSource(store, SITE, windows()), tmp_path, CFG, progress=False)
    assert cache.d_sae == 16
    c = pca.encode(x)
    assert torch.equal(cache.tensors["count"], torch.cat([(c > 0).sum(0), (c < 0).sum(0)]))
    assert cache.neighbours(0)[0][1] == pytest.approx(0.0, abs=1e-5)  # PCA directions are orthogonal...
    assert 8 in [j for j, _ in cache.neighbours(0)] or cache.neighbours(0)[-1][1] > -1.01  # ...and -v is 8
    assert cache.top(0)[0].max_activation == pytest.approx(float(c[:, 0].max()))


def test_cache_round_trips_and_refuses_bad_input(store, tmp_path):
    sae = make_sae(d_in=32, d_sae=37)
    cache = collect_features(sae, StoreSource(store, SITE, windows()), tmp_path, CFG, progress=False)
    again = FeatureCache.load(tmp_path)
    assert again.meta == cache.meta and all(torch.equal(again.tensors[k], v) for k, v in cache.tensors.items())
    assert isinstance(again.top(3)[0], Example)
    assert again.meta["ties"].startswith("higher activation first")
    for bad in (-1, 37, 2.0):
        with pytest.raises(ValueError, match="latent"):
            again.top(bad)
    meta = (tmp_path / "features.json").read_text().replace('"format_version": 1', '"format_version": 99', 1)
    (tmp_path / "features.json").write_text(meta)
    with pytest.raises(ValueError, match="format_version"):
        FeatureCache.load(tmp_path)
    with pytest.raises(ValueError, match="histogram_bins"):
        FeatureConfig(histogram_bins=6)
    with pytest.raises(ValueError, match="top"):
        FeatureConfig(top=0)


def test_best_n_merges_like_one_sort():
    """Merging chunk by chunk equals one stable selection over the whole stream."""
    gen = torch.Generator().manual_seed(0)
    lat = torch.randint(0, 7, (500,), generator=gen)
    key = torch.randint(0, 6, (500,), generator=gen).float()  # many ties
    best = BestN(7, 5, torch.float32, {"i": ((), torch.int64, -1)})
    for first in range(0, 500, 37):
        sl = slice(first, first + 37)
        best.merge(lat[sl], key[sl], lambda i, f=first: {"i": i + f})
    once = best_per_latent(lat, key, 5, 7)
    assert torch.equal(best.payload["i"], once)
    assert torch.equal(best.keys, torch.where(once >= 0, key[once.clamp_min(0)], float("-inf")))


def test_hash_is_spread_and_deterministic():
    a = torch.arange(100_000)
    h = hash32(a, 3, seed=1)
    assert torch.equal(h, hash32(a, 3, seed=1)) and not torch.equal(h, hash32(a, 3, seed=2))
    assert h.min() >= 0 and h.max() < 2**32 and h.unique().numel() > 99_990
    counts = torch.bincount((h >> 28).long(), minlength=16).double()  # 16 equal bins of the 32-bit range
    assert (counts / counts.mean() - 1).abs().max() < 0.05


def test_active_entries_refuse_other_outputs():
    class Bad:
        d_codes = 3

        def encode(self, x):
            return [1, 2]

    with pytest.raises(TypeError, match="SparseLatents or a Tensor"):
        active_entries(Bad(), torch.zeros(2, 4))


def test_row_lookup_scan_and_search_agree_with_dense():
    from fastsae.analysis.features.feature_pass_state import _RowLookup

    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(9, 11, generator=gen) * (torch.rand(9, 11, generator=gen) < 0.3)
    row, lat = dense.nonzero(as_tuple=True)
    lookup = _RowLookup(row, lat, dense[row, lat], 9, 11)
    rows = torch.randint(-1, 9, (40, 5), generator=gen)
    latent = torch.randint(0, 11, (40,), generator=gen)
    expected = torch.where(rows >= 0, dense[rows.clamp_min(0), latent[:, None]], 0.0)
    assert torch.equal(lookup(rows, latent), expected)  # many queries: binary search
    assert torch.equal(lookup(rows[:1, :2], latent[:1]), expected[:1, :2])  # few: row scan
    lookup.BLOCK = 3  # several blocks
    assert torch.equal(lookup(rows[:2, :1], latent[:2]), expected[:2, :1])


@pytest.mark.parametrize("kind", ["float", "float with negatives", "int64", "wide groups (two sorts)"])
def test_stable_order_is_group_then_key_descending_then_input_order(kind):
    from fastsae.analysis.features.topn import stable_order

    gen = torch.Generator().manual_seed(1)
    group = torch.randint(0, 5, (300,), generator=gen)
    key = (torch.randint(0, 7, (300,), generator=gen) * 0.25)
    if kind == "float with negatives":
        key = key - 1.0
        key[::17] = float("-inf")
    if kind == "int64":
        key = -torch.randint(0, 2**32, (300,), generator=gen)
        key[::13] = key[0]
    if kind == "wide groups (two sorts)":
        group = group * 2**40
    order = stable_order(group, key)
    expected = sorted(range(300), key=lambda i: (int(group[i]), -float(key[i]), i))
    assert order.tolist() == expected


def test_contexts_gathered_in_blocks_are_the_same(store, tmp_path, monkeypatch):
    from fastsae.analysis.features import feature_pass_state

    sae = make_sae(d_in=32, d_sae=37)
    whole = collect_features(sae, StoreSource(store, SITE, windows()), tmp_path / "a", CFG, progress=False)
    monkeypatch.setattr(feature_pass_state, "CONTEXT_BLOCK", 7)  # one context per block
    blocks = collect_features(sae, StoreSource(store, SITE, windows()), tmp_path / "b", CFG, progress=False)
    assert all(torch.equal(blocks.tensors[k], v) for k, v in whole.tensors.items())
