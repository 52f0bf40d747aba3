"""Circuits by ablation on a tiny random model: edges are exact ablation effects, the picture links to the
feature browser."""

import json

import pytest
import torch

from fastsae.analysis.features.feature_contexts import Example
from fastsae.analysis.interventions import circuit_ablation
from fastsae.analysis.interventions.latent_edits import SAEDictionary, intervene
from fastsae.model import random_causal_lm

from conftest import make_sae

pytest.importorskip("transformers")
SITES = ("resid_post.0", "resid_post.1", "resid_post.2")


@pytest.fixture(scope="module")
def setup():
    model, tok = random_causal_lm(num_layers=3)
    saes = {site: make_sae(32, 40, "topk", k=5, seed=i) for i, site in enumerate(SITES)}
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(4, 60, (10, 9), generator=gen)
    windows[:, 0] = tok.bos_token_id
    return model, tok, saes, windows


def _activations(model, site, sae, ids, latent, edit=None):
    """(S, T) latent's values at site, with an optional (site, sae, latent) zero-ablation below."""
    with torch.no_grad(), intervene(model, site, sae, record=True) as iv:
        if edit is None:
            model(input_ids=ids)
        else:
            with intervene(model, edit[0], edit[1], zero=[edit[2]], positions=ids != 1):
                model(input_ids=ids)
    return SAEDictionary(sae).values(iv.codes[0], torch.tensor([latent]))[..., 0]


def test_top_contexts_are_the_windows_where_the_latent_peaks(setup):
    model, _, saes, windows = setup
    site, sae = SITES[2], saes[SITES[2]]
    counts = torch.stack([(_activations(model, site, sae, windows, i) > 0).sum() for i in range(40)])
    latent = int(counts.argmax())  # the busiest latent: its peaks differ between windows
    peaks = (_activations(model, site, sae, windows, latent) * (windows != 1)).amax(-1)
    got = circuit_ablation.top_contexts(model, site, sae, latent, windows, n=3, batch_size=4)
    assert torch.equal(got, windows[peaks.argsort(descending=True)[:3]])


def test_edges_are_the_exact_effect_of_ablating_the_child(setup, tmp_path):
    model, tok, saes, windows = setup
    site, sae = SITES[2], saes[SITES[2]]
    counts = torch.stack([(_activations(model, site, sae, windows, i) > 0).sum() for i in range(40)])
    root = int(counts.argmax())
    graph = circuit_ablation.circuit(model, saes, (site, root), windows, depth=2, keep=2, candidates=4, tokenizer=tok,
                             browsers={site: "../browser7", SITES[1]: "../browser6"})
    assert graph["root"] == f"2_{root}" and graph["forwards"] == 1 + (1 + 4) * 3  # root, then 3 expansions
    layers = sorted({n["site"] for n in graph["nodes"]})
    assert layers == sorted(SITES)
    edges_into_root = [e for e in graph["edges"] if e["target"] == graph["root"]]
    assert len(edges_into_root) == 2 and len(graph["edges"]) <= 2 + 4
    # recompute one edge by hand: the root's activation summed up to its peak in each context
    z = _activations(model, site, sae, windows, root) * (windows != 1)
    span = (windows != 1) & (torch.arange(9)[None] <= z.argmax(-1)[:, None])
    base = float((z * span).sum())
    edge = edges_into_root[0]
    child = int(edge["source"].split("_")[1])
    ablated = _activations(model, site, sae, windows, root, edit=(SITES[1], saes[SITES[1]], child))
    assert edge["effect"] == pytest.approx((base - float((ablated * span).sum())) / base, abs=1e-5)
    assert edge["effect"] >= edges_into_root[1]["effect"]
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert nodes[graph["root"]]["href"] == f"../browser7/feature.html#{root}"
    assert all(len(n["top_tokens"]) >= 1 for n in graph["nodes"])
    json.dumps(graph)
    png, svg = circuit_ablation.draw(graph, tmp_path / "circuit.png")
    assert png.stat().st_size > 1000 and f"../browser7/feature.html#{root}" in svg.read_text()
    (path,) = circuit_ablation.annotate(graph, {site: tmp_path / "cache"}, picture="circuit.svg")
    note = json.loads(path.read_text())["features"][str(root)]
    assert note["text"].startswith(f"In the circuit of 2_{root}") and note["links"][0]["href"] == "circuit.svg"
    circuit_ablation.save(graph, tmp_path / "circuit.json")
    assert json.loads((tmp_path / "circuit.json").read_text())["root"] == graph["root"]


def test_circuit_refuses_a_root_that_never_fires(setup):
    model, tok, saes, windows = setup
    with pytest.raises(ValueError, match="has no SAE"):
        circuit_ablation.circuit(model, saes, ("resid_post.9", 0), windows)
    dead = make_sae(32, 40, "topk", k=5)
    with torch.no_grad():
        dead.b_enc[3] = -1e6
    with pytest.raises(ValueError, match="never fires"):
        circuit_ablation.circuit(model, {**saes, SITES[2]: dead}, (SITES[2], 3), windows)


def test_contexts_from_examples_get_bos_and_left_padding(setup):
    _, tok, _, _ = setup
    examples = [Example([5, 6, 7], ["a", "b", "c"], [0.0, 1.0, 0.0]), Example([8, 9], ["d", "e"], [2.0, 0.0])]
    batch = circuit_ablation.as_batch(examples, tok)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7], [0, 1, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
