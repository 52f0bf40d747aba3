"""IOI prompts and fewer-than-rank-one patching on a tiny random word-level model."""

import pytest
import torch

from fastsae.analysis.interventions import ioi, ioi_ceiling, ioi_patching
from fastsae.analysis.interventions.latent_edits import intervene
from fastsae.analysis.interventions.padded_prompts import PromptBatch, last_logits
from fastsae.evaluation import baselines
from fastsae.model import hook_site, random_causal_lm

from conftest import make_sae
from helpers import word_level_lm

pytest.importorskip("transformers")
SITE = "resid_post.1"
MISSING = ("Mary", "John", "Sarah", "Michael", "Jessica")  # not in the tiny vocabulary: multi-token (unknown)


@pytest.fixture(scope="module")
def lm():
    return word_level_lm([w for w in ioi.vocabulary() if w not in MISSING])


@pytest.fixture(scope="module")
def prompts(lm):
    return ioi.generate(lm[1], n=8, seed=3)


def test_ioi_names_are_single_tokens_and_orders_balanced(lm):
    _, tok = lm
    usable = ioi.single_token_names(tok)
    assert not set(MISSING) & set(usable) and len(usable) == len(ioi.NAMES) - len(MISSING)
    for n in (7, 12):
        p = ioi.generate(tok, n=n, seed=1)
        assert len(p) == n and p.orders.count("ABBA") - p.orders.count("BABA") == n % 2
        for (io, s, c), text, text_c in zip(p.names, p.texts, p.corrupted_texts, strict=True):
            assert len({io, s, c}) == 3 and set((io, s, c)) <= set(usable)
            assert text.count(s) == 2 and text_c.count(s) == 1 and c in text_c and io in text
    p = ioi.generate(tok, n=12, seed=1)
    assert p.texts == ioi.generate(tok, n=12, seed=1).texts != ioi.generate(tok, n=12, seed=2).texts
    differs = p.clean.input_ids != p.corrupted.input_ids  # one column per prompt: S2 -> C
    assert differs.sum(1).tolist() == [1] * 12
    assert torch.equal(p.clean.input_ids[differs], p.s_ids)
    assert torch.equal(p.clean.attention_mask, p.corrupted.attention_mask)
    for row, (io, s, _) in enumerate(p.names):  # ABBA: IO named first; BABA: S named first
        first = p.texts[row].split(" and ")[0].split()[-1]
        assert first == (io if p.orders[row] == "ABBA" else s)


def test_ioi_refuses_a_tokenizer_without_single_token_names():
    _, tok = random_causal_lm()  # character-level: every name is several tokens
    with pytest.raises(ValueError, match="at least 3 names that are single tokens"):
        ioi.generate(tok, n=4)


def test_logit_diff_reads_io_minus_s(prompts):
    logits = torch.randn(len(prompts), 500)
    expected = torch.stack([logits[b, prompts.io_ids[b]] - logits[b, prompts.s_ids[b]] for b in range(len(prompts))])
    torch.testing.assert_close(ioi.logit_diff(logits, prompts), expected)


