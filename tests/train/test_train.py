"""The first trainer: decoder constraint, schedules, determinism, ground-truth recovery."""

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.toy import ToyDictionary, mmcs
from fastsae.train import TrainConfig, Trainer, fvu, train


def test_decoder_constraint_holds_after_steps():
    sae = SAE(SAEConfig(8, 32, activation="relu", l1_coefficient=0.1), seed=0)
    trainer = Trainer(sae, TrainConfig.flat(lr=1e-2, progress=False))
    for _ in range(5):
        trainer.step(torch.randn(64, 8) * 3)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_parallel_gradient_is_removed():
    sae = SAE(SAEConfig(8, 32, activation="topk", k=4), seed=0)
    sae(torch.randn(16, 8)).loss.backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() > 1e-4  # there was something to remove
    sae.remove_parallel_decoder_grad_()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(32), atol=1e-6, rtol=0)


def test_schedules():
    sae = SAE(SAEConfig(4, 8, l1_coefficient=2.0))
    t = Trainer(sae, TrainConfig.flat(total_steps=100, lr_warmup_fraction=0.1, lr_decay_fraction=0.2,
                                 l1_warmup_fraction=0.5, progress=False))
    assert t.lr_scale(0) == pytest.approx(0.1) and t.lr_scale(9) == 1.0 and t.lr_scale(50) == 1.0
    assert t.lr_scale(90) == pytest.approx(0.5) and t.lr_scale(99) == pytest.approx(0.05)
    assert t.l1_coefficient(0) == pytest.approx(2.0 / 50) and t.l1_coefficient(60) == 2.0
    with pytest.raises(ValueError, match="lr"):
        TrainConfig.flat(lr=0)
    with pytest.raises(ValueError, match="lr_decay_fraction"):
        TrainConfig.flat(lr_decay_fraction=1.5)


def test_training_is_deterministic_on_cpu():
    def once():
        torch.manual_seed(0)
        sae = SAE(SAEConfig(8, 24, activation="topk", k=3), seed=1)
        toy = ToyDictionary.random(8, 16, 2.0, seed=2)
        train(sae, toy.batches(32, 20), TrainConfig.flat(progress=False))
        return sae.state_dict()

    a, b = once(), once()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_history_and_dead_fraction():
    sae = SAE(SAEConfig(8, 64, activation="topk", k=1), seed=0)
    toy = ToyDictionary.random(8, 4, 1.0, seed=0)  # 4 true features: most of 64 latents never fire
    result = train(sae, toy.batches(64, 30), TrainConfig.flat(progress=False, log_every=10, dead_window_tokens=640))
    assert [h["step"] for h in result.history] == [10, 20, 30]
    last = result.history[-1]
    assert set(last) >= {"loss", "mse", "l0", "fvu", "dead_fraction", "lr", "tokens_per_s"}
    assert last["l0"] <= 1 and last["dead_fraction"] > 0.5


def test_fvu():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)


@pytest.mark.parametrize("activation,k,l1", [("topk", 4, None), ("relu", None, 0.2)])
def test_recovers_ground_truth_features(activation, k, l1):
    torch.manual_seed(0)
    toy = ToyDictionary.random(d_in=16, n_features=48, active_per_sample=3.0, seed=0)
    sae = SAE(SAEConfig(16, 96, activation=activation, k=k, l1_coefficient=l1), seed=0)
    train(sae, toy.batches(256, 600), TrainConfig.flat(lr=3e-3, progress=False))
    assert mmcs(toy.features, sae.W_dec.detach()) >= 0.9
    # and a random dictionary does not: the test can fail
    assert mmcs(toy.features, torch.randn(96, 16, generator=torch.Generator().manual_seed(123))) < 0.8


