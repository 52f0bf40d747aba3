"""`fastsae eval --metrics absorption,sparse-probing` end to end on a tiny word-level model whose embeddings
carry each word's first letter, with a tiny corpus whose records carry a source and a kind."""

import json

import pytest
import torch

from fastsae.cli import main

from helpers import cli_error, word_level_lm

pytest.importorskip("transformers")

SUFFIXES = ("ab", "ce", "di", "fo", "gu", "ha", "ik", "lo", "mu", "ne", "pi", "ro")
LETTERS = "abcde"


@pytest.fixture
def labelled(tmp_path):
    words = [c + s for c in LETTERS for s in SUFFIXES]
    model, tok = word_level_lm(words + ["has", "the", "first", "letter", ":"] + list(LETTERS.upper()))
    gen = torch.Generator().manual_seed(0)
    letter_dirs = torch.randn(26, 32, generator=gen)
    with torch.no_grad():  # a first-letter direction in every word's embedding, so that probes can find it
        for word, i in tok.get_vocab().items():
            if word.isalpha():
                model.gpt_neox.embed_in.weight[i] += letter_dirs[ord(word[0].lower()) - 97]
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rows = []
    for doc in range(20):
        pool = words[:24] if doc % 2 else words[24:]  # source alpha: words of a and b; beta: c, d and e
        picks = torch.randint(len(pool), (60,), generator=gen).tolist()
        rows.append({"text": " ".join(pool[j] for j in picks), "source": "alpha" if doc % 2 else "beta",
                     "kind": "verse" if doc % 4 < 2 else "prose"})
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_eval_metrics_absorption_and_sparse_probing(labelled, capsys):
    d = labelled
    assert main(["harvest", "--model", str(d / "lm"), "--corpus", str(d / "corpus.jsonl"), "--sites",
                 "resid_post.1", "--tokens", "1024", "--context-size", "32", "--dtype", "float32", "--out",
                 str(d / "store"), "--no-progress"]) == 0
    assert main(["train", "--data", str(d / "store"), "--activation", "topk", "--k", "4", "--d-sae", "64",
                 "--steps", "4", "--batch-size", "64", "--out", str(d / "sae"), "--no-progress"]) == 0
    assert "metrics must be among" in cli_error(capsys, ["eval", "--sae", str(d / "sae"), "--metrics", "absorbtion",
                                                         "--out", str(d / "bad"), "--no-progress"])
    capsys.readouterr()
    assert main(["eval", "--sae", str(d / "sae"), "--tokens", "128", "--baselines", "pca", "neurons",
                 "--fit-tokens", "256", "--metrics", "absorption,sparse-probing", "--out", str(d / "eval"),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "## Absorption (first-letter task)" in printed and "## Sparse probing" in printed
    report = json.loads((d / "eval" / "metrics.json").read_text())
    assert (d / "eval" / "report.md").read_text().strip() == printed.split("report: ")[0].strip()
    a = report["absorption"]
    assert "SAEBench" in a["definition"] and a["letters"] == list(LETTERS)  # h, t, f, l: one word each
    assert a["skipped_letters"]["h"] == "1 words < 10" and a["words"] == 65
    (name,) = a["per_sae"]
    r = a["per_sae"][name]
    assert r["letters"] >= 3, r["skipped_letters"]  # the embeddings' letter directions make the probes work
    assert 0 <= r["mean_absorption_fraction"] <= 1 and 0 <= r["mean_full_absorption"] <= 1
    s = report["sparse_probing"]
    assert "SAEBench" in s["definition"] and s["ks"] == [1, 2, 5, 20] and s["documents"] == 20
    source = s["tasks"]["source"]
    assert source["classes"] == ["alpha", "beta"] and set(source["accuracy"]) == {name, "pca", "neurons"}
    assert source["full_probe_accuracy"] == 1.0  # the two sources share no word
    assert all(0 <= acc <= 1 for per_k in source["accuracy"].values() for acc in per_k.values())
    assert set(s["tasks"]["kind"]["classes"]) == {"prose", "verse"}
    # without --metrics: today's report, no new sections
    assert main(["eval", "--sae", str(d / "sae"), "--tokens", "128", "--baselines", "none", "--out",
                 str(d / "plain"), "--no-progress"]) == 0
    plain = json.loads((d / "plain" / "metrics.json").read_text())
    assert set(plain) == {"meta", "results"} and not (d / "plain" / "report.md").exists()
