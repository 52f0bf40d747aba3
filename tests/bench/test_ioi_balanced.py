"""bench.ioi_balanced: the name-balanced corpus (who is replaced, by whom, how much) and the measurement's parts."""

import json
import random
import re

import torch

from bench import ioi_balanced, ioi_names
from fastsae.analysis.interventions import ioi
from fastsae.harvest.store import ActivationStore, StoreWriter

from conftest import make_sae
from helpers import word_level_lm

SITE = "resid_post.1"
FILLER = "the cat sat on a mat and it was warm .".split()


def _documents(rng: random.Random) -> list[str]:
    """Documents of filler sentences, a third of them holding John and Mary (sources) or Kyle (rare)."""
    docs = []
    for i in range(60):
        sentences = [" ".join(rng.choices(FILLER[:-1], k=8)) + " ." for _ in range(6)]
        if i % 3 == 0:
            sentences[1] = "John told Mary that the cat sat ."
            sentences[4] = "Then John left ."
        if i % 10 == 0:
            sentences[2] = "Kyle was warm ."
        docs.append(" ".join(sentences))
    return docs


def _read(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_the_balanced_corpus_replaces_source_names_consistently(tmp_path, monkeypatch):
    _, tok = word_level_lm([*FILLER, *ioi.vocabulary(), "Then", "told", "that", "left", "was"])
    monkeypatch.setattr(ioi_balanced, "SOURCE_MIN", 10)
    docs = _documents(random.Random(0))
    meta = ioi_balanced.build(tok, docs, tmp_path, tokens=2000)
    assert set(meta["sources"]) == {"John", "Mary"}  # 40 and 20 occurrences; Kyle's 6 are below SOURCE_MIN
    control, balanced = _read(tmp_path / "control.jsonl"), _read(tmp_path / "balanced.jsonl")
    assert control == random.Random(0).sample(docs, len(docs))[:len(control)]  # the seeded order, a prefix
    base = meta["balanced"]["documents"]
    assert balanced[:base] == control[:base]  # the balanced corpus keeps the first half of the control's
    assert meta["control"]["tokens"] >= 2000 * ioi_balanced.SLACK
    assert meta["balanced"]["passage_tokens"] >= 1000 * ioi_balanced.SLACK
    names = set(ioi.single_token_names(tok))
    for passage in balanced[base:]:
        sentences = passage.split(" . ")
        assert len(sentences) == 2  # only the two sentences that held a source name
        told, left = re.fullmatch(r"(\w+) told (\w+) that the cat sat", sentences[0]), sentences[1]
        assert told and told[1] != told[2] and {told[1], told[2]} <= names  # distinct people, IOI names
        assert left == f"Then {told[1]} left ."  # the same person as in the first sentence
    drawn = meta["balanced"]["passage_counts"]
    assert len(drawn) > len(names) // 2  # the draws spread over the names, not only the sources
    assert meta["corpus_counts"]["Kyle"] == 6


def test_passages_cycle_through_copies_with_fresh_draws():
    pattern_sources, targets = ["John"], ["Adam", "Eric", "Sean", "Kyle"]
    texts = ["John ran. The dog sat.", "No name here.", "Later John slept."]
    stream = ioi_balanced.passages(texts, pattern_sources, targets, seed=3)
    first = [next(stream) for _ in range(8)]  # two documents hold the source: four copies
    assert all(re.fullmatch(r"(\w+) ran\.|Later (\w+) slept\.", p) for p in first)
    assert len(set(first)) > 2  # copies draw again
    assert not any("John" in p or "dog" in p for p in first)


def _store(path, tok, ids_list: list[int], d=32, seed=0):
    ids = torch.tensor(ids_list).view(-1, 8)
    acts = torch.randn(*ids.shape, d, generator=torch.Generator().manual_seed(seed))
    with StoreWriter(path, model="word-level", sites={SITE: d}, dtype=torch.float32, context_size=8,
                     excluded_token_ids=[], shard_rows=16) as w:
        w.add({SITE: acts}, ids, torch.ones_like(ids, dtype=torch.bool), 0)
    return ActivationStore(path), acts.reshape(-1, d)


def test_measure_reports_both_saes_counts_and_heldout_fvu(tmp_path, monkeypatch):
    model, tok = word_level_lm(list(ioi.vocabulary()))
    names = ioi.single_token_names(tok)
    name_id = {n: tok.encode(" " + n, add_special_tokens=False)[0] for n in names}
    filler = tok.convert_tokens_to_ids("the")
    control, _ = _store(tmp_path / "control", tok, [name_id[names[0]]] * 6 + [filler] * 34)
    balanced, _ = _store(tmp_path / "balanced", tok, [name_id[n] for n in names[:20]] + [filler] * 28, seed=1)
    heldout, x = _store(tmp_path / "heldout", tok, [filler] * 48, seed=2)
    monkeypatch.setattr(ioi_names, "GROUP", 3)
    monkeypatch.setattr(ioi_names, "PROMPTS", 6)
    saes = {label: (label, SITE, make_sae(32, 96, "topk", k=8, seed=i)) for i, label in enumerate(("c", "b"))}
    out = ioi_balanced.measure(model, tok, control, balanced, heldout, saes)
    assert out["labels"] == {"c": "c", "b": "b"}
    assert out["counts"][names[0]] == 6 and out["balanced_counts"][names[0]] == 1
    assert sum(out["balanced_counts"].values()) == 20
    for label, (_, _, sae) in saes.items():
        report = out["saes"][label]
        assert {"all", "frequent", "rare"} <= set(report)
        with torch.no_grad():
            recon = sae.decode(sae.encode(x)).double()
        want = float((x.double() - recon).pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())
        assert abs(report["heldout_fvu"] - want) < 1e-6 * want
