"""Activation correlation between two SAEs' latents: blockwise fp32 against a float64 torch.corrcoef reference,
dead latents, self and permuted copies, bad input, and `fastsae compare --correlation-store`."""

import json
import math

import pytest
import torch

from fastsae.analysis.compare.activation_correlation import activation_correlation, correlation_on_store
from fastsae.harvest import ActivationStore, StoreWriter

from conftest import make_sae

SITE = "resid_post.6"


def _x(n=103, d=13, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _with_dead(sae):
    """Latent 3 never fires; latent 5 fires with the same value on every token (no variance): both are dead."""
    with torch.no_grad():
        sae.b_enc[3] = -1e4
        sae.W_enc[5] = 0  # W_enc is (d_sae, d_in)
        sae.b_enc[5] = 0.5
    return sae


def _reference(sae_a, sae_b, x):
    """Dense float64 Pearson r of every pair of latents (torch.corrcoef), NaN rows/columns for dead latents."""
    a = sae_a.encode(x).to_dense().detach().double()  # (N, d_a)
    b = sae_b.encode(x).to_dense().detach().double()
    dead_a, dead_b = a.max(0).values == a.min(0).values, b.max(0).values == b.min(0).values
    r = torch.corrcoef(torch.cat([a, b], dim=1).T)[:a.shape[1], a.shape[1]:]  # (d_a, d_b)
    r[dead_a] = math.nan
    r[:, dead_b] = math.nan
    return r, dead_a, dead_b


def _check_side(mx, best, r, dead):
    live = ~dead
    ref = r[live].nan_to_num(-math.inf)  # dead columns never win
    assert torch.equal(mx[dead].isnan(), torch.ones(int(dead.sum()), dtype=torch.bool))
    assert (best[dead] == -1).all()
    torch.testing.assert_close(mx[live].double(), ref.max(1).values, atol=2e-6, rtol=0)
    # the chosen partner's reference correlation is the max (robust to fp32 near-ties)
    chosen = ref.gather(1, best[live][:, None])[:, 0]
    torch.testing.assert_close(chosen, ref.max(1).values, atol=2e-6, rtol=0)


@pytest.mark.parametrize("block", [4096, 5])
@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4)])
def test_matches_the_float64_corrcoef_reference_with_dead_latents(block, activation, k):
    sae_a = _with_dead(make_sae(d_in=13, d_sae=37, activation=activation, k=k, seed=0))
    sae_b = make_sae(d_in=13, d_sae=29, activation=activation, k=k, seed=3)
    with torch.no_grad():
        sae_b.b_enc[[0, 28]] = -1e4
    x = _x()
    corr = activation_correlation(sae_a, sae_b, x, tau=0.5, block=block)
    r, dead_a, dead_b = _reference(sae_a, sae_b, x)
    assert dead_a[3] and dead_a[5] and dead_b[0] and dead_b[28]
    _check_side(corr.max_ab, corr.best_ab, r, dead_a)
    _check_side(corr.max_ba, corr.best_ba, r.T, dead_b)
    s = corr.summary()
    assert s["tokens"] == 103 and s["dead_a"] == int(dead_a.sum()) and s["dead_b"] == int(dead_b.sum())
    assert s["live_a"] + s["dead_a"] == 37 and s["live_b"] + s["dead_b"] == 29
    best_a = r[~dead_a].nan_to_num(-math.inf).max(1).values
    assert s["mean_max_corr_ab"] == pytest.approx(float(best_a.mean()), abs=1e-6)
    assert s["frac_a_matched"] == pytest.approx(float((best_a >= 0.5).double().mean()))
    best_b = r.T[~dead_b].nan_to_num(-math.inf).max(1).values
    assert s["mean_max_corr_ba"] == pytest.approx(float(best_b.mean()), abs=1e-6)


