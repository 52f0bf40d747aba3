"""The SAEBench-style metrics on cases whose answer is known: the torch logistic regression against
scikit-learn's, absorption of one letter by token-specific latents (and none without them), and sparse probing
where one latent carries the label exactly."""

import math

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.evaluation import absorption as ab
from fastsae.evaluation import logistic_probe as lp
from fastsae.evaluation import sparse_probing as sp


@pytest.mark.parametrize("balanced", [False, True])
def test_logistic_regression_matches_scikit_learn(balanced):
    sklearn = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(57, 7, generator=gen, dtype=torch.float64) * 30  # activation-sized values
    y = (x[:, 0] + 20 * torch.randn(57, generator=gen, dtype=torch.float64) > 15).long()  # unbalanced, noisy
    w, b = lp.fit_logistic(x, y, C=0.5, balanced=balanced)
    ref = sklearn.LogisticRegression(C=0.5, class_weight="balanced" if balanced else None, tol=1e-10,
                                     max_iter=10_000).fit(x.numpy(), y.numpy())
    torch.testing.assert_close(w, torch.from_numpy(ref.coef_[0]), rtol=1e-4, atol=1e-6)
    assert b == pytest.approx(float(ref.intercept_[0]), rel=1e-4, abs=1e-6)


def test_logistic_helpers_refuse_bad_input_and_handle_one_class():
    with pytest.raises(ValueError, match="y must be"):
        lp.fit_logistic(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        lp.fit_logistic(torch.full((4, 2), float("nan")), torch.zeros(4))
    with pytest.raises(ValueError, match="k must be"):
        lp.top_mean_diff(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), 3)
    w, b = lp.fit_logistic(torch.randn(5, 3), torch.ones(5))
    assert w.abs().sum() == 0 and b > 0
    assert lp.f1(torch.tensor([True, False]), torch.tensor([0, 1])) == 0.0
    assert lp.f1(torch.tensor([True, True, False]), torch.tensor([1, 0, 1])) == pytest.approx(0.5)


# ---- absorption: letters a, b, c on dims 0-2; three test words of "a" carry a marker (dims 3-5) ---------------
D, NOISE = 16, 0.05


def _words(gen, letter, n, marker=None):
    x = torch.zeros(n, D)
    x[:, letter] = 1.0
    x[:, 6:] = NOISE * torch.randn(n, D - 6, generator=gen)
    if marker is not None:
        x[torch.arange(len(marker)), torch.tensor(marker)] = 1.0
    return x


def _data():
    gen = torch.Generator().manual_seed(0)
    x_train = torch.cat([_words(gen, c, 30) for c in range(3)])
    x_test = torch.cat([_words(gen, 0, 10, marker=[3, 4, 5])] + [_words(gen, c, 10) for c in (1, 2)])
    labels = torch.arange(3).repeat_interleave
    return x_train, labels(30), x_test, labels(10)


def _sae(absorbed: bool):
    """ReLU latents 0-2: the letters; 3-5: one per marker; 6-7: noise dims. absorbed: latent 0 is silenced by
    the markers and each marker's latent decodes toward letter a, as a token-specific latent that absorbed it."""
    sae = SAE(SAEConfig(D, 8), seed=0)
    eye = torch.eye(D)
    enc = torch.stack([eye[0], eye[1], eye[2], eye[3], eye[4], eye[5], eye[6], eye[7]])
    dec = enc.clone()
    if absorbed:
        enc[0] -= 5 * (eye[3] + eye[4] + eye[5])
        dec[3:6] = (eye[0] + eye[3:6]) / math.sqrt(2)
    with torch.no_grad():
        sae.W_enc.copy_(enc)
        sae.W_dec.copy_(dec)
        sae.b_enc.fill_(-0.2)
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("absorbed", [True, False])
def test_absorption_detects_a_letter_absorbed_by_token_latents(absorbed):
    x_train, y_train, x_test, y_test = _data()
    probes = ab.letter_probes(x_train, y_train, x_test, y_test, 3)
    assert all(f1 == 1.0 for _, _, f1 in probes)
    words = [f"w{i}" for i in range(len(y_test))]
    r = ab.absorption_scores(_sae(absorbed), probes, x_train, y_train, x_test, y_test, list("abc"), words)
    assert r["letters"] == 3 and r["skipped_letters"] == {}
    assert [r["per_letter"][c]["main_latents"] for c in "abc"] == [[0], [1], [2]]
    assert all(r["per_letter"][c]["probe_true_positives"] == 10 for c in "abc")
    a = r["per_letter"]["a"]
    if absorbed:  # 3 of a's 10 test words: fully absorbed, each by its own latent
        assert a["absorption_fraction"] == pytest.approx(0.3) and a["full_absorption"] == pytest.approx(0.3)
        assert a["fully_absorbed_words"] == ["w0", "w1", "w2"]
        assert r["mean_absorption_fraction"] == pytest.approx(0.1) and r["mean_full_absorption"] == pytest.approx(0.1)
    else:
        assert a["absorption_fraction"] == 0 and a["full_absorption"] == 0
        assert r["mean_absorption_fraction"] == 0 and r["mean_full_absorption"] == 0
    for c in "bc":
        assert r["per_letter"][c]["absorption_fraction"] == 0 and r["per_letter"][c]["full_absorption"] == 0


