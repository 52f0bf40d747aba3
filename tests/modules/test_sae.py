"""The public API: config validation, encode/decode, SparseLatents, bad input."""

import pytest
import torch

import fastsae.sae as sae_module
from fastsae import SAE, SAEConfig, SparseLatents, get_backend, set_backend, use_backend

from conftest import make_sae


def test_init_follows_the_field():
    sae = SAE(SAEConfig(d_in=16, d_sae=64), seed=3)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec)
    assert sae.W_enc is not sae.W_dec
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()
    torch.testing.assert_close(SAE(SAEConfig(16, 64), seed=3).W_dec, sae.W_dec)  # seeded
    assert {n for n, _ in sae.named_parameters()} == {"W_enc", "b_enc", "W_dec", "b_dec"}
    jump = SAE(SAEConfig(16, 64, activation="jumprelu"))
    assert jump.threshold.shape == (64,)


def test_tied_shares_one_matrix():
    sae = make_sae(8, 20, "relu", tied=True)
    assert sae.W_enc is sae.W_dec
    assert "W_enc" not in dict(sae.named_parameters())
    out = sae(torch.randn(3, 8))
    out.loss.backward()
    assert sae.W_dec.grad is not None


@pytest.mark.parametrize("kw,match", [
    (dict(d_in=0, d_sae=4), "d_in"),
    (dict(d_in=4, d_sae=-1), "d_sae"),
    (dict(d_in=4, d_sae=8, activation="gelu"), "activation"),
    (dict(d_in=4, d_sae=8, activation="topk"), "k"),
    (dict(d_in=4, d_sae=8, activation="topk", k=0), "k"),
    (dict(d_in=4, d_sae=8, activation="topk", k=9), "k"),
    (dict(d_in=4, d_sae=8, activation="relu", k=2), "k"),
    (dict(d_in=4, d_sae=8, activation="topk", k=2, l1_coefficient=1.0), "l1_coefficient"),
    (dict(d_in=4, d_sae=8, l1_coefficient=-1.0), "l1_coefficient"),
    (dict(d_in=4, d_sae=8, l1_coefficient=float("nan")), "l1_coefficient"),
    (dict(d_in=4, d_sae=8, dtype="float64"), "dtype"),
    (dict(d_in=4, d_sae=8, activation="jumprelu", jumprelu_threshold=0.0), "jumprelu_threshold"),
])
def test_config_refuses_contradictions(kw, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(**kw)


def test_config_defaults_and_round_trip():
    cfg = SAEConfig(4, 8)
    assert cfg.l1_coefficient == 5.0
    assert SAEConfig(4, 8, activation="topk", k=2).l1_coefficient == 0.0
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        SAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 3), ("jumprelu", None)])
def test_encode_decode_and_sparse_latents(activation, k):
    sae = make_sae(9, 31, activation, k)
    x = torch.randn(4, 5, 9)
    lat = sae.encode(x)
    assert isinstance(lat, SparseLatents)
    assert lat.indices.dtype == torch.int64 and lat.values.shape == lat.indices.shape
    assert lat.values.shape[:2] == (4, 5)
    if k:
        assert lat.width == k
    dense = lat.to_dense()
    assert dense.shape == (4, 5, 31)
    assert ((dense > 0).sum(-1) == lat.l0).all()
    torch.testing.assert_close(sae.decode(dense), sae.decode(lat))  # a dense tensor decodes too
    torch.testing.assert_close(sae.decode(lat), sae(x).x_hat)
    counts = lat.reshape(-1).fire_counts()
    assert counts.shape == (31,) and int(counts.sum()) == int(lat.l0.sum())


def test_an_all_zero_dense_batch_decodes_to_b_dec():
    sae = make_sae(6, 10, "relu")
    torch.testing.assert_close(sae.decode(torch.zeros(3, 10)), sae.b_dec.detach().expand(3, 6))


def test_compact_form_pads_inertly():
    lat = SparseLatents.from_dense(torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]]))
    assert lat.width == 2
    assert lat.l0.tolist() == [2, 1]
    torch.testing.assert_close(lat.to_dense(), torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]]))


def test_loss_terms():
    sae = make_sae(6, 14, "relu", l1_coefficient=0.5)
    x = torch.randn(7, 6)
    out = sae(x)
    torch.testing.assert_close(out.mse, (out.x_hat - x).pow(2).sum(-1).mean())
    dense = out.latents.to_dense()
    torch.testing.assert_close(out.l1, (dense * sae.W_dec.norm(dim=1)).sum(-1).mean())
    torch.testing.assert_close(out.loss, out.mse + 0.5 * out.l1)
    plain = make_sae(6, 14, "relu", l1_coefficient=0.5, decoder_norm_l1=False)
    o = plain(x)
    torch.testing.assert_close(o.l1, o.latents.to_dense().sum(-1).mean())
    topk = make_sae(6, 14, "topk", k=2)(x)
    assert topk.l1 is None and torch.equal(topk.loss, topk.mse)