def test_an_sae_against_itself_and_a_permuted_copy():
    sae = _with_dead(make_sae(d_in=13, d_sae=37, seed=1))
    x = _x(seed=1)
    corr = activation_correlation(sae, sae, x)
    live = ~corr.max_ab.isnan()
    assert int((~live).sum()) == 2
    torch.testing.assert_close(corr.max_ab[live], torch.ones(35), atol=1e-5, rtol=0)
    assert torch.equal(corr.best_ab[live], torch.arange(37)[live]) and corr.summary()["frac_a_matched"] == 1.0
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(4))  # B's latent r is A's latent perm[r]
    copy = make_sae(d_in=13, d_sae=37, seed=1)
    with torch.no_grad():
        copy.W_enc.copy_(sae.W_enc[perm])
        copy.b_enc.copy_(sae.b_enc[perm])
        copy.W_dec.copy_(sae.W_dec[perm])
        copy.b_dec.copy_(sae.b_dec)
    corr = activation_correlation(sae, copy, x)
    inverse = torch.argsort(perm)
    assert torch.equal(corr.best_ba[live[perm]], perm[live[perm]])
    assert torch.equal(corr.best_ab[live], inverse[live])
    assert corr.summary()["mean_max_corr_ab"] == pytest.approx(1.0, abs=1e-5)


def _store(path, x, site=SITE):
    with StoreWriter(path, model="m", sites={site: x.shape[1]}, dtype=torch.float32, context_size=x.shape[0],
                     excluded_token_ids=[]) as writer:
        n = x.shape[0]
        writer.add({site: x[None]}, torch.ones(1, n, dtype=torch.int64), torch.ones(1, n, dtype=torch.bool), 0)
        writer.flush()
    return ActivationStore(path)


def test_bad_input_is_named(tmp_path):
    a, b = make_sae(d_in=13, d_sae=37), make_sae(d_in=12, d_sae=29)
    with pytest.raises(ValueError, match="sae_a and sae_b must take the same d_in"):
        activation_correlation(a, b, _x())
    with pytest.raises(ValueError, match=r"x must hold N >= 2 tokens"):
        activation_correlation(a, a, _x(n=1))
    with pytest.raises(ValueError, match=r"x must be \(N, d_in=13\)"):
        activation_correlation(a, a, _x(d=12))
    with pytest.raises(ValueError, match="sae_b must be an SAE"):
        activation_correlation(a, torch.randn(4, 13), _x())
    dead = make_sae(d_in=13, d_sae=37)
    with torch.no_grad():
        dead.b_enc.fill_(-1e4)
    with pytest.raises(ValueError, match="sae_b: no latent varies"):
        activation_correlation(a, dead, _x())
    store = _store(tmp_path / "s", _x())
    with pytest.raises(ValueError, match="site 'mlp_out.6' is not in the correlation store"):
        correlation_on_store(a, a, store, "mlp_out.6", 100)
    with pytest.raises(ValueError, match="tokens must be an int >= 2"):
        correlation_on_store(a, a, store, SITE, 1)
    corr = correlation_on_store(a, a, store, SITE, 50)
    assert corr.tokens == 50


def test_compare_command_adds_the_activation_correlation(tmp_path, capsys):
    from fastsae.cli import main

    x = _x(n=103)
    _store(tmp_path / "heldout", x)
    sae_a = _with_dead(make_sae(d_in=13, d_sae=37, seed=0))
    sae_b = make_sae(d_in=13, d_sae=29, seed=3)
    for sae, name in ((sae_a, "a"), (sae_b, "b")):
        sae.metadata.update(site=SITE)
        sae.save(tmp_path / name)
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--tau", "0.7", "--out", str(out),
                 "--correlation-store", str(tmp_path / "heldout"), "--correlation-tokens", "80"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "comparison.json").read_text())["activation_correlation"]
    expected = activation_correlation(sae_a, sae_b, x[:80], tau=0.7)
    s = report["summary"]
    assert s["tokens"] == 80 and s["site"] == SITE and s["dead_a"] == 2 and s["tau"] == 0.7
    assert s["mean_max_corr_ab"] == pytest.approx(expected.summary()["mean_max_corr_ab"], abs=1e-6)
    assert report["a_to_b"]["best"] == expected.best_ab.tolist() and report["a_to_b"]["max_corr"][3] is None
    assert len(report["b_to_a"]["max_corr"]) == 29 and "activation correlation" in printed
    # a direction file is not an SAE: no activations to correlate
    from safetensors.torch import save_file
    save_file({"d": torch.randn(5, 13)}, str(tmp_path / "d.safetensors"))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "o2"),
                 "--correlation-store", str(tmp_path / "heldout")]) == 2
    assert "--correlation-store needs two SAEs" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o3"),
                 "--correlation-store", str(tmp_path / "heldout"), "--site", "mlp_out.6"]) == 2
    assert "site 'mlp_out.6' is not in the correlation store" in capsys.readouterr().err
