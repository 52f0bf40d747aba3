"""Evaluation: metrics on hand-computed cases, splicing, downstream losses, baselines."""

import math

import pytest
import torch

from fastsae import SAE, SAEConfig, splice
from fastsae.evaluation import ReconstructionMetrics, baselines, evaluate, evaluate_with_baselines, pareto_frontier
from fastsae.evaluation.metrics import density_histogram

from helpers import tiny_pythia

T = pytest.importorskip("transformers")


def tiny_bert():
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, pad_token_id=0)
    return T.BertModel(cfg).eval()


def windows(n=6, t=10):
    ids = torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    return ids


def identity_sae(d):
    """ReLU SAE with W_enc = W_dec = [I; -I]: x_hat = relu(x) - relu(-x) = x exactly."""
    sae = SAE(SAEConfig(d, 2 * d), seed=0)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae


def test_reconstruction_metrics_hand_computed():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    x_hat = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    m = ReconstructionMetrics(3)
    m.add(x[:1], x_hat[:1], z[:1])  # two batches: the sums must carry across them
    m.add(x[1:], x_hat[1:], z[1:])
    r = m.compute()
    # residuals: (0, 4) and (0, 1) -> squared norms 16, 1
    assert r["mse"] == pytest.approx(8.5)
    # E||x||² = (25 + 4)/2 = 14.5; E x = (1.5, 3); ||E x||² = 11.25; variance 3.25
    assert r["explained_variance"] == pytest.approx(1 - 8.5 / 3.25) and r["fvu"] == pytest.approx(8.5 / 3.25)
    assert r["cossim"] == pytest.approx((9 / (5 * 3) + 2 / (2 * 1)) / 2)
    assert r["l2_ratio"] == pytest.approx((3 / 5 + 1 / 2) / 2)
    assert r["relative_reconstruction_bias"] == pytest.approx(((9 + 1) / 2) / ((9 + 2) / 2))
    assert r["l0"] == 1.0 and r["l1"] == 1.5
    assert r["dead_fraction"] == pytest.approx(1 / 3) and r["dense_fraction"] == pytest.approx(2 / 3)
    assert torch.equal(m.feature_density(), torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    # the sparse form (values, indices, padding 0) gives the same numbers
    s = ReconstructionMetrics(3)
    s.add(x, x_hat, (torch.tensor([[2.0, 0.0], [-1.0, 0.0]]), torch.tensor([[0, 0], [2, 0]])))
    assert s.compute() == r
    hist = density_histogram(torch.tensor([0.0, 0.001, 0.01, 0.5]), bins=3)
    assert hist["dead"] == 1 and sum(hist["counts"]) == 3 and hist["edges"][0] == -3.0


def test_splice_identity_sae_gives_the_clean_model_exactly():
    model, ids = tiny_pythia(), windows()
    clean = model(input_ids=ids).logits
    for site in ("resid_post.0", "resid_pre.1", "mlp_hidden.1", "attn_out.0"):
        d = {"mlp_hidden.1": 48}.get(site, 32)
        with splice(model, site, identity_sae(d), record=True) as sp:
            spliced = model(input_ids=ids).logits
        assert torch.equal(spliced, clean), site
        assert sp.latents[0].values.shape[:2] == ids.shape and len(sp.activations) == 1
    assert torch.equal(model(input_ids=ids).logits, clean)  # the hook is gone after the block


def test_zero_ablation_matches_a_model_with_the_branch_removed():
    model, ids = tiny_pythia(), windows()
    with splice(model, "mlp_out.1", replace="zero"):
        ablated = model(input_ids=ids).logits
    manual = tiny_pythia()
    with torch.no_grad():
        manual.gpt_neox.layers[1].mlp.dense_4h_to_h.weight.zero_()
        manual.gpt_neox.layers[1].mlp.dense_4h_to_h.bias.zero_()
    torch.testing.assert_close(ablated, manual(input_ids=ids).logits, rtol=0, atol=1e-6)
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    with splice(model, "mlp_out.1", replace="zero") as sp:
        sp.keep = keep  # replace nowhere: clean
        assert torch.equal(model(input_ids=ids).logits, tiny_pythia()(input_ids=ids).logits)


def test_error_term_equals_clean_and_keeps_latents_in_the_graph():
    model, ids = tiny_pythia(), windows()
    sae = SAE(SAEConfig(32, 64, activation="topk", k=4), seed=0)
    clean = model(input_ids=ids).logits
    with splice(model, "resid_post.0", sae, error_term=True, record=True) as sp:
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, clean, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert sae.W_dec.grad is not None and sp.latents[0].values.requires_grad
    with splice(model, "resid_post.0", sae):
        assert not torch.allclose(model(input_ids=ids).logits, clean, atol=1e-3)  # a random SAE changes it
    with pytest.raises(ValueError, match="an sae or replace"):
        with splice(model, "resid_post.0"):
            pass


@torch.no_grad()
def test_downstream_metrics_against_a_manual_computation():
    model, ids = tiny_pythia(), windows()
    sae = identity_sae(32)
    r = evaluate(model, "resid_post.0", ids, {"identity": sae}, batch_size=4, progress=False)
    shared, m = r["model"], r["identity"]
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    mask = ids[:, :-1] > 2
    manual_ce = -logp.gather(-1, ids[:, 1:, None])[..., 0][mask].mean()
    assert shared["ce_loss_without_sae"] == pytest.approx(float(manual_ce), rel=1e-6)
    with splice(model, "resid_post.0", replace="zero") as sp:
        sp.keep = ids > 2
        zlogp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    assert shared["ce_loss_with_ablation"] == pytest.approx(
        float(-zlogp.gather(-1, ids[:, 1:, None])[..., 0][mask].mean()), rel=1e-6)
    assert shared["kl_div_with_ablation"] == pytest.approx(
        float((logp.exp() * (logp - zlogp)).sum(-1)[mask].mean()), rel=1e-5)
    assert m["ce_loss_with_sae"] == shared["ce_loss_without_sae"] and m["kl_div_with_sae"] == 0
    assert m["ce_loss_recovered"] == 1.0 and m["kl_div_score"] == 1.0 and m["perplexity_increase"] == 0
    assert m["ce_loss_with_sae_and_error"] == pytest.approx(shared["ce_loss_without_sae"], rel=1e-6)
    assert m["fvu"] == pytest.approx(0, abs=1e-12) and m["cossim"] == pytest.approx(1)
    assert m["tokens"] == int((ids > 2).sum()) == shared["tokens"]


def test_encoder_models_report_embedding_cosines():
    model, ids = tiny_bert(), windows()
    r = evaluate(model, "resid_post.0", ids, {"identity": identity_sae(32)}, exclude_token_ids=[0],
                 progress=False)
    assert not r["model"]["causal_lm"]
    assert r["identity"]["embedding_cossim_with_sae"] == pytest.approx(1.0)
    assert r["identity"]["embedding_cossim_with_sae_and_error"] == pytest.approx(1.0)
    assert r["model"]["embedding_cossim_with_ablation"] < 0.999


def test_baselines_have_the_requested_directions_and_sparsity():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)) @ torch.randn(16, 16) + 3.0
    for kind, n, expect in (("pca", 40, 16), ("neurons", 40, 16), ("random", 40, 40), ("pca", 8, 8)):
        dec = baselines.fit(kind, x, n=n, k=5)
        assert dec.d_codes == expect and dec.directions.shape == (expect, 16)
        torch.testing.assert_close(dec.directions.norm(dim=1), torch.ones(expect))
        codes = dec.encode(x)
        assert ((codes != 0).sum(1) == 5).all()
    full = baselines.fit("pca", x, n=16, k=16)  # a complete basis with every coefficient: exact
    torch.testing.assert_close(full.decode(full.encode(x)), x, rtol=1e-4, atol=1e-4)
    rand = baselines.fit("random", x, n=40, k=40)  # overcomplete, minimum-norm coefficients: exact too
    torch.testing.assert_close(rand.decode(rand.encode(x)), x, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="baseline kind"):
        baselines.fit("nmf", x, 4, 2)


