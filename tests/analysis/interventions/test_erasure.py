"""Concept erasure on a tiny random model: association statistics and the loss bookkeeping."""

import pytest
import torch
import torch.nn.functional as F

from fastsae.analysis.interventions import erasure
from fastsae.analysis.interventions.latent_edits import SAEDictionary, intervene
from fastsae.latents import SparseLatents
from fastsae.model import random_causal_lm

from conftest import make_sae

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
    assert [(r["method"], r["n"]) for r in result["rows"]] == [("sae", 0), ("sae", 3), ("pca", 0), ("pca", 3)]
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
