"""Transcoders and skip transcoders (SAEConfig.kind, fastsae/transcoder.py): the forward and every gradient
against a dense float64 transcoder written out here, on every backend and odd shapes; the target and skip term
through AuxK and the Matryoshka loss; the config's and forward's refusals; save/load and scale folding."""

import pytest
import torch

from fastsae import SAE, SAEConfig, use_backend
from fastsae.ops import triton_backend  # noqa: F401 (the Triton backend must import on CPU too)

from helpers import assert_close, float64_copy

KINDS = ("transcoder", "skip_transcoder")


def make_transcoder(kind, d_in=13, d_sae=37, activation="relu", k=None, seed=0, **kw) -> SAE:
    """A transcoder with non-trivial biases and W_skip, so that every term is exercised."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, kind=kind, apply_b_dec_to_input=False,
                        **kw), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=gen))
        if kind == "skip_transcoder":
            sae.W_skip.copy_(0.2 * torch.randn(d_in, d_in, generator=gen))
    return sae


def dense_transcoder(sae: SAE, x, y):
    """float64 (ŷ, loss) of a relu or topk transcoder written out densely: z = act(W_enc x + b_enc), no b_dec
    subtracted; ŷ = W_dec z + b_dec + W_skip x; loss = mean_n ||y - ŷ||² + λ Σ_i z_i ||W_dec[i]||."""
    pre = x @ sae.W_enc.T + sae.b_enc  # (N, d_sae)
    z = pre.relu()
    if sae.cfg.activation == "topk":
        keep = torch.zeros_like(z).scatter(-1, pre.topk(sae.cfg.k, dim=-1).indices, 1.0)
        z = z * keep
    y_hat = z @ sae.W_dec + sae.b_dec
    if sae.cfg.kind == "skip_transcoder":
        y_hat = y_hat + x @ sae.W_skip.T
    loss = (y - y_hat).pow(2).sum(-1).mean()
    if sae.cfg.activation == "relu":
        loss = loss + sae.cfg.l1_coefficient * (z * sae.W_dec.norm(dim=1)).sum(-1).mean()
    return y_hat, loss


def grads_of(sae: SAE, x, y, backend, **kw):
    sae.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with use_backend(backend):
        out = sae(x, target=y, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in sae.named_parameters() if p.grad is not None}
    return out, {**grads, "x": x.grad.detach().clone()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4)])
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_forward_and_gradients_match_the_dense_float64_transcoder(kind, activation, k, backend):
    sae = make_transcoder(kind, 13, 37, activation, k)
    ref = float64_copy(sae)
    x, y = torch.randn(19, 13), torch.randn(19, 13)
    x64 = x.double().requires_grad_(True)
    y_hat_ref, loss_ref = dense_transcoder(ref, x64, y.double())
    loss_ref.backward()
    want = {n: p.grad for n, p in ref.named_parameters()} | {"x": x64.grad}
    model, inputs = (ref, (x.double(), y.double())) if backend == "reference" else (sae, (x, y))
    out, got = grads_of(model, *inputs, backend)
    assert_close(out.x_hat, y_hat_ref.detach(), torch.float32, scale=4)
    assert_close(out.loss, loss_ref.detach(), torch.float32, scale=20)
    assert set(got) == set(want) and ("W_skip" in got) == (kind == "skip_transcoder")
    for name, g in want.items():
        assert_close(got[name], g, torch.float32, scale=20, msg=f"grad of {name}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation,k", [("jumprelu", None), ("batchtopk", 3), ("topk", 1)])
def test_every_backend_matches_the_reference_backend_on_leading_dims(kind, activation, k):
    sae = make_transcoder(kind, 11, 29, activation, k)
    ref = float64_copy(sae)
    x, y = torch.randn(3, 7, 11), torch.randn(3, 7, 11)
    out_ref, want = grads_of(ref, x.double(), y.double(), "reference")
    for backend in ("torch", "triton"):
        out, got = grads_of(sae, x, y, backend)
        assert out.x_hat.shape == (3, 7, 11)
        assert_close(out.x_hat, out_ref.x_hat, torch.float32, scale=4)
        assert_close(out.loss, out_ref.loss, torch.float32, scale=20)
        assert set(got) == set(want)
        for name, g in want.items():
            assert_close(got[name], g, torch.float32, scale=20, msg=f"{backend}: grad of {name}")


def test_the_loss_is_against_the_target_and_decode_leaves_out_the_skip_term():
    sae = make_transcoder("skip_transcoder", activation="topk", k=3)
    x, y = torch.randn(5, 13), torch.randn(5, 13)
    out = sae(x, target=y)
    torch.testing.assert_close(out.mse, (y - out.x_hat).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.x_hat, sae.decode(sae.encode(x)) + sae.skip(x))
    assert not torch.allclose(sae(x, target=x).loss, out.loss)  # the target, not x, is what is rebuilt


@pytest.mark.parametrize("kind", KINDS)
def test_auxk_rebuilds_the_residual_of_the_target(kind):
    """All latents dead and k_aux = d_sae: AuxK is the mse of the dense relu(pre) decode (no b_dec) against
    the detached y - ŷ."""
    sae = float64_copy(make_transcoder(kind, 13, 37, "topk", 4))
    x, y = torch.randn(9, 13, dtype=torch.float64), torch.randn(9, 13, dtype=torch.float64)
    with use_backend("reference"):
        out = sae(x, target=y, dead_mask=torch.ones(37, dtype=torch.bool), k_aux=37)
    y_hat, _ = dense_transcoder(sae, x, y)
    e_hat = (x @ sae.W_enc.T + sae.b_enc).relu() @ sae.W_dec
    torch.testing.assert_close(out.auxk, ((y - y_hat) - e_hat).pow(2).sum(-1).mean().detach())


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_matryoshka_prefixes_carry_the_skip_term(backend):
    sae = float64_copy(make_transcoder("skip_transcoder", 13, 37, "topk", 5, matryoshka_widths=(7, 20)))
    x, y = torch.randn(11, 13, dtype=torch.float64), torch.randn(11, 13, dtype=torch.float64)
    out, got = grads_of(sae, x, y, backend)
    sae.zero_grad(set_to_none=True)
    x64 = x.clone().requires_grad_(True)
    with use_backend("reference"):
        latents = sae.encode(x64)
    z = latents.to_dense()
    losses = []
    for m in (7, 20, 37):  # each prefix's decode written out, with the skip term
        y_hat = z[:, :m] @ sae.W_dec[:m] + sae.b_dec + x64 @ sae.W_skip.T
        losses.append((y - y_hat).pow(2).sum(-1).mean())
    torch.stack(losses).mean().backward()
    torch.testing.assert_close(out.prefix_mse, torch.stack(losses).detach())
    for name, p in [*sae.named_parameters(), ("x", x64)]:
        torch.testing.assert_close(got[name], p.grad, msg=f"grad of {name}")


@pytest.mark.parametrize("kw,match", [
    (dict(kind="causal_crosscoder"), "SAEConfig.kind must be one of"),
    (dict(kind="transcoder"), "apply_b_dec_to_input=False"),
    (dict(kind="skip_transcoder", apply_b_dec_to_input=False, tied=True), "tied=False"),
])
def test_config_refuses_bad_kinds_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(d_in=8, d_sae=16, **kw)


def test_forward_refuses_a_missing_or_bad_target_naming_it():
    sae = make_transcoder("skip_transcoder")
    x = torch.randn(4, 13)
    with pytest.raises(ValueError, match="target: a skip_transcoder predicts another site"):
        sae(x)
    with pytest.raises(ValueError, match="target must have x's shape"):
        sae(x, target=torch.randn(4, 12))
    with pytest.raises(ValueError, match="target must have x's dtype"):
        sae(x, target=torch.randn(4, 13, dtype=torch.float64))
    with pytest.raises(ValueError, match="target contains NaN"):
        sae(x, target=torch.full((4, 13), float("nan")))
    plain = SAE(SAEConfig(d_in=13, d_sae=37))
    with pytest.raises(ValueError, match="target: an SAE"):
        plain(x, target=x)
    with pytest.raises(ValueError, match="skip: only a skip_transcoder"):
        make_transcoder("transcoder").skip(x)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_keeps_the_kind_and_w_skip(kind, tmp_path):
    sae = make_transcoder(kind, activation="topk", k=4)
    sae.metadata = {"site": "mlp_in.1", "out_site": "mlp_out.1"}
    loaded = SAE.load(sae.save(tmp_path / "tc"))
    assert loaded.cfg == sae.cfg and loaded.metadata == sae.metadata
    assert set(loaded.state_dict()) == set(sae.state_dict())
    for name, t in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    x, y = torch.randn(6, 13), torch.randn(6, 13)
    assert torch.equal(loaded(x, target=y).x_hat, sae(x, target=y).x_hat)


@pytest.mark.parametrize("kind", KINDS)
def test_folding_input_and_output_scales_is_exact(kind):
    """Trained on (s·x, t·y), folded: raw x gives the same latents and ŷ/t."""
    sae = float64_copy(make_transcoder(kind, activation="relu"))
    s, t = 3.0, 0.25
    x, y = torch.randn(7, 13, dtype=torch.float64), torch.randn(7, 13, dtype=torch.float64)
    with use_backend("reference"):
        before = sae(s * x, target=t * y)
        sae.fold_input_scale_(s, output_scale=t)
        after = sae(x, target=y)
    torch.testing.assert_close(after.latents.to_dense(), before.latents.to_dense())
    torch.testing.assert_close(after.x_hat * t, before.x_hat)
    assert sae.metadata == {"input_scale_folded": s, "output_scale_folded": t}
    with pytest.raises(ValueError, match="output_scale: an SAE's output is its input"):
        SAE(SAEConfig(d_in=4, d_sae=8)).fold_input_scale_(2.0, output_scale=3.0)


def test_ensemble_refuses_transcoders():  # latent sharding trains them: tests/train/test_sharded_kinds.py
    from fastsae.ensemble import SAEEnsemble

    cfg = SAEConfig(d_in=8, d_sae=16, kind="transcoder", apply_b_dec_to_input=False)
    with pytest.raises(ValueError, match="members must be SAEs"):
        SAEEnsemble([SAE(cfg)])


def test_exports_refuse_transcoders_rather_than_drop_w_skip(tmp_path):
    from fastsae.interop import export_saelens, export_sparsify

    sae = make_transcoder("skip_transcoder", activation="topk", k=4)
    with pytest.raises(ValueError, match="export_saelens: exports SAEs"):
        export_saelens(sae, tmp_path / "saelens")
    # sparsify has skip transcoders (tests/modules/test_interop_transcoders.py), but no relu ones
    with pytest.raises(ValueError, match="export_sparsify"):
        export_sparsify(make_transcoder("skip_transcoder"), tmp_path / "sparsify")
