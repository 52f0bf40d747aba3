"""intervene(): latent edits inside a model's forward, on tiny random models, against hand-written splices and a
dense float64 reference."""

import pytest
import torch

from fastsae.analysis.interventions.latent_edits import Intervention, SAEDictionary, intervene
from fastsae.analysis.interventions.padded_prompts import PromptBatch, last_logits
from fastsae.evaluation import baselines
from fastsae.model import hook_site, random_causal_lm

from conftest import make_sae
from helpers import float64_copy

pytest.importorskip("transformers")
SITE = "resid_post.0"


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = random_causal_lm(hidden_size=32, num_layers=2)
    return model, tokenizer


def _batch(tokenizer, texts=("the cat sat on it", "a dog!", "so it goes, and on")):
    return PromptBatch.from_texts(tokenizer, list(texts))


def _sae(activation="topk", d_sae=48, seed=0, float64=False):
    sae = make_sae(32, d_sae, activation, k=6 if activation == "topk" else None, seed=seed)
    return float64_copy(sae) if float64 else sae


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch.inputs()).logits


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_an_empty_intervention_reproduces_the_clean_logits(lm, activation):
    model, tok = lm
    batch = _batch(tok)
    clean = _logits(model, batch)
    with intervene(model, SITE, _sae(activation), record=True) as iv:
        assert torch.equal(_logits(model, batch), clean)  # x passes through untouched
    assert len(iv.codes) == 1 and iv.codes[0].values.shape[:2] == batch.input_ids.shape
    with intervene(model, SITE, _sae(activation), scale={3: 1.0, 5: 1.0}):  # x̂' = x̂: only the error term
        torch.testing.assert_close(_logits(model, batch), clean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_zeroing_a_latent_equals_a_hand_written_splice_without_it(lm, activation):
    model, tok = lm
    batch = _batch(tok)
    sae = _sae(activation)
    with intervene(model, SITE, sae, record=True) as iv:
        _logits(model, batch)
    latent = int(iv.codes[0].fire_counts().argmax())  # the most frequent latent: the edit is not empty

    def without_latent(x):
        codes = sae.encode(x)
        kept = codes.values * (codes.indices != latent)
        x_hat = sae.decode(codes)
        return sae.decode(type(codes)(kept, codes.indices, codes.d_sae)) + (x - x_hat)

    with torch.no_grad(), hook_site(model, SITE, without_latent):
        expected = model(**batch.inputs()).logits
    with intervene(model, SITE, sae, zero=[latent]):
        got = _logits(model, batch)
    assert (got - _logits(model, batch)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 13)])
@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_every_edit_matches_a_dense_float64_reference(activation, shape):
    sae = _sae(activation, d_sae=37, seed=2, float64=True)
    x = torch.randn(*shape, 32, dtype=torch.float64) * 2
    src = torch.randn(*shape, 32, dtype=torch.float64) * 2
    z = sae.encode(x).to_dense()
    counts = sae.encode(x).fire_counts() + sae.encode(src).fire_counts()
    order = counts.argsort(descending=True).tolist()  # busiest latents first, so edits do something
    zero, scale, set_to, clamp, steer, patch = order[0:2], order[2], order[3], order[4], order[5], order[6:9]
    positions = torch.rand(shape) > 0.3
    iv = Intervention(sae, zero=zero, scale={scale: -1.5}, set_to={set_to: 0.7}, clamp={clamp: (None, 0.2)},
                      steer={steer: 2.5}, patch=patch, source=src, positions=positions)
    got = iv(x)
    z2 = z.clone()
    z2[..., zero] = 0
    z2[..., scale] *= -1.5
    z2[..., set_to] = 0.7
    z2[..., clamp] = z2[..., clamp].clamp(max=0.2)
    z2[..., steer] += 2.5
    z2[..., patch] = sae.encode(src).to_dense()[..., patch]
    expected = x + positions[..., None] * ((z2 - z) @ sae.W_dec)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_values_gathers_chosen_latents_as_dense_does():
    sae = _sae("topk", d_sae=37)
    codes = sae.encode(torch.randn(4, 5, 32))
    latents = torch.tensor([36, 0, 7, 12])
    torch.testing.assert_close(SAEDictionary(sae).values(codes, latents), codes.to_dense()[..., latents])


def test_patching_every_latent_and_the_error_reproduces_the_source_run(lm):
    model, tok = lm
    clean, corrupted = _batch(tok, ["the cat sat on it"]), _batch(tok, ["the dog sat on it"])
    sae = _sae("topk")
    with intervene(model, SITE, sae, record=True) as iv:
        clean_logits = _logits(model, clean)
    x_clean = iv.inputs[0]
    every = list(range(sae.cfg.d_sae))
    with intervene(model, SITE, sae, patch=every, source=x_clean, patch_error=True):
        torch.testing.assert_close(_logits(model, corrupted), clean_logits, atol=1e-5, rtol=1e-5)
    # an SAE that reconstructs exactly (latents ±e_j, ReLU): the latents alone carry everything
    exact = make_sae(32, 64, "relu")
    eye = torch.eye(32)
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([eye, -eye]))
        exact.W_dec.copy_(torch.cat([eye, -eye]))
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    with intervene(model, SITE, exact, patch=range(64), source=x_clean):
        torch.testing.assert_close(_logits(model, corrupted), clean_logits, atol=1e-5, rtol=1e-5)
    with intervene(model, SITE, sae, patch=every, source=x_clean):  # a lossy SAE leaves the corrupted error
        assert not torch.allclose(_logits(model, corrupted), clean_logits, atol=1e-3)


