"""bench.ioi_names: IOI names counted in a store, the SAE's error on their rows, and ceilings by frequency group."""

import math

import torch

from bench import ioi_names
from fastsae.analysis.interventions import ioi
from fastsae.harvest.store import ActivationStore, StoreWriter

from conftest import make_sae
from helpers import word_level_lm

SITE = "resid_post.1"


def _store(path, tok, counts: dict[str, int], d=32):
    """A store whose token ids hold each name counts[name] times among filler tokens, in shards of 16 rows."""
    filler = tok.convert_tokens_to_ids("the") if "the" in tok.get_vocab() else 5
    ids = [tok.encode(" " + n, add_special_tokens=False)[0] for n, c in counts.items() for _ in range(c)]
    ids += [filler] * (40 - len(ids) % 8)
    ids = torch.tensor(ids[:len(ids) // 8 * 8]).view(-1, 8)
    acts = torch.randn(*ids.shape, d, generator=torch.Generator().manual_seed(0))
    with StoreWriter(path, model="word-level", sites={SITE: d}, dtype=torch.float32, context_size=8,
                     excluded_token_ids=[], shard_rows=16) as w:
        w.add({SITE: acts}, ids, torch.ones_like(ids, dtype=torch.bool), 0)
    return ActivationStore(path), ids.flatten(), acts.reshape(-1, d)


def test_names_are_counted_and_grouped_by_frequency(tmp_path, monkeypatch):
    model, tok = word_level_lm(list(ioi.vocabulary()))
    names = ioi.single_token_names(tok)
    counts = {names[0]: 9, names[1]: 7, names[2]: 6, names[3]: 2}
    store, ids, acts = _store(tmp_path / "store", tok, counts)
    monkeypatch.setattr(ioi_names, "GROUP", 3)
    monkeypatch.setattr(ioi_names, "PROMPTS", 6)
    sae = make_sae(32, 96, "topk", k=8)
    out = ioi_names.measure(model, tok, store, {"sae": (SITE, sae)})
    assert {n: c for n, c in out["counts"].items() if c} == counts and out["store_tokens"] == len(ids)
    assert out["never_seen"] == len(names) - 4 and out["count_median"] == 0
    report = out["saes"]["sae"]
    assert report["frequent"]["names"] == names[:3]  # the most frequent first
    assert not set(report["rare"]["names"]) & set(counts)  # the least frequent: never seen
    assert set(report["relative_error"]) == set(names[:3])  # names with >= 5 rows
    first = ids == tok.encode(" " + names[0], add_special_tokens=False)[0]
    with torch.no_grad():
        x = acts[first].double()
        recon = sae.decode(sae.encode(acts[first])).double()
    mean = acts.double().mean(0)  # every row of this small store is in the sample
    want = float((x - recon).pow(2).sum() / (x - mean).pow(2).sum())
    assert math.isclose(report["relative_error"][names[0]], want, rel_tol=1e-4)
    for group in ("all", "frequent", "rare"):
        assert {"all_latents_fraction", "fvu_names", "by_positions"} <= set(report[group])
    assert "heldout_fvu" not in report  # only with a held-out store (bench.ioi_balanced's test measures it)
