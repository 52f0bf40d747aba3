"""Resampling, checked rule by rule against Anthropic's written procedure; AuxK revives latents."""

import pytest
import torch

from fastsae import SAE, SAEConfig, use_backend
from fastsae.toy import ToyDictionary
from fastsae.train import TrainConfig, Trainer, train
from fastsae.train.resample import draw_inputs, resample_dead_latents


def _sae_with_known_norms():
    sae = SAE(SAEConfig(4, 6, activation="relu", l1_coefficient=0.1), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4).repeat(2, 1)[:6] * torch.tensor([2.0, 9.0, 3.0, 4.0, 9.0, 5.0])[:, None])
        sae.b_enc.copy_(torch.arange(1.0, 7.0))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5, 1.0, 2.0]))  # raw vs centred inputs differ
    return sae


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_every_rule_on_a_hand_computed_case(backend):
    sae = _sae_with_known_norms()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sae(torch.randn(8, 4)).loss.backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for n, p in sae.named_parameters()}
    dead = torch.tensor([False, True, False, False, True, False])
    x = torch.tensor([[3.0, 0.0, 4.0, 0.0]])  # the only input in the pool: both dead latents draw it
    with use_backend(backend):
        n = resample_dead_latents(sae, dead, x, opt)
    assert n == 2
    u = torch.tensor([0.6, 0.0, 0.8, 0.0])  # the raw input, unit-normalised
    # Mean encoder-row norm of the alive latents before the rewrite: (2 + 3 + 4 + 5) / 4 moved by one Adam step.
    alive_norm = before["W_enc"][~dead].norm(dim=1).mean()
    assert abs(alive_norm - 3.5) < 0.05
    for i in (1, 4):
        torch.testing.assert_close(sae.W_dec[i], u)
        torch.testing.assert_close(sae.W_enc[i], u * 0.2 * alive_norm)  # multiplied, not divided
        assert sae.b_enc[i] == 0
        for name, p in (("W_enc", sae.W_enc), ("W_dec", sae.W_dec)):
            assert (opt.state[p]["exp_avg"][i] == 0).all() and (opt.state[p]["exp_avg_sq"][i] == 0).all(), name
        assert opt.state[sae.b_enc]["exp_avg"][i] == 0 and opt.state[sae.b_enc]["exp_avg_sq"][i] == 0
    for name, p in sae.named_parameters():  # the alive latents and b_dec are untouched
        keep = ~dead if p.shape[0] == 6 else torch.ones(p.shape[0], dtype=torch.bool)
        assert torch.equal(p.detach()[keep], before[name][keep]), name
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k][keep], moments[name][k][keep]), (name, k)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_backend_rewrites_as_the_reference(backend):
    dead = torch.tensor([True, False, True, True, False, False])
    pool = torch.randn(50, 4)
    saes = {}
    for name in (backend, "reference"):
        saes[name] = _sae_with_known_norms()
        with use_backend(name):
            resample_dead_latents(saes[name], dead, pool, generator=torch.Generator().manual_seed(3))
    for (name, a), b in zip(saes[backend].named_parameters(), saes["reference"].parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_inputs_are_drawn_proportionally_to_squared_loss():
    losses = torch.tensor([1.0, 2.0, 0.0])  # squared: 1, 4, 0 -> probabilities 0.2, 0.8, 0
    picks = draw_inputs(losses, 20_000, torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=3).float() / 20_000
    assert counts[2] == 0
    assert abs(counts[1].item() - 0.8) < 0.02, counts


def test_resampling_refuses_bad_arguments():
    sae = _sae_with_known_norms()
    with pytest.raises(ValueError, match="dead must be"):
        resample_dead_latents(sae, torch.zeros(5, dtype=torch.bool), torch.randn(3, 4))
    with pytest.raises(ValueError, match="pool must"):
        resample_dead_latents(sae, torch.zeros(6, dtype=torch.bool), torch.randn(3, 5))
    assert resample_dead_latents(sae, torch.zeros(6, dtype=torch.bool), torch.randn(3, 4)) == 0


def _dead_prone(activation, k=None):
    """A toy where plain training leaves many latents dead: a third of them start crippled
    (ReLU: far below zero; TopK: positive but too small to ever win the top-k). TopK gets more
    true features than latents, so that there is residual left for revived latents to explain."""
    torch.manual_seed(0)
    toy = ToyDictionary.random(d_in=16, n_features=32 if k is None else 256, active_per_sample=3.0, seed=0)
    sae = SAE(SAEConfig(16, 96, activation=activation, k=k, l1_coefficient=None if k else 0.3), seed=0)
    with torch.no_grad():
        if k is None:
            sae.b_enc[::3] = -50.0
        else:
            sae.W_enc[::3] *= 0.01
            sae.b_enc[::3] = 1e-3
    return toy, sae


def test_resampling_reduces_dead_latents():
    common = dict(lr=3e-3, progress=False, dead_window_tokens=2048, log_every=50)
    toy, plain = _dead_prone("relu")
    train(plain, toy.batches(256, 300), TrainConfig.flat(**common))
    toy, revived = _dead_prone("relu")
    result = train(revived, toy.batches(256, 300), TrainConfig.flat(**common, resample_every=100, resample_pool=2048))
    assert sum(h.get("resampled", 0) for h in result.history) >= 32

    def never_fire(sae):
        return (sae.encode(toy.sample(4096, torch.Generator().manual_seed(9))).fire_counts() == 0).float().mean()

    assert never_fire(plain) > 0.3
    assert never_fire(revived) < never_fire(plain) / 2


def test_auxk_revives_dead_topk_latents():
    common = dict(lr=3e-3, progress=False, dead_window_tokens=1024, log_every=50)
    toy, plain = _dead_prone("topk", k=4)
    train(plain, toy.batches(256, 300), TrainConfig.flat(**common))
    toy, aux = _dead_prone("topk", k=4)
    result = train(aux, toy.batches(256, 300), TrainConfig.flat(**common, auxk_coefficient=1 / 32, auxk_k=16))
    assert any(h["auxk"] for h in result.history)

    def never_fire(sae):
        return (sae.encode(toy.sample(4096, torch.Generator().manual_seed(9))).fire_counts() == 0).float().mean()

    assert never_fire(plain) > 0.2
    assert never_fire(aux) < never_fire(plain) / 4


def test_auxk_is_refused_for_l1_saes():
    with pytest.raises(ValueError, match="AuxK"):
        Trainer(SAE(SAEConfig(4, 8)), TrainConfig.flat(auxk_coefficient=0.1))
