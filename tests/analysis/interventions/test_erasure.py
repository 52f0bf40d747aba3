"""Concept erasure on a tiny random model: association statistics and the loss bookkeeping."""

import pytest
import torch
import torch.nn.functional as F

from fastsae.analysis.interventions import concept_leace, erasure, ioi
from fastsae.analysis.interventions.latent_edits import SAEDictionary, intervene
from fastsae.latents import SparseLatents
from fastsae.model import random_causal_lm

from conftest import make_sae
from helpers import word_level_lm

pytest.importorskip("transformers")


def test_association_finds_the_latent_that_fires_on_the_concept():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(6, 9, generator=gen) < 0.3
    keep = torch.ones(6, 9, dtype=torch.bool)
    values = torch.rand(6, 9, 4, generator=gen)
    others = torch.tensor([i for i in range(20) if i not in (7, 11)])
    indices = torch.stack([others[torch.randperm(18, generator=gen)[:4]] for _ in range(54)]).reshape(6, 9, 4)
    indices[..., 0] = torch.where(target, 7, 11)  # latent 7 only on the concept, 11 only elsewhere
    values[..., 0] = 2.0
    codes = SparseLatents(values, indices, 20)
    dictionary = SAEDictionary(make_sae(5, 20, "topk", k=4))
    scores = erasure.association(dictionary, codes, target, keep)
    assert scores.argmax() == 7 and scores.argmin() == 11
    dense = codes.to_dense()  # the sparse sums agree with a dense computation
    d1, d0 = dense[target], dense[~target]
    pooled = ((d1.var(0, unbiased=False) * len(d1) + d0.var(0, unbiased=False) * len(d0)) / 54).sqrt()
    expected = (d1.mean(0) - d0.mean(0)) / pooled.clamp_min(1e-12)
    torch.testing.assert_close(scores.float(), expected, atol=1e-5, rtol=1e-4)


def test_next_token_mask_marks_positions_before_the_class():
    windows = torch.tensor([[1, 5, 6, 5, 9], [1, 9, 9, 6, 5]])
    mask = erasure.next_token_mask(windows, [5, 6])
    assert mask.tolist() == [[True, True, True, False, False], [False, False, True, True, False]]


def test_erasure_reports_the_loss_of_the_ablated_model():
    model, tok = random_causal_lm()
    gen = torch.Generator().manual_seed(1)
    windows = torch.randint(4, 20, (6, 12), generator=gen)
    windows[:, 0] = tok.bos_token_id
    target = erasure.next_token_mask(windows, [5, 6, 7])
    sae = make_sae(32, 64, "topk", k=6)
    result = erasure.erasure(model, "resid_post.0", sae, windows, target, counts=(0, 3), fit_windows=3,
                             batch_size=4)
    assert [(r["method"], r["n"]) for r in result["rows"]] == [("sae", 0), ("sae", 3), ("pca", 0), ("pca", 3),
                                                                ("leace", 1)]
    assert all(r["directions"] == r["n"] for r in result["rows"])
    empty = result["rows"][0]
    assert empty["delta_target"] == 0 and empty["delta_other"] == 0 and empty["selectivity"] is None
    row = result["rows"][1]
    ids = windows[3:]
    keep = ids != tok.bos_token_id
    with intervene(model, "resid_post.0", sae, zero=row["latents"], positions=keep), torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    ce = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    tgt = target[3:, :-1] & keep[:, :-1]
    assert row["loss_target"] == pytest.approx(float(ce[tgt].mean()), abs=1e-5)
    assert row["loss_other"] == pytest.approx(float(ce[~target[3:, :-1] & keep[:, :-1]].mean()), abs=1e-5)
    assert row["delta_target"] == pytest.approx(row["loss_target"] - result["clean_loss_target"])
    assert result["target_positions"] == int(tgt.sum())


def test_selectivity_is_undefined_when_the_other_tokens_do_not_lose():
    # an edit that raises the target loss and lowers the others' is the most selective: never a negative ratio
    assert erasure.selectivity(0.04, -0.001) is None
    assert erasure.selectivity(0.04, 0.0) is None
    assert erasure.selectivity(0.3, 0.1) == pytest.approx(3.0)
    assert erasure.selectivity(-0.05, 0.2) == pytest.approx(-0.25)


def _site_activations(model, windows, site="resid_post.0"):
    from fastsae.model import capture

    with torch.no_grad():
        return capture(model, [site], input_ids=windows)[site]


