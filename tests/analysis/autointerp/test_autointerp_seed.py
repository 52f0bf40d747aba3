"""Autointerp by the seed's protocol (issue 28, item 5): the top-and-random score beside the stratified one,
held-out top contexts apart from the explainer's, and `--backend openai --base-url` against the stub server."""

import dataclasses
import json
import random

import pytest
from autointerp_fakes import StubServer, cat_feature, context

from fastsae.analysis.autointerp.context_sources import save_examples
from fastsae.analysis.autointerp.interpret import AutointerpConfig, _key, split, top_and_random


def _with_any(seed=0):
    rng = random.Random(seed + 50)
    f = cat_feature(seed=seed, n_top=20)
    # unfiltered: random contexts, some of which the feature fires on
    return dataclasses.replace(f, random_any=[context(rng, 20, rng.random() < 0.3, 300 + w) for w in range(10)])


def test_held_out_top_contexts_never_overlap_the_explainers():
    f = _with_any()
    cfg = AutointerpConfig()
    parts = split(f, cfg)
    shown = {(x.window, tuple(x.token_ids)) for x in parts["explain_top"] + parts["explain_random"]}
    held = {(x.window, tuple(x.token_ids)) for x in parts["held_top"] + parts["random_any"]}
    assert parts["held_top"] and parts["random_any"] and not shown & held
    assert {_key(x)[0] for x in parts["held_top"]} == set(range(cfg.explain_top, 20))


def test_top_and_random_is_1_for_a_perfect_simulator_and_near_0_for_a_random_one():
    f = _with_any()
    cfg = AutointerpConfig()
    parts = split(f, cfg)
    truth = {tuple(x.tokens): x.activations for x in parts["held_top"] + parts["random_any"]}
    perfect = top_and_random(lambda toks: [list(truth[tuple(t)]) for t in toks], parts, cfg)
    assert perfect["score"] == pytest.approx(1.0) and perfect["contexts"] == 10
    rng = random.Random(0)
    scores = [top_and_random(lambda toks: [[rng.random() for _ in t] for t in toks], parts, cfg)["score"]
              for _ in range(40)]
    assert abs(sum(scores) / len(scores)) < 0.05
    empty = top_and_random(lambda toks: [], split(cat_feature(), cfg), cfg)
    assert empty["score"] is None and "unfiltered" in empty["note"]


def test_openai_base_url_command_against_the_stub(tmp_path, monkeypatch, capsys):
    from fastsae.cli import main

    monkeypatch.setenv("FASTSAE_TEST_KEY", "k")
    examples = tmp_path / "examples.json"
    save_examples(examples, {"sae/0": _with_any(0), "random/1": _with_any(1)})
    with StubServer(echo=True, chat_logprobs=True) as server:
        assert main(["autointerp", "--examples", str(examples), "--backend", "openai", "--base-url", server.url,
                     "--model", "oracle-1", "--api-key-env", "FASTSAE_TEST_KEY", "--features", "all",
                     "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sim = report["features"]["sae/0"]["simulation"]
    assert sim["protocol"].startswith("stratified") and sim["top_and_random"]["score"] == pytest.approx(1.0)
    assert set(report["summary"]) == {"sae", "random"}
    assert report["summary"]["sae"]["simulation_top_and_random"]["mean"] == pytest.approx(1.0)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "top-and-random" in summary and "random unit directions" in summary
    capsys.readouterr()
    assert main(["autointerp", "--examples", str(examples), "--base-url", server.url, "--out",
                 str(tmp_path / "x")]) == 2
    assert "--base-url is for --backend openai" in capsys.readouterr().err