def test_word_absorption_partial_fraction():
    """The main latent carries 0.3 of the probe projection P = 1 and an aligned latent 0.6: SAEBench's
    A / (A + M) with A = min(0.6, P - M) = 0.6, so 2/3, and not full absorption (the main latent fired)."""
    p = torch.tensor([1.0, 0.0])
    x = torch.tensor([[1.0, 0.0]])
    z = torch.tensor([[0.3, 1.2, 0.0]])
    cos = torch.tensor([1.0, 0.5, 0.9])
    fraction, full = ab.word_absorption(x, z, p, cos, [0])
    assert fraction.item() == pytest.approx(2 / 3) and not full.item()


def test_first_letter_vocab_of_a_tiny_tokenizer():
    from fastsae.model.loading import char_tokenizer

    from helpers import word_level_lm

    _, tok = word_level_lm(["apple", "Ant", "b2b", "café", "zoo", "x"])
    assert {tok.convert_ids_to_tokens(i): c for i, c in ab.first_letter_vocab(tok).items()} == {
        "apple": "a", "Ant": "a", "zoo": "z", "x": "x"}
    letters = ab.first_letter_vocab(char_tokenizer())
    assert set(letters.values()) <= set("abcdefghijklmnopqrstuvwxyz") and len(letters) >= 26


# ---- sparse probing ---------------------------------------------------------------------------------------------
def test_sparse_probing_one_latent_carries_the_label():
    gen = torch.Generator().manual_seed(0)
    n = 120
    labels = [("prose", "verse", "code")[i % 3] for i in range(n)]
    y = torch.tensor([("prose", "verse", "code").index(c) for c in labels])
    sae = torch.rand(n, 40, generator=gen) * (torch.rand(n, 40, generator=gen) < 0.1)  # sparse noise latents
    sae[:, 17] = (y == 1).float() * 2  # latent 17 is "verse" exactly
    sae[:, 5] = (y == 0).float() * 3
    codes = {"activations": torch.randn(n, 8, generator=gen), "sae": sae, "noise": torch.randn(n, 40, generator=gen)}
    r = sp.probe_task(codes, torch.arange(n), labels, ks=(1, 2, 5))
    assert r["classes"] == ["code", "prose", "verse"] and r["dropped_classes"] == []
    assert r["train_windows"] + r["test_windows"] == n
    assert r["per_class"]["verse"]["sae"][1] == 1.0 and r["per_class"]["prose"]["sae"][1] == 1.0
    assert r["accuracy"]["sae"][2] == 1.0  # "code": neither latent fires, and two together separate it
    assert r["accuracy"]["noise"][1] < 0.8 and r["full_probe_accuracy"] < 0.8


def test_sparse_probing_splits_by_document_and_drops_small_classes():
    split, dropped = sp.split_documents(["a"] * 10 + ["b"] * 3 + ["c"] + [None], seed=0)
    assert dropped == ["c"] and set(split) == {"a", "b"}
    assert [len(split["a"][1]), len(split["b"][1])] == [2, 1]
    for train, test in split.values():
        assert not set(train) & set(test)
    r = sp.probe_task({"activations": torch.randn(4, 2), "x": torch.randn(4, 2)}, torch.arange(4),
                      ["a", "a", "b", None], ks=(1,))
    assert "skipped" in r and r["dropped_classes"] == ["b"]