def _alone(model, tok, sae, prompts, latents):
    """Mean LD over prompts each run alone (no padding, no prefix cache), latents patched: the reference."""
    lds = []
    for b in range(len(prompts)):
        clean = PromptBatch.from_texts(tok, [prompts.texts[b]])
        corrupted = PromptBatch.from_texts(tok, [prompts.corrupted_texts[b]])
        with intervene(model, SITE, sae, record=True) as iv, torch.no_grad():
            model(**clean.inputs())
        keep = corrupted.keep([tok.bos_token_id])
        with intervene(model, SITE, sae, patch=latents, source=iv.inputs[0], positions=keep), torch.no_grad():
            logits = last_logits(model, corrupted)
        lds.append(float(logits[0, prompts.io_ids[b]] - logits[0, prompts.s_ids[b]]))
    return sum(lds) / len(lds)


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_the_batched_curve_equals_prompts_patched_one_by_one(lm, prompts, reuse_prefix):
    model, tok = lm
    sae = make_sae(32, 96, "topk", k=8)
    state = ioi_patching.SiteRuns(model, SITE, prompts, [tok.pad_token_id, tok.bos_token_id])
    curve = ioi_patching.patching_curve(model, state, sae, prompts, max_m=5, reuse_prefix=reuse_prefix)
    assert curve["forwards"] == 5 + reuse_prefix  # one batched forward per m (+ the cached prefix)
    for m in (1, 5):
        assert curve["logit_diff"][m - 1] == pytest.approx(_alone(model, tok, sae, prompts, curve["latents"][:m]),
                                                           abs=1e-5)
    gap = state.clean_ld - state.corrupted_ld
    assert curve["fraction"][4] == pytest.approx((curve["logit_diff"][4] - state.corrupted_ld) / gap)
    assert curve["attribution"] == sorted(curve["attribution"], reverse=True)
    assert all(0 < s for s in curve["relative_edit"])


def test_a_curve_measured_at_some_m_only(lm, prompts):
    model, tok = lm
    sae = make_sae(32, 96, "topk", k=8)
    state = ioi_patching.SiteRuns(model, SITE, prompts, [tok.pad_token_id, tok.bos_token_id])
    every = ioi_patching.patching_curve(model, state, sae, prompts, max_m=4)
    some = ioi_patching.patching_curve(model, state, sae, prompts, max_m=4, ms=[4, 1, 9])
    assert some["m"] == [1, 4] and some["forwards"] == 2 + 1
    assert some["logit_diff"] == pytest.approx([every["logit_diff"][0], every["logit_diff"][3]], abs=1e-6)


def test_every_direction_of_a_basis_restores_the_clean_run(lm, prompts):
    model, tok = lm
    state = ioi_patching.SiteRuns(model, SITE, prompts, [tok.pad_token_id, tok.bos_token_id])
    d = state.fit_activations.shape[1]
    for kind in ("pca", "neurons"):
        basis = baselines.fit(kind, state.fit_activations, d, d)
        curve = ioi_patching.patching_curve(model, state, basis, prompts, max_m=d)
        assert curve["fraction"][-1] == pytest.approx(1.0, abs=1e-4)
        assert sorted(curve["latents"]) == list(range(d))


def test_attribution_is_the_first_order_effect_of_patching(lm, prompts):
    """Basis coefficients are linear in x: patching latent i from x_corr + ε (x_clean - x_corr) moves its value
    by ε Δc_i exactly, so the LD moves by ε · attribution_i + O(ε²)."""
    model, tok = lm
    model = model.double()
    try:
        state = ioi_patching.SiteRuns(model, SITE, prompts, [tok.pad_token_id, tok.bos_token_id])
        basis = baselines.fit("pca", state.fit_activations, 32, 32)
        scores = ioi_patching.attribution(basis, state)
        eps = 1e-4
        source = state.corrupted_x + eps * (state.clean_x - state.corrupted_x)
        for i in scores.abs().argsort(descending=True)[:3].tolist():
            with intervene(model, SITE, basis, patch=[i], source=source, positions=state.keep), torch.no_grad():
                ld = float(ioi.logit_diff(last_logits(model, prompts.corrupted), prompts).mean())
            assert (ld - state.corrupted_ld) / eps == pytest.approx(float(scores[i]), rel=2e-3, abs=1e-7)
    finally:
        model.float()


def test_greedy_search_beats_attribution_at_its_first_step(lm, prompts):
    model, tok = lm
    sae = make_sae(32, 96, "topk", k=8)
    state = ioi_patching.SiteRuns(model, SITE, prompts, [tok.pad_token_id, tok.bos_token_id])
    by_attribution = ioi_patching.patching_curve(model, state, sae, prompts, max_m=2)
    greedy = ioi_patching.patching_curve(model, state, sae, prompts, max_m=2, select="greedy", pool=4)
    assert greedy["logit_diff"][0] >= by_attribution["logit_diff"][0] - 1e-6
    assert greedy["forwards"] == 1 + 4 + 3  # prefix, then pool - step candidates per step