@pytest.mark.parametrize("activation,k", [("topk", 4), ("relu", None)])
def test_bf16_mixed_precision_keeps_fp32_masters(activation, k):
    toy = ToyDictionary.random(d_in=16, n_features=48, active_per_sample=3.0, seed=0)
    runs = {}
    for mp in (None, "bfloat16"):
        torch.manual_seed(0)
        sae = SAE(SAEConfig(16, 64, activation=activation, k=k, l1_coefficient=None if k else 0.2), seed=0)
        result = train(sae, toy.batches(128, 60), TrainConfig.flat(lr=3e-3, progress=False, log_every=20,
                                                               mixed_precision=mp, resample_every=30))
        runs[mp] = (sae, result.history)
    sae, history = runs["bfloat16"]
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    # it computed in bf16 while training; the caller's SAE is given back as it came, taking fp32 (issue #12)
    assert sae.dtype == torch.float32 and sae(torch.randn(3, 16)).x_hat.dtype == torch.float32
    sae.compute_dtype = torch.bfloat16  # mixed precision at inference is the caller's choice
    assert sae(torch.randn(3, 16, dtype=torch.bfloat16)).x_hat.dtype == torch.bfloat16
    # same trajectory as fp32 up to bf16 rounding
    fp32_loss, bf16_loss = runs[None][1][-1]["loss"], history[-1]["loss"]
    assert abs(bf16_loss - fp32_loss) < 0.1 * fp32_loss
    assert history[-1]["loss"] < history[0]["loss"]
    with pytest.raises(ValueError, match="master"):
        Trainer(SAE(SAEConfig(4, 8, dtype="bfloat16")), TrainConfig.flat(mixed_precision="bfloat16"))


def test_b_dec_init_mean_starts_at_the_first_batch_mean():
    from fastsae import SAE, SAEConfig
    from fastsae.train import TrainConfig, Trainer

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) + 5.0
    sae = SAE(SAEConfig(8, 16, activation="topk", k=2), seed=0)
    trainer = Trainer(sae, TrainConfig.flat(b_dec_init="mean", lr=1e-12, progress=False))
    trainer.step(x)
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0), rtol=1e-5, atol=1e-5)
    before = sae.b_dec.detach().clone()
    trainer.step(x + 100.0)  # only the first batch sets it
    torch.testing.assert_close(sae.b_dec.detach(), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="b_dec_init"):
        TrainConfig.flat(b_dec_init="median")


def test_the_reported_loss_is_the_trained_loss():
    """SAEOutput.loss, given the trainer's coefficients, is what the trainer steps on (L1 warm-up included)."""
    import copy

    sae = SAE(SAEConfig(8, 32, activation="relu", l1_coefficient=0.5), seed=0)
    probe = copy.deepcopy(sae)
    trainer = Trainer(sae, TrainConfig.flat(lr=1e-2, total_steps=10, l1_warmup_fraction=0.5, progress=False))
    x = torch.randn(64, 8)
    logged = trainer.step(x)
    coefficients = Trainer(probe, trainer.cfg).coefficients(0)
    assert coefficients.l1 == pytest.approx(0.5 / 5)  # warmed up over 5 steps
    probe.train()
    assert logged["loss"] == probe(x, coefficients=coefficients).loss.item()
    assert logged["loss"] != probe(x).loss.item()  # the default weights the full L1 coefficient


def test_the_trainer_records_the_batchtopk_threshold():
    sae = SAE(SAEConfig(8, 32, activation="batchtopk", k=2), seed=0)
    trainer = Trainer(sae, TrainConfig.flat(lr=1e-12, progress=False))
    x1, x2 = torch.randn(16, 8), torch.randn(16, 8)
    tau1 = sae(x1).threshold
    assert float(sae.threshold) == 0  # a forward alone changes nothing
    trainer.step(x1)
    assert float(sae.threshold) == float(tau1)
    tau2 = sae(x2).threshold
    trainer.step(x2)
    assert float(sae.threshold) == pytest.approx(0.99 * float(tau1) + 0.01 * float(tau2))