def _probe_accuracy(x_train, y_train, x_test, y_test, steps=300):
    """Held-out accuracy of a logistic-regression probe (full-batch LBFGS on standardised features)."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xs, xt = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_train.shape[1], requires_grad=True, dtype=torch.float64)
    b = torch.zeros((), requires_grad=True, dtype=torch.float64)
    opt = torch.optim.LBFGS([w, b], max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs @ w + b, y_train.double()) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b > 0) == y_test).double().mean())


def test_leace_defeats_a_linear_probe_that_worked_before():
    model, _ = random_causal_lm()
    gen = torch.Generator().manual_seed(2)
    windows = torch.randint(4, 40, (24, 32), generator=gen)
    x = _site_activations(model, windows).reshape(-1, 32).double()  # (768, 32)
    y = (windows.reshape(-1) < 22)  # the current token's class: linear in the embedding, about half each
    half = x.shape[0] // 2
    before = _probe_accuracy(x[:half], y[:half], x[half:], y[half:])
    eraser = concept_leace.fit_leace(x, y)
    assert eraser.k == 1 and eraser.directions.shape == (1, 32)  # two classes: rank one
    erased = concept_leace.erase(eraser, x.float()).double()
    after = _probe_accuracy(erased[:half], y[:half], erased[half:], y[half:])
    chance = max(float(y[half:].double().mean()), 1 - float(y[half:].double().mean()))
    assert before > 0.95 and after < chance + 0.08, (before, after, chance)
    # the LEACE guarantee: the erased activations have the same mean in every class (zero cross-covariance)
    torch.testing.assert_close(erased[y].mean(0), erased[~y].mean(0), atol=1e-4, rtol=0)
    # a rank-one edit: x - erased lies on one direction
    assert torch.linalg.matrix_rank(x - erased, atol=1e-4) == 1


def test_leace_of_k_classes_has_rank_k_minus_1_and_equal_class_means():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (400,), generator=gen)
    x = torch.randn(400, 9, generator=gen, dtype=torch.float64) + 2.0 * F.one_hot(labels, 9)[:, :9].double()
    eraser = concept_leace.fit_leace(x, labels)
    assert eraser.k == 2
    erased = concept_leace.erase(eraser, x)
    means = torch.stack([erased[labels == c].mean(0) for c in range(3)])
    torch.testing.assert_close(means, means[:1].expand(3, -1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not linearly correlated"):
        concept_leace.fit_leace(x, torch.zeros(400, dtype=torch.long))  # one class: nothing to erase
    with pytest.raises(ValueError, match="integer or bool"):
        concept_leace.fit_leace(x, labels.double())


def test_leace_as_a_dictionary_erases_as_concept_erasures_own_eraser():
    import concept_erasure as ce

    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (300,), generator=gen)
    x = torch.randn(300, 11, generator=gen, dtype=torch.float64) @ torch.randn(11, 11, generator=gen,
                                                                               dtype=torch.float64)
    x[:, :4] += F.one_hot(labels, 4).double()
    ours = concept_leace.erase(concept_leace.fit_leace(x, labels), x)
    fitter = ce.LeaceFitter.fit(x, F.one_hot(labels, 4).double(), shrinkage=False, constrain_cov_trace=False)
    # the Decomposition keeps its directions in float32, as every baseline does
    torch.testing.assert_close(ours, fitter.eraser(x), atol=2e-6, rtol=1e-4)


def test_erasure_leace_row_is_the_eraser_applied_at_the_site():
    model, tok = random_causal_lm()
    gen = torch.Generator().manual_seed(4)
    windows = torch.randint(4, 20, (8, 12), generator=gen)
    windows[:, 0] = tok.bos_token_id
    target = erasure.next_token_mask(windows, [5, 6, 7])
    result = erasure.erasure(model, "resid_post.0", make_sae(32, 64, "topk", k=6), windows, target, counts=(2,),
                             fit_windows=4, batch_size=4, against=("leace",))
    (row,) = [r for r in result["rows"] if r["method"] == "leace"]
    assert row["directions"] == 1 and row["association"] is None
    keep = windows != tok.bos_token_id
    eraser = concept_leace.fit_leace(_site_activations(model, windows[:4])[keep[:4]], target[:4][keep[:4]].long())
    from fastsae.model import hook_site

    def apply(x):
        return torch.where(keep[4:, :, None], concept_leace.erase(eraser, x), x)

    with hook_site(model, "resid_post.0", apply), torch.no_grad():
        logp = F.log_softmax(model(input_ids=windows[4:]).logits[:, :-1].double(), -1)
    ce = -logp.gather(-1, windows[4:, 1:, None])[..., 0]
    tgt = target[4:, :-1] & keep[4:, :-1]
    assert row["loss_target"] == pytest.approx(float(ce[tgt].mean()), abs=1e-4)
    assert row["loss_other"] == pytest.approx(float(ce[~target[4:, :-1] & keep[4:, :-1]].mean()), abs=1e-4)
    with pytest.raises(ValueError, match="against"):
        erasure.erasure(model, "resid_post.0", make_sae(32, 64, "topk", k=6), windows, target, against=("lda",))


def test_erasure_of_the_names_concept():
    model, tok = word_level_lm(ioi.vocabulary(), num_layers=1)
    ids = erasure.token_ids(tok, erasure.CONCEPTS["names"])
    assert len(ids) > 20 and tok.unk_token_id not in ids
    prompts = ioi.generate(tok, n=12, seed=0)
    windows = prompts.clean.input_ids[:, -12:]  # the prompts' last 12 tokens: each names S2 and ends before IO
    target = erasure.next_token_mask(windows, ids)
    assert target.any(1).all()
    result = erasure.erasure(model, "resid_post.0", make_sae(32, 64, "topk", k=6), windows, target, counts=(1,),
                             fit_windows=6, batch_size=6)
    assert [r["method"] for r in result["rows"]] == ["sae", "pca", "leace"]
    assert all(r["loss_target"] == r["loss_target"] for r in result["rows"])  # finite, not NaN