def test_ica_baseline():  # fastsae.evaluation.ica needs no scikit-learn (tests/evaluation/test_ica.py compares)
    gen = torch.Generator().manual_seed(0)
    sources = torch.rand(2000, 4, generator=gen) - 0.5  # uniform: non-Gaussian, so ICA can unmix
    x = sources @ torch.randn(4, 4, generator=gen)
    ica = baselines.fit("ica", x, n=4, k=4)
    torch.testing.assert_close(ica.decode(ica.encode(x)), x, rtol=1e-3, atol=1e-3)
    found = ica.encode(x)  # each recovered component correlates with one true source
    corr = torch.corrcoef(torch.cat([found.T, sources.T]))[:4, 4:].abs()
    assert (corr.max(dim=1).values > 0.95).all()


def test_evaluate_with_baselines_reports_each_side_by_side():
    model, ids = tiny_pythia(), windows(8, 12)
    from fastsae.model import capture

    fit_x = capture(model, ["resid_post.0"], input_ids=windows(20, 12))["resid_post.0"].reshape(-1, 32)
    sae = SAE(SAEConfig(32, 64, activation="topk", k=3), seed=0)
    kinds = ("pca", "ica", "neurons", "random")
    r = evaluate_with_baselines(model, "resid_post.0", ids, {"sae": sae}, fit_x, kinds=kinds, progress=False)
    assert set(r) == {"model", "sae", *kinds}
    for kind in kinds:
        assert r[kind]["k"] == 3 and r[kind]["l0"] == pytest.approx(3)
        assert 0 < r[kind]["fvu"] < 1.5 and not math.isnan(r[kind]["ce_loss_recovered"])
    assert r["random"]["n_directions"] == 64 and r["pca"]["n_directions"] == r["ica"]["n_directions"] == 32


