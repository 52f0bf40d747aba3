"""Crosscoders (SAEConfig.kind "crosscoder", fastsae/crosscoder.py): the forward and every gradient against a
dense float64 crosscoder written out per site here (Σ_l W_enc^l x_l, per-site decoders, the penalty weighted by
Σ_l ||W_dec^l[i]||), on every backend and odd shapes (L 3, d 7, d_sae 37, N 19); decoder_norms and its gradient;
the config's refusals; per-site fit; exact folding of per-site scales; save/load; torch.compile."""

import pytest
import torch

from fastsae import SAE, SAEConfig, use_backend
from fastsae.crosscoder import fold_site_scales_, site_fit, split_sites
from fastsae.losses import decoder_norms, fvu, sparsity_terms
from fastsae.ops import custom_ops  # noqa: F401 (registers torch.ops.fastsae for the compile test)

from helpers import assert_close, float64_copy

L, D, D_SAE, N = 3, 7, 37, 19


def make_crosscoder(activation="relu", k=None, seed=0, **kw) -> SAE:
    """A crosscoder whose per-site blocks have different norms and non-trivial biases."""
    sae = SAE(SAEConfig(d_in=L * D, d_sae=D_SAE, activation=activation, k=k, kind="crosscoder", n_sites=L, **kw),
              seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(L * D, generator=gen))
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=gen))
        sae.W_dec.mul_(torch.tensor([0.5, 1.0, 2.0]).repeat_interleave(D))  # sites weigh differently
    return sae


def dense_crosscoder(sae: SAE, x):
    """float64 (x̂, loss) written per site: z = act(Σ_l W_enc^l (x_l - b_dec^l) + b_enc), x̂_l = W_dec^l z + b_dec^l,
    loss = Σ_l mean_n ||x_l - x̂_l||² + λ Σ_i z_i Σ_l ||W_dec^l[i]|| (relu), or no penalty (topk)."""
    blocks = lambda t: t.split(D, dim=-1)  # noqa: E731
    sites = zip(blocks(x), blocks(sae.b_dec), blocks(sae.W_enc), strict=True)
    pre = sae.b_enc + sum((xl - bl) @ Wl.T for xl, bl, Wl in sites)  # Σ_l W_enc^l (x_l - b_dec^l) + b_enc
    z = pre.relu()
    if sae.cfg.activation == "topk":
        z = z * torch.zeros_like(z).scatter(-1, pre.topk(sae.cfg.k, dim=-1).indices, 1.0)
    x_hats = [z @ Wl + bl for Wl, bl in zip(blocks(sae.W_dec), blocks(sae.b_dec), strict=True)]
    loss = sum((xl - xl_hat).pow(2).sum(-1).mean() for xl, xl_hat in zip(blocks(x), x_hats, strict=True))
    if sae.cfg.activation == "relu":
        weights = sum(Wl.norm(dim=1) for Wl in blocks(sae.W_dec))  # (d_sae,)
        loss = loss + sae.cfg.l1_coefficient * (z * weights).sum(-1).mean()
    return torch.cat(x_hats, dim=-1), loss


def grads_of(sae: SAE, x, backend, model=None):
    """The output of model (default sae) and the gradients of sae's parameters and x."""
    sae.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with use_backend(backend):
        out = (sae if model is None else model)(x)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in sae.named_parameters()} | {"x": x.grad.detach().clone()}


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4)])
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_forward_and_gradients_match_the_dense_float64_crosscoder(activation, k, backend):
    sae = make_crosscoder(activation, k)
    ref = float64_copy(sae)
    x = torch.randn(N, L * D) * torch.tensor([1.0, 3.0, 0.3]).repeat_interleave(D)
    x64 = x.double().requires_grad_(True)
    x_hat_ref, loss_ref = dense_crosscoder(ref, x64)
    loss_ref.backward()
    want = {n: p.grad for n, p in ref.named_parameters()} | {"x": x64.grad}
    model, inputs = (ref, x.double()) if backend == "reference" else (sae, x)
    out, got = grads_of(model, inputs, backend)
    assert_close(out.x_hat, x_hat_ref.detach(), torch.float32, scale=8)
    assert_close(out.loss, loss_ref.detach(), torch.float32, scale=40)
    for name, g in want.items():
        assert g.abs().max() > 0, f"{name}'s gradient is zero: the test could not fail"
        assert_close(got[name], g, torch.float32, scale=40, msg=f"grad of {name}")


def test_the_penalty_is_not_the_whole_rows_norm():
    """The weighting the dense reference checks differs from an SAE's on the same weights (the test can fail)."""
    sae = make_crosscoder()
    per_site = decoder_norms(sae.cfg, sae.W_dec)
    assert (per_site > sae.W_dec.norm(dim=1) * 1.05).all()  # Σ_l ||W^l|| > ||W|| for rows spread over sites
    plain = SAEConfig(d_in=L * D, d_sae=D_SAE)
    torch.testing.assert_close(decoder_norms(plain, sae.W_dec), sae.W_dec.norm(dim=1))


