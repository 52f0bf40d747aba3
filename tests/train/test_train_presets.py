"""Anthropic's resampling schedule as a preset, and training without a decoder bias (Cunningham et al.'s tied SAE)."""

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.toy import ToyDictionary
from fastsae.train import TrainConfig, Trainer
from fastsae.train.train_config import DeadLatentConfig


@pytest.mark.parametrize("steps, at, window", [
    (125_000, (25_000, 50_000, 75_000, 100_000), 12_500),  # the paper's own numbers, unscaled
    (2000, (400, 800, 1200, 1600), 200),
    (37, (7, 14, 22, 29), 3),  # 7.4, 14.8, 22.2, 29.6 and 3.7 rounded down
    (5, (1, 2, 3, 4), 1),
])
def test_the_anthropic_preset_scales_the_schedule_to_the_run(steps, at, window):
    dead = DeadLatentConfig.preset("anthropic", steps=steps, batch_size=64)
    assert dead.resample_at == at and dead.window_tokens == window * 64 and dead.resample_every is None
    assert [s for s in range(1, steps + 1) if dead.resamples_at(s)] == list(at)
    assert max(at) <= 0.8 * steps  # none in the last fifth of the run


def test_the_preset_takes_another_paper_length_and_refuses_what_it_cannot_place():
    assert DeadLatentConfig.preset("anthropic", steps=10_000, batch_size=1, paper_steps=1_000_000).resample_at == (
        250, 500, 750, 1000)
    with pytest.raises(ValueError, match="too short"):
        DeadLatentConfig.preset("anthropic", steps=3, batch_size=64)
    with pytest.raises(ValueError, match="'anthropic'"):
        DeadLatentConfig.preset("openai", steps=100, batch_size=64)
    with pytest.raises(ValueError, match="not both"):
        DeadLatentConfig(resample_every=5, resample_at=(3,))
    with pytest.raises(ValueError, match="ascending"):
        DeadLatentConfig(resample_at=(5, 3))


def test_a_run_with_the_preset_resamples_at_the_scaled_steps():
    torch.manual_seed(0)
    toy = ToyDictionary.random(d_in=16, n_features=32, active_per_sample=3.0, seed=0)
    sae = SAE(SAEConfig(16, 48, activation="relu", l1_coefficient=0.3), seed=0)
    with torch.no_grad():
        sae.b_enc[::3] = -50.0  # a third of the latents never fire
    dead = DeadLatentConfig.preset("anthropic", steps=20, batch_size=64, resample_pool=256)
    cfg = TrainConfig(dead_latents=dead)
    cfg = cfg.replace(lr=3e-3, total_steps=20, progress=False, log_every=100)
    history = Trainer(sae, cfg).fit(toy.batches(64, 20, seed=1)).history
    resampled = {h["step"]: h["resampled"] for h in history if "resampled" in h}
    assert list(resampled) == [4, 8, 12, 16]  # 20 % ... 80 % of 20 steps
    assert resampled[4] >= 16  # the crippled third (and maybe more), dead for the 2-step (128-row) window
    assert (sae.b_enc[::3] > -50).all()  # every crippled latent was given a fresh start


def _offset_toy_batches(steps):
    toy = ToyDictionary.random(d_in=16, n_features=32, active_per_sample=3.0, seed=0)
    return [b + 3.0 for b in toy.batches(32, steps, seed=1)]  # a common offset a decoder bias would learn


@pytest.mark.parametrize("optimizer", ["torch", "fused"])
def test_without_b_dec_it_stays_exactly_zero_and_the_encoder_stays_tied(optimizer):
    cfg = SAEConfig(16, 40, activation="relu", l1_coefficient=0.05, tied=True, apply_b_dec_to_input=False)
    sae = SAE(cfg, seed=0)
    Trainer(sae, TrainConfig.flat(lr=1e-2, progress=False, b_dec_init="none", optimizer=optimizer,
                                  total_steps=15)).fit(_offset_toy_batches(15))
    assert torch.equal(sae.b_dec, torch.zeros(16)) and not sae.b_dec.requires_grad
    assert sae.W_enc is sae.W_dec and "W_enc" not in dict(sae.named_parameters())
    x = torch.randn(5, 16)
    expected = torch.relu(x @ sae.W_dec.detach().T + sae.b_enc.detach())  # W_enc = W_dec^T, x not centred
    torch.testing.assert_close(sae.encode(x).to_dense(), expected)
    trained = SAE(cfg, seed=0)  # the control: the same run with a decoder bias moves it
    Trainer(trained, TrainConfig.flat(lr=1e-2, progress=False, optimizer=optimizer,
                                      total_steps=15)).fit(_offset_toy_batches(15))
    assert trained.b_dec.abs().max() > 1e-3


def test_without_b_dec_a_non_zero_b_dec_is_refused():
    sae = SAE(SAEConfig(16, 40, activation="relu", tied=True, apply_b_dec_to_input=False), seed=0)
    with torch.no_grad():
        sae.b_dec[0] = 1.0
    with pytest.raises(ValueError, match="b_dec_init='none'"):
        Trainer(sae, TrainConfig.flat(progress=False, b_dec_init="none"))
    with pytest.raises(ValueError, match="'zeros', 'mean' or 'none'"):
        TrainConfig.flat(b_dec_init="frozen")