def test_pareto_frontier():
    pts = [(10, 0.5), (20, 0.3), (15, 0.6), (40, 0.1), (30, 0.2), (50, 0.15)]
    assert pareto_frontier(pts, higher_is_better=False) == [0, 1, 4, 3]
    assert pareto_frontier([(1, 0.2), (2, 0.9), (3, 0.5)], higher_is_better=True) == [0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_baselines_fit_on_full_precision_activations(tmp_path, dtype):
    """A float32 store's rows are the fit activations as they are; a bfloat16 store's rounding would keep
    FastICA from converging, so the model's float32 activations of the same windows are captured instead."""
    from fastsae.evaluation.eval_run import fit_activations
    from fastsae.harvest import ActivationStore
    from fastsae.harvest.harvester import harvest
    from fastsae.model import capture

    model, ids = tiny_pythia(), windows(12, 10)
    harvest(model, ["resid_post.0"], ids, tmp_path / "store", batch_size=4, dtype=dtype, exclude_token_ids=[1],
            shard_rows=40, progress=False)
    store = ActivationStore(tmp_path / "store")
    x, source = fit_activations(model, "resid_post.0", store, ids, [1], fit_tokens=50, batch_size=4, device="cpu")
    every = capture(model, ["resid_post.0"], input_ids=ids)["resid_post.0"][:, 1:].reshape(-1, 32)  # BOS dropped
    assert x.dtype == torch.float32 and x.shape == (50, 32)
    if dtype == torch.float32:
        assert source == "store" and torch.equal(x, every[:50])
    else:
        assert source == "model (the store keeps bfloat16)"
        torch.testing.assert_close(x, every[:50], rtol=1e-6, atol=1e-6)  # not rounded
        assert not torch.equal(x, every[:50].bfloat16().float())
    x, source = fit_activations(model, "resid_post.0", None, ids, [1], fit_tokens=1000, batch_size=5, device="cpu")
    assert source == "model" and torch.equal(x, every)  # fewer windows than fit_tokens: all of them


@torch.no_grad()
def manual_transcoder_eval(model, ids, tc):
    """Output FVU, l0 and CE (clean, transcoder in, mlp_out.0 zeroed) by raw torch hooks on the MLP, at the
    positions evaluate scores (not BOS)."""
    keep = ids != 1
    mlp, seen = model.gpt_neox.layers[0].mlp, {}

    def run(replace):
        h1 = mlp.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))

        def post(_m, _args, y):
            seen["y"] = y
            return None if replace is None else torch.where(keep[..., None], replace(seen["x"], y), y)

        h2 = mlp.register_forward_hook(post)
        try:
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
        finally:
            h1.remove()
            h2.remove()
        return float(-logp.gather(-1, ids[:, 1:, None])[..., 0][keep[:, :-1]].mean())

    clean = run(None)
    x, y = seen["x"][keep], seen["y"][keep]
    out = tc(x, target=y)
    y, y_hat = y.double(), out.x_hat.double()
    fvu = float((y - y_hat).square().sum() / (y - y.mean(0)).square().sum())
    with_tc = run(lambda x, y: tc(x, target=y).x_hat)
    zero = run(lambda x, y: torch.zeros_like(y))
    l0 = float((out.latents.values != 0).sum(-1).double().mean())
    return {"fvu": fvu, "l0": l0, "ce_loss_without_sae": clean, "ce_loss_with_sae": with_tc,
            "ce_loss_with_ablation": zero, "ce_loss_recovered": (zero - with_tc) / (zero - clean)}


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
def test_a_transcoder_is_measured_at_its_out_site_against_a_manual_computation(reference, kind):
    model, ids = tiny_pythia(), windows()
    tc = SAE(SAEConfig(d_in=32, d_sae=48, activation="topk", k=4, kind=kind, apply_b_dec_to_input=False), seed=0)
    with torch.no_grad():  # a large MLP output, so that zeroing it moves the loss well beyond float noise
        model.gpt_neox.layers[0].mlp.dense_4h_to_h.weight.mul_(30)
        model.gpt_neox.layers[0].mlp.dense_h_to_4h.bias.normal_(generator=torch.Generator().manual_seed(4))
        tc.b_dec.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
        if kind == "skip_transcoder":
            tc.W_skip.copy_(0.3 * torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))
    tc.metadata["out_site"] = "mlp_out.0"
    sae = identity_sae(32)
    r = evaluate(model, "mlp_in.0", ids, {"sae": sae, "tc": tc}, batch_size=4, progress=False, reference=reference)
    expected = manual_transcoder_eval(model, ids, tc)
    assert r["model"]["ce_loss_without_sae"] == pytest.approx(expected.pop("ce_loss_without_sae"), rel=1e-5)
    for key, value in expected.items():
        assert r["tc"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert r["tc"]["out_site"] == "mlp_out.0" and r["tc"]["site"] == "mlp_in.0"
    assert r["tc"]["ce_loss_with_sae_and_error"] == pytest.approx(r["model"]["ce_loss_without_sae"], abs=1e-5)
    # the SAE beside it is measured at the in-site as ever: an identity rebuilds it, and "model" is its site's
    assert r["sae"]["fvu"] == pytest.approx(0.0, abs=1e-6) and r["sae"]["ce_loss_recovered"] == pytest.approx(1.0)
    assert r["model"]["ce_loss_with_ablation"] != pytest.approx(expected["ce_loss_with_ablation"])
    alone = evaluate(model, "mlp_in.0", ids, {"tc": tc}, batch_size=4, progress=False, reference=reference)
    assert alone["model"]["ce_loss_with_ablation"] == pytest.approx(expected["ce_loss_with_ablation"], rel=1e-4)


def test_a_transcoder_needs_its_out_site():
    model, ids = tiny_pythia(), windows()
    tc = SAE(SAEConfig(d_in=32, d_sae=48, activation="topk", k=4, kind="transcoder", apply_b_dec_to_input=False))
    with pytest.raises(ValueError, match="'tc' is a transcoder whose output site is unknown"):
        evaluate(model, "mlp_in.0", ids, {"tc": tc}, batch_size=4, progress=False)
    r = evaluate(model, "mlp_in.0", ids, {"tc": tc}, batch_size=4, progress=False, out_sites={"tc": "mlp_out.0"},
                 no_error_check=("tc",))
    assert r["tc"]["out_site"] == "mlp_out.0" and "ce_loss_with_sae_and_error" not in r["tc"]
    with pytest.raises(ValueError, match="baselines .* of a transcoder are not defined"):
        evaluate_with_baselines(model, "mlp_in.0", ids, {"tc": tc}, torch.zeros(8, 32), kinds=("pca",))


def test_the_report_of_a_transcoder_and_an_sae_is_written(tmp_path):
    from fastsae.evaluation.eval_report import write_report

    model, ids = tiny_pythia(), windows()
    tc = SAE(SAEConfig(d_in=32, d_sae=48, activation="topk", k=4, kind="transcoder", apply_b_dec_to_input=False))
    r = evaluate(model, "mlp_in.0", ids, {"sae": identity_sae(32), "tc": tc}, batch_size=4, progress=False,
                 out_sites={"tc": "mlp_out.0"})
    files = write_report(tmp_path, r)
    assert (tmp_path / "metrics.json").is_file() and all(f.is_file() for f in files)
