"""ops/screened_topk.py: TopK's selection by a bf16 screen, an fp32 rescore and a certificate is the top k of the
float64 pre-activations (rows it cannot certify through fp32, NaN rows as torch.topk ranks them); where it runs
(measured once per shape, or forced) and that an SAE trained through it gets the fp32 path's outputs and
gradients."""

import json

import pytest
import torch
import torch.nn.functional as F

from fastsae import SAE, SAEConfig
from fastsae.ops import cpu_gemm, screened_topk
from fastsae.ops.screened_topk import screened_topk as screen


@pytest.fixture(autouse=True)
def fresh_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAE_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu_gemm.SCREEN_ENV, raising=False)
    monkeypatch.setattr(cpu_gemm, "_verdicts", {})


def _data(n, d_in, d_sae, seed=0, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=gen), torch.randn(d_sae, d_in, generator=gen) / d_in**0.5,
            torch.randn(d_sae, generator=gen) * scale)


def _check(x, W, b, k, values, indices):
    ref = torch.topk(F.linear(x.double(), W.double(), b.double()), k, dim=1)
    assert torch.equal(indices.sort(1).values, ref.indices.sort(1).values)
    scale = x.abs().double() @ W.abs().double().max(0).values.unsqueeze(1) + b.abs().max().double()
    assert ((values.double() - ref.values).abs() <= 1e-5 * scale).all()


@pytest.mark.parametrize("n,d_in,d_sae,k", [(37, 45, 1000, 5), (130, 64, 3000, 32), (1, 7, 100, 1), (64, 33, 97, 97)])
def test_it_is_the_float64_top_k(n, d_in, d_sae, k):
    x, W, b = _data(n, d_in, d_sae, seed=n)
    values, indices = screen(x, W, b, k)
    assert values.dtype == torch.float32 and indices.shape == (n, k)
    _check(x, W, b, k, values, indices)


def test_rows_bf16_cannot_rank_take_the_fp32_path(monkeypatch):
    """Rows whose entries sit closer together than bf16 resolves (600 near-copies of one latent): the screen
    cannot rank them, so they are not certified and take one fp32 GEMM, and the result is still the top k."""
    monkeypatch.setattr(screened_topk, "MARGIN", 1)
    x, W, b = _data(40, 32, 2000, seed=1)
    W[:600] = W[0] * (1 + torch.linspace(0, 1e-3, 600)).unsqueeze(1)  # 600 near-copies: bf16 ties them
    x[:20] = W[0] * 3  # rows that pick among the copies
    calls = []
    real = F.linear
    monkeypatch.setattr(screened_topk.F, "linear", lambda *a: calls.append(a[0].dtype) or real(*a))
    values, indices = screen(x, W, b, 8)
    _check(x, W, b, 8, values, indices)
    assert calls.count(torch.float32) == 1  # the uncertified rows, in one fp32 GEMM


def test_a_nan_row_is_ranked_as_torch_topk_ranks_it():
    x, W, b = _data(9, 16, 900, seed=2)
    x[4, 3] = float("nan")
    values, indices = screen(x, W, b, 3)
    assert values[4].isnan().all() and not values[torch.arange(9) != 4].isnan().any()
    keep = torch.arange(9) != 4
    _check(x[keep], W, b, 3, values[keep], indices[keep])


def test_where_it_runs_is_measured_once_and_can_be_forced(monkeypatch, tmp_path):
    x, W, b = _data(64, 32, 1024)
    assert not screened_topk.pays(x, W[:500], b[:500], 4)  # too few latents for the candidates to pay
    assert not screened_topk.pays(x.double(), W.double(), b.double(), 4)
    verdict = screened_topk.pays(x, W, b, 4)
    entries = json.loads((tmp_path / cpu_gemm.CACHE_NAME).read_text())["verdicts"]
    (entry,) = [v for key, v in entries.items() if key.startswith("screen | ")]
    assert entry["path"] == ("on" if verdict else "off") and entry["on_s"] > 0 and entry["off_s"] > 0
    for forced, want in (("on", True), ("off", False)):
        monkeypatch.setenv(cpu_gemm.SCREEN_ENV, forced)
        assert screened_topk.pays(x, W, b, 4) is want
    monkeypatch.setenv(cpu_gemm.SCREEN_ENV, "sometimes")
    with pytest.raises(ValueError, match="FASTSAE_CPU_SCREEN must be one of auto, on, off"):
        screened_topk.pays(x, W, b, 4)


def test_an_sae_trains_through_it_as_through_the_fp32_path(monkeypatch):
    x = _data(50, 48, 1)[0]
    grads = {}
    for forced in ("on", "off"):
        monkeypatch.setenv(cpu_gemm.SCREEN_ENV, forced)
        sae = SAE(SAEConfig(48, 1024, activation="topk", k=4), seed=0)
        out = sae(x)
        out.loss.backward()
        grads[forced] = (out.x_hat.detach(), *(p.grad for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)))
    for on, off in zip(grads["on"], grads["off"], strict=True):
        torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["random", "coherent"])
def test_the_slack_bounds_what_the_screen_can_hide(case):
    """exact - approx <= slack for every entry, on random data and where every rounding error points the same
    way (inputs just under halfway between bf16 neighbours, signs aligned with the weights)."""
    x, W, b = _data(24, 64, 300, seed=3, scale=2.0)
    if case == "coherent":
        signs = torch.sign(W[:5].sum(0))
        x = signs * (1 + 0.99 * 2.0 ** -8) * torch.linspace(1, 3, 24).unsqueeze(1)
        W = signs * (1 + 0.99 * 2.0 ** -8) * torch.rand(300, 1) / 8
    xb = screened_topk._with_ones(x)
    approx = F.linear(xb, screened_topk._with_bias(W, b)).float()
    gap = F.linear(x.double(), W.double(), b.double()) - approx.double()
    for j in range(W.shape[0]):
        assert (gap[:, j] <= screened_topk._slack(x, xb, W, b, approx[:, j]).double()).all(), j
    assert gap.max() > 0.5 * (screened_topk._slack(x, xb, W, b, approx[:, 0]).max() if case == "coherent" else 0)