def test_compare_reports_sae_pca_and_neurons_side_by_side(lm, prompts):
    model, tok = lm
    result = ioi_patching.compare(model, SITE, make_sae(32, 96, "topk", k=8), prompts, max_m=3)
    assert set(result["curves"]) == {"sae", "pca", "neurons"} and result["baselines_fitted_on"] == "prompts"
    assert all(len(c["fraction"]) == 3 for c in result["curves"].values())
    assert result["all_latents"] > 3 and "all_latents_fraction" in result and "error_only_fraction" in result


def test_every_sae_latent_and_its_error_restore_the_clean_run(lm, prompts):
    model, tok = lm
    sae = make_sae(32, 96, "topk", k=8)
    state = ioi_patching.SiteRuns(model, SITE, prompts, [tok.pad_token_id, tok.bos_token_id])
    patcher = ioi_patching.Patcher(model, state, ioi_patching.as_dictionary(sae), prompts, True)
    ld, size = patcher(range(96), patch_error=True)
    assert ld == pytest.approx(state.clean_ld, abs=1e-5) and size > 0


def _exact_sae(d=32):
    """A ReLU SAE whose reconstruction is the identity: z = (relu(x), relu(-x)), x̂ = z⁺ - z⁻."""
    from fastsae.config import SAEConfig
    from fastsae.sae import SAE

    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, activation="relu"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))  # (2d, d)
        sae.W_enc.copy_(torch.cat([eye, -eye]).T if sae.W_enc.shape == (d, 2 * d) else torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_the_ceiling_is_patching_every_latent_and_one_for_an_exact_sae(lm, prompts):
    model, tok = lm
    excluded = [tok.pad_token_id, tok.bos_token_id]
    state = ioi_patching.SiteRuns(model, SITE, prompts, excluded)
    sae = make_sae(32, 96, "topk", k=8)
    patcher = ioi_patching.Patcher(model, state, ioi_patching.as_dictionary(sae), prompts, True)
    c = ioi_ceiling.ceiling(patcher, state, sae, prompts)
    gap = state.clean_ld - state.corrupted_ld
    full_ld, _ = patcher(range(96))  # every latent, active or not: the same edit
    assert c["all_latents_fraction"] == pytest.approx((full_ld - state.corrupted_ld) / gap, abs=1e-5)
    assert abs(c["all_latents_fraction"] - 1) > 0.01 and c["fvu_names"] > 0.05  # a random SAE is far from exact
    assert c["everything_fraction"] == pytest.approx(1.0, abs=1e-4) and c["everything_kl"] == pytest.approx(0, abs=1e-5)
    exact = _exact_sae()
    x = state.clean_x[state.keep]
    torch.testing.assert_close(exact.decode(exact.encode(x)), x, atol=1e-5, rtol=1e-5)
    c = ioi_ceiling.ceiling(ioi_patching.Patcher(model, state, ioi_patching.as_dictionary(exact), prompts, True),
                            state, exact, prompts)
    assert c["all_latents_fraction"] == pytest.approx(1.0, abs=1e-4)
    assert c["all_latents_kl"] == pytest.approx(0.0, abs=1e-5) and c["fvu_names"] == pytest.approx(0.0, abs=1e-6)
    names = ioi_ceiling.name_positions(prompts)
    assert names.sum(1).tolist() == [1] * len(prompts)
    by = c["by_positions"]  # an exact SAE restores at each position set what the whole activation does there
    assert by["names"]["positions"] == len(prompts) and by["after_names"]["positions"] > len(prompts)
    for part in by.values():
        assert part["all_latents_fraction"] == pytest.approx(part["everything_fraction"], abs=1e-4)


def test_the_ceiling_by_positions_patches_only_those_positions(lm, prompts):
    """At the name column alone, the whole activation restores what a hand-made patch of that column does."""
    model, tok = lm
    state = ioi_patching.SiteRuns(model, SITE, prompts, [tok.pad_token_id, tok.bos_token_id])
    sae = make_sae(32, 96, "topk", k=8)
    c = ioi_ceiling.ceiling(ioi_patching.Patcher(model, state, ioi_patching.as_dictionary(sae), prompts, True),
                            state, sae, prompts)
    names = ioi_ceiling.name_positions(prompts)

    def swap(x):  # the clean activation at the name column, the corrupted one elsewhere
        return torch.where(names[..., None].to(x.device), state.clean_x.to(x.dtype), x)

    with torch.no_grad(), hook_site(model, SITE, swap):
        ld = float(ioi.logit_diff(last_logits(model, prompts.corrupted), prompts).mean())
    want = (ld - state.corrupted_ld) / (state.clean_ld - state.corrupted_ld)
    assert c["by_positions"]["names"]["everything_fraction"] == pytest.approx(want, abs=1e-4)
    assert abs(c["by_positions"]["names"]["everything_fraction"] - c["everything_fraction"]) > 1e-3


def test_kl_to_clean_is_zero_when_every_direction_is_patched(lm, prompts):
    model, tok = lm
    state = ioi_patching.SiteRuns(model, SITE, prompts, [tok.pad_token_id, tok.bos_token_id])
    basis = baselines.fit("pca", state.fit_activations, 32, 32)
    curve = ioi_patching.patching_curve(model, state, basis, prompts, max_m=32, ms=[1, 8, 32])
    assert len(curve["kl"]) == 3 and curve["kl"][-1] == pytest.approx(0.0, abs=1e-5)
    assert curve["kl"][0] > 1e-6 > curve["kl"][-1]  # one direction does not restore the clean distribution
    with torch.no_grad():  # KL(clean || corrupted), by hand, bounds what nothing patched gives
        clean = torch.log_softmax(last_logits(model, prompts.clean).double(), -1)
        corrupted = torch.log_softmax(last_logits(model, prompts.corrupted).double(), -1)
    unpatched = float((clean.exp() * (clean - corrupted)).sum(-1).mean())
    patcher = ioi_patching.Patcher(model, state, ioi_patching.as_dictionary(basis), prompts, True)
    assert patcher.measure([])[2] == pytest.approx(unpatched, rel=1e-3, abs=1e-6)


def test_compare_fits_pca_on_the_corpus_and_keeps_the_prompt_fit_labelled(lm, prompts):
    model, tok = lm
    excluded = [tok.pad_token_id, tok.bos_token_id]
    gen = torch.Generator().manual_seed(5)
    windows = torch.randint(4, len(tok), (6, 16), generator=gen)  # random words: not the IOI prompts
    corpus = ioi_ceiling.corpus_activations(model, SITE, windows, excluded)
    assert corpus.shape == (96, 32)
    saes = {"k=4": make_sae(32, 96, "topk", k=4), "k=12": make_sae(32, 96, "topk", k=12, seed=1)}
    result = ioi_patching.compare(model, SITE, saes, prompts, max_m=3, corpus=corpus, excluded=excluded)
    assert list(result["curves"]) == ["k=4", "k=12", "pca", "neurons", "pca_prompts"]
    assert set(result["ceilings"]) == {"k=4", "k=12"} and result["baselines_fitted_on"].startswith("corpus")
    assert result["curves"]["pca"]["fraction"] != pytest.approx(result["curves"]["pca_prompts"]["fraction"])
    assert all(len(c["kl"]) == 3 for c in result["curves"].values())
    table = ioi_patching.summary({SITE: result}, ms=(1, 3))
    assert "| pca_prompts |" in table and "| k=12 |" in table
    alone = ioi_patching.compare(model, SITE, make_sae(32, 96, "topk", k=8), prompts, max_m=2, excluded=excluded)
    # without a corpus "pca" is the prompt fit, labelled so: the same curve as the extra row above
    assert alone["baselines_fitted_on"] == "prompts"
    assert alone["curves"]["pca"]["fraction"] == pytest.approx(result["curves"]["pca_prompts"]["fraction"][:2])