def test_a_padded_batch_computes_each_prompt_as_alone_edits_included(lm):
    model, tok = lm
    texts = ["the cat sat on it", "a dog!", "so it goes, and on"]
    batch = _batch(tok, texts)
    sae = _sae("topk")
    keep = batch.keep([tok.bos_token_id, tok.pad_token_id])
    with intervene(model, SITE, sae, zero=[1, 2, 3], steer={4: 3.0}, positions=keep):
        together = last_logits(model, batch)
    for row, text in enumerate(texts):
        alone = _batch(tok, [text])
        with intervene(model, SITE, sae, zero=[1, 2, 3], steer={4: 3.0},
                       positions=alone.keep([tok.bos_token_id])):
            torch.testing.assert_close(together[row], last_logits(model, alone)[0], atol=1e-5, rtol=1e-5)


def test_several_sites_at_once_equal_nested_single_sites(lm):
    model, tok = lm
    batch = _batch(tok)
    sae0, sae1 = _sae("topk", seed=0), _sae("relu", seed=1)
    with intervene(model, {"resid_post.0": Intervention(sae0), "resid_post.1": Intervention(sae1)}):
        assert torch.equal(_logits(model, batch), _logits(model, batch))
    with intervene(model, SITE, sae0, zero=[0, 1]), intervene(model, "resid_post.1", sae1, steer={2: 1.5}):
        nested = _logits(model, batch)
    with intervene(model, {"resid_post.0": Intervention(sae0, zero=[0, 1]),
                           "resid_post.1": Intervention(sae1, steer={2: 1.5})}) as ivs:
        torch.testing.assert_close(_logits(model, batch), nested)
    assert set(ivs) == {"resid_post.0", "resid_post.1"}


def test_attribution_is_the_finite_difference_effect_to_first_order():
    model, tok = random_causal_lm(hidden_size=32, num_layers=2)
    model = model.double()
    sae = _sae("topk", float64=True)
    batch = _batch(tok)
    def metric(logits):  # logit of token 7 minus logit of token 9, summed over prompts
        return (logits[:, -1, 7] - logits[:, -1, 9]).sum()

    with torch.enable_grad(), intervene(model, SITE, sae, record=True, grad=True) as iv:
        base = metric(model(**batch.inputs()).logits)
        (grad,) = torch.autograd.grad(base, iv.outputs)
    base = base.detach()
    contrib = SAEDictionary(sae).contributions(iv.codes[0].detach(), grad).double()
    latents = contrib.abs().argsort(descending=True)[:3].tolist()
    assert contrib[latents[-1]].abs() > 1e-3  # effects big enough to tell right from wrong
    eps = 1e-4
    for latent in latents:  # z_i -> (1 + ε) z_i changes the metric by ε Σ z_i (g · W_dec[i]) + O(ε²)
        with torch.no_grad(), intervene(model, SITE, sae, scale={latent: 1 + eps}):
            moved = metric(model(**batch.inputs()).logits)
        assert float(moved - base) / eps == pytest.approx(float(contrib[latent]), rel=1e-3, abs=1e-6)


def test_bad_edits_are_refused_clearly():
    sae = _sae("topk")
    with pytest.raises(ValueError, match="zero: latent ids must be in"):
        Intervention(sae, zero=[48])
    with pytest.raises(ValueError, match="edited more than once"):
        Intervention(sae, zero=[1], steer={1: 2.0})
    with pytest.raises(ValueError, match="need source="):
        Intervention(sae, patch=[1])
    with pytest.raises(ValueError, match="clamp: latent 2 needs"):
        Intervention(sae, clamp={2: 0.5})
    with pytest.raises(ValueError, match="positions must have shape"):
        Intervention(sae, zero=[1], positions=torch.ones(2, 3, dtype=torch.bool))(torch.randn(2, 4, 32))
    with pytest.raises(TypeError, match="dictionary must be"):
        Intervention(object())
    with pytest.raises(ValueError, match="call sae.eval"):
        Intervention(make_sae(32, 48, "batchtopk", k=4).train())


def test_a_basis_dictionary_edits_its_coefficients():
    x = torch.randn(200, 32)
    pca = baselines.fit("pca", x, 32, 32)
    model_x = torch.randn(2, 5, 32)
    iv = Intervention(pca, zero=[0])
    got = iv(model_x)
    c0 = (model_x - pca.mean) @ pca.directions[0]
    torch.testing.assert_close(got, model_x - c0[..., None] * pca.directions[0], atol=1e-5, rtol=1e-5)