def test_decoder_norms_gradient_matches_the_per_site_formula_in_float64():
    cfg = SAEConfig(d_in=L * D, d_sae=D_SAE, kind="crosscoder", n_sites=L)
    W = torch.randn(D_SAE, L * D, dtype=torch.float64)
    W[3, D:2 * D] = 0.0  # a latent that does not write site 1: its norm there has no direction
    weights = torch.randn(D_SAE, dtype=torch.float64)
    W1 = W.clone().requires_grad_(True)
    (decoder_norms(cfg, W1) * weights).sum().backward()
    blocks = W.reshape(D_SAE, L, D)
    unit = blocks / blocks.norm(dim=2, keepdim=True).clamp_min(1e-300)  # d||w||/dw = w/||w||, 0 at w = 0
    torch.testing.assert_close(W1.grad, (weights[:, None, None] * unit).reshape(D_SAE, L * D))
    assert torch.isfinite(W1.grad).all() and (W1.grad[3, D:2 * D] == 0).all()
    assert torch.autograd.gradcheck(lambda w: decoder_norms(cfg, w), (W[:5].clone().requires_grad_(True),))


def test_jumprelu_tanh_weighs_by_the_per_site_norms():
    sae = make_crosscoder("jumprelu", jumprelu_sparsity="tanh")
    values, indices = torch.rand(N, 5), torch.randint(0, D_SAE, (N, 5))
    _, l0 = sparsity_terms(sae.cfg, values, indices, None, sae.threshold, sae.W_dec)
    weights = sum(Wl.norm(dim=1) for Wl in sae.W_dec.split(D, dim=1))
    torch.testing.assert_close(l0, torch.tanh(4.0 * values * weights[indices]).sum(-1).mean())


def test_config_refusals_and_old_configs():
    with pytest.raises(ValueError, match="n_sites must be >= 2 for kind='crosscoder'"):
        SAEConfig(d_in=12, d_sae=8, kind="crosscoder")
    with pytest.raises(ValueError, match="n_sites must be >= 2 for kind='crosscoder' and 1"):
        SAEConfig(d_in=12, d_sae=8, n_sites=3)
    with pytest.raises(ValueError, match="d_in=13 must be divisible by n_sites=3"):
        SAEConfig(d_in=13, d_sae=8, kind="crosscoder", n_sites=3)
    with pytest.raises(ValueError, match="n_sites must be a positive int"):
        SAEConfig(d_in=12, d_sae=8, kind="crosscoder", n_sites=2.0)
    old = SAEConfig(d_in=12, d_sae=8).to_dict()
    del old["n_sites"]  # written before crosscoders
    assert SAEConfig.from_dict(old).n_sites == 1
    with pytest.raises(ValueError, match="target: an SAE"):
        make_crosscoder()(torch.randn(2, L * D), target=torch.randn(2, L * D))


def test_site_fit_splits_the_mse_and_gives_each_sites_fvu():
    sae = make_crosscoder()
    x = torch.randn(N, L * D)
    with torch.no_grad():
        out = sae(x)
    fit = site_fit(sae.cfg, x, out.x_hat)
    assert sum(fit["mse"]) == pytest.approx(float(out.mse), rel=1e-5)
    for site, (xl, xl_hat) in enumerate(zip(split_sites(sae.cfg, x), split_sites(sae.cfg, out.x_hat), strict=True)):
        assert fit["fvu"][site] == pytest.approx(fvu(xl, xl_hat), rel=1e-12)
    assert len(set(fit["fvu"])) == L  # the sites' numbers are their own


def test_folding_per_site_scales_is_exact():
    sae = float64_copy(make_crosscoder("topk", 5))
    scales = (0.5, 3.0, 1.7)
    s = torch.tensor(scales, dtype=torch.float64).repeat_interleave(D)
    x = torch.randn(N, L * D, dtype=torch.float64)
    with torch.no_grad():
        trained = sae(x * s)
        folded = fold_site_scales_(float64_copy(sae), scales)
        raw = folded(x)
    torch.testing.assert_close(raw.latents.to_dense(), trained.latents.to_dense(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(raw.x_hat, trained.x_hat / s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(folded.W_enc[:, D:2 * D], sae.W_enc[:, D:2 * D] * 3.0)
    torch.testing.assert_close(folded.W_dec[:, 2 * D:], sae.W_dec[:, 2 * D:] / 1.7)
    torch.testing.assert_close(folded.b_dec[:D], sae.b_dec[:D] / 0.5)
    assert folded.metadata["site_scales_folded"] == list(scales)
    with pytest.raises(ValueError, match="scales must be 3 finite numbers > 0"):
        fold_site_scales_(folded, (1.0, 2.0))
    with pytest.raises(ValueError, match="per-site scales are a crosscoder's"):
        fold_site_scales_(SAE(SAEConfig(d_in=6, d_sae=4)), (1.0,))


def test_save_and_load_round_trip(tmp_path):
    sae = make_crosscoder("topk", 4)
    sae.metadata["sites"] = ["resid_post.1", "resid_post.2", "resid_post.3"]
    loaded = SAE.load(sae.save(tmp_path / "cc"))
    assert loaded.cfg == sae.cfg and loaded.metadata == sae.metadata
    x = torch.randn(5, L * D)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)


@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4)])
def test_compiled_crosscoder_forward_and_backward_equal_eager(activation, k):
    torch._dynamo.reset()
    sae, x = make_crosscoder(activation, k), torch.randn(N, L * D)
    ref, ref_grads = grads_of(sae, x, "torch")
    out, grads = grads_of(sae, x, "torch", torch.compile(sae))
    torch._dynamo.reset()
    torch.testing.assert_close(out.x_hat, ref.x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