def test_no_b_dec_pre_subtraction():
    sae = make_sae(6, 14, "relu", apply_b_dec_to_input=False)
    x = torch.randn(3, 6)
    pre = torch.relu(x @ sae.W_enc.T + sae.b_enc).detach()
    torch.testing.assert_close(sae.encode(x).to_dense(), pre)


@pytest.mark.parametrize("bad,exc,match", [
    ("not a tensor", TypeError, "torch.Tensor"),
    (torch.randn(3, 5), ValueError, r"d_in=6"),
    (torch.randn(()), ValueError, r"d_in=6"),
    (torch.randn(0, 6), ValueError, "at least one row"),
    (torch.randn(3, 6).double(), TypeError, "dtype"),
    (torch.randn(3, 6).half(), TypeError, "dtype"),
    (torch.ones(3, 6, dtype=torch.int64), TypeError, "float32"),
    (torch.tensor([[float("nan")] * 6]), ValueError, "NaN or Inf"),
    (torch.tensor([[float("inf")] * 6]), ValueError, "NaN or Inf"),
])
def test_bad_input_is_refused(bad, exc, match):
    sae = make_sae(6, 10, "topk", k=2)
    with pytest.raises(exc, match=match):
        sae(bad)
    with pytest.raises(exc, match=match):
        sae.encode(bad)


def test_device_mismatch_is_refused():
    sae = make_sae(6, 10, "relu")
    x = torch.randn(2, 6, device="meta")
    with pytest.raises(ValueError, match="meta"):
        sae(x)


def test_decode_refuses_wrong_latents():
    sae = make_sae(6, 10, "relu")
    with pytest.raises(ValueError, match="d_sae=10"):
        sae.decode(torch.randn(2, 11))
    with pytest.raises(ValueError, match="d_sae=10"):
        sae.decode(SparseLatents(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), 12))
    with pytest.raises(TypeError, match="SparseLatents"):
        sae.decode([1, 2])
    with pytest.raises(ValueError, match="same shape"):
        SparseLatents(torch.ones(2, 2), torch.zeros(2, 1, dtype=torch.long), 10)


def test_backend_choice(monkeypatch):
    assert get_backend(torch.device("cpu")) == "torch"
    with use_backend("reference"):
        assert get_backend() == "reference"
    assert get_backend() == "torch"
    monkeypatch.setenv("FASTSAE_BACKEND", "reference")
    assert get_backend() == "reference"
    monkeypatch.setenv("FASTSAE_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTSAE_BACKEND"):
        get_backend()
    with pytest.raises(ValueError, match="backend"):
        set_backend("numpy")


def test_input_dtype_follows_the_module():
    sae = make_sae(6, 10, "relu").to(torch.bfloat16)
    out = sae(torch.randn(3, 6, dtype=torch.bfloat16))
    assert out.x_hat.dtype == torch.bfloat16 and out.loss.dtype == torch.float32


def test_a_jumprelu_config_written_before_theta_trained_keeps_its_l1_training():
    old = SAEConfig(d_in=4, d_sae=8, activation="jumprelu").to_dict()
    del old["jumprelu_sparsity"]
    assert SAEConfig.from_dict(old).jumprelu_sparsity == "l1"
    assert SAEConfig(d_in=4, d_sae=8, activation="jumprelu").jumprelu_sparsity == "step"


@pytest.mark.parametrize("n_dead, k_aux", [(40, 7), (5, 7), (97, 97)])
def test_auxk_dense_on_cpu_matches_the_sparse_path(monkeypatch, n_dead, k_aux):
    """On CPU, AuxK over few dead latents takes fastsae.sae.dense_topk_decode; its loss and every gradient
    equal the sparse encode_topk + decode path's (DENSE_AUXK_WIDTH 0 forces that), in float64."""
    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_in=13, d_sae=97, activation="topk", k=4)).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(11, 13, dtype=torch.float64)
    dead = torch.zeros(97, dtype=torch.bool)
    dead[torch.randperm(97)[:n_dead]] = True

    def auxk_and_grads():
        sae.zero_grad(set_to_none=True)
        out = sae(x, dead_mask=dead, k_aux=k_aux)
        out.auxk.backward()
        return out.auxk.detach(), [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]

    dense = auxk_and_grads()
    monkeypatch.setattr(sae_module, "DENSE_AUXK_WIDTH", 0)
    with use_backend("reference"):
        sparse = auxk_and_grads()
    assert dense[0] > 0
    torch.testing.assert_close(dense[0], sparse[0])
    for got, want in zip(dense[1], sparse[1], strict=True):
        torch.testing.assert_close(got, want)
