"""The evaluation (lower blocks once, upper blocks batched over variants, head in chunks) gives the
straightforward evaluation's numbers (fastsae.evaluation.whole_forward: one whole forward per variant) on tiny
random models of every supported family. Tolerance: relative 1e-5 (absolute 1e-6 near 0) on the measured
metrics, carried through the formula for the derived ones (ce_loss_recovered, kl_div_score, perplexities);
the two differ only in how fp32 GEMMs group their rows (with 2 threads the blocking changes the last bits)."""

import importlib
import math

import pytest
import torch
from tiny_models import ARCHS, _model

from fastsae import SAE, SAEConfig
from fastsae.evaluation import baselines, evaluate, evaluate_reference

T = pytest.importorskip("transformers")
evaluate_module = importlib.import_module("fastsae.evaluation.evaluate")  # the package face shadows it


def _windows(s=7, t=11):
    ids = torch.randint(6, 64, (s, t), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1  # BOS everywhere, a pad and an EOS in the middle: excluded positions inside windows
    ids[2, 5] = 0
    ids[4, 3] = 2
    return ids


def _decompositions(model, site, ids):
    from fastsae.model import capture

    x = capture(model, [site], input_ids=ids)[site].reshape(-1, 32)
    topk = SAE(SAEConfig(32, 96, activation="topk", k=5), seed=0)
    relu = SAE(SAEConfig(32, 64), seed=1)
    with torch.no_grad():  # scaled to the activations, so x_hat is neither 0 nor x
        topk.W_dec.mul_(float(x.norm(dim=1).mean()) / 3)
    return {"topk": topk, "relu": relu, "pca": baselines.fit("pca", x, n=32, k=5),
            "random": baselines.fit("random", x, n=96, k=5)}


def _tolerance(ref, name, key, rel=1e-5):
    """Absolute tolerance of a metric: rel of the measured ones; for the derived ones, rel of their inputs
    carried through the formula (a ratio over a small CE gap, exp of a CE, amplify their inputs' error)."""
    m, shared = ref[name], ref["model"]
    value = m[key]
    if key == "ce_loss_recovered":
        zero, sae, clean = shared["ce_loss_with_ablation"], m["ce_loss_with_sae"], shared["ce_loss_without_sae"]
        return 2 * rel * max(abs(zero), abs(sae), abs(clean)) * (1 + abs(value)) / abs(zero - clean)
    if key == "kl_div_score":
        zero, sae = shared["kl_div_with_ablation"], m["kl_div_with_sae"]
        return 2 * rel * max(abs(zero), abs(sae)) * (1 + abs(value)) / abs(zero)
    if key.startswith("perplexity_"):  # exp(ce): relative error = the absolute error of ce
        ce = max(m["ce_loss_with_sae"], shared["ce_loss_without_sae"])
        return 2 * rel * ce * (m["perplexity_with_sae"] + m["perplexity_without_sae"])
    return rel * abs(value) + 1e-6


def _assert_same(new, ref):
    assert set(new) == set(ref)
    for name in ref:
        assert set(new[name]) == set(ref[name]), name
        for key, value in ref[name].items():
            got = new[name][key]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(got, value, rtol=0, atol=0)  # densities: counts, exact
            elif isinstance(value, float) and not math.isnan(value):
                tol = _tolerance(ref, name, key)
                assert abs(got - value) <= tol, f"{name}/{key}: {got} vs {value} (tolerance {tol:.2g})"
            else:
                assert got == value or (isinstance(value, float) and math.isnan(got)), f"{name}/{key}"


@pytest.mark.parametrize("site", ["resid_post.1", "mlp_out.1", "resid_pre.0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_evaluation_equals_the_reference(arch, site):
    model, ids = _model(arch), _windows()
    decs = _decompositions(model, site, ids)
    kw = dict(batch_size=3, exclude_token_ids=[0, 1, 2], no_error_check=("pca", "random"), progress=False)
    ref = evaluate_reference(model, site, ids, decs, **kw)
    new = evaluate(model, site, ids, decs, head_rows=7, **kw)  # chunks of 1 position: 7 // 6 variants
    _assert_same(new, ref)
    shared = ref["model"]
    if shared["causal_lm"]:  # the numbers compared are not degenerate
        assert abs(shared["ce_loss_with_ablation"] - shared["ce_loss_without_sae"]) > 1e-4
        assert ref["topk"]["kl_div_with_sae"] > 1e-4
    else:
        assert ref["topk"]["embedding_cossim_with_sae"] < 0.9999


def test_many_variants_split_into_several_runs_and_head_chunks(monkeypatch):
    model, ids = _model("gemma3"), _windows()
    decs = _decompositions(model, "resid_post.1", ids)
    ref = evaluate_reference(model, "resid_post.1", ids, decs, batch_size=4, progress=False)
    monkeypatch.setattr(evaluate_module, "PASS_SEQUENCES", 9)  # 2 variants of 4 windows per upper run
    new = evaluate(model, "resid_post.1", ids, decs, batch_size=4, head_rows=1000, progress=False)
    _assert_same(new, ref)


def test_head_rows_must_be_positive():
    model, ids = _model("llama"), _windows()
    with pytest.raises(ValueError, match="head_rows"):
        evaluate(model, "resid_post.1", ids, {}, head_rows=0, progress=False)
