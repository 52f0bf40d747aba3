"""JumpReLU trained through θ (ops/jumprelu.py): the whole loss's gradients — θ's by both straight-through
estimators, and x's, W_enc's, b_enc's, W_dec's, b_dec's — against `reference.jumprelu_loss`, a float64 dense
copy of SAELens's JumpReLUTrainingSAE, in every sparsity mode, on every backend, fp32 and bf16; a short
training run; bad settings refused. Shapes are odd (N 19, d_in 13, d_sae 37); the bandwidth is wide enough
that every run has active and halo (below θ) entries in the window, which the tests check, so θ's gradient
is not trivially 0 and would fail if the halo were dropped."""

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.ops import reference, use_backend
from fastsae.train import train
from fastsae.train.optim import SAEAdam, build_optimizer
from fastsae.train.train_config import OptimizerConfig, TrainConfig
from tests.helpers import TOL

N, D_IN, D_SAE = 19, 13, 37
MODES = ["step", "tanh", "quadratic"]
PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def _sae(mode: str, dtype: str = "float32", bandwidth: float = 0.4, seed: int = 0, coefficient: float = 0.7) -> SAE:
    cfg = SAEConfig(D_IN, D_SAE, activation="jumprelu", jumprelu_threshold=0.3, jumprelu_bandwidth=bandwidth,
                    jumprelu_sparsity=mode, l1_coefficient=coefficient, k=5 if mode == "quadratic" else None,
                    dtype=dtype)
    sae = SAE(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=gen))
        sae.threshold.copy_(0.25 + 0.25 * torch.rand(D_SAE, generator=gen))  # θ − ε/2 > 0: Triton's fused path
    return sae


def _reference(sae: SAE, x: torch.Tensor):
    """The float64 dense loss and its gradients (x's too), on float64 copies of sae's weights and x."""
    p = {name: getattr(sae, name).detach().double().requires_grad_(True) for name in PARAMS}
    x = x.detach().double().requires_grad_(True)
    cfg = sae.cfg
    loss = reference.jumprelu_loss(x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], p["threshold"],
                                   bandwidth=cfg.jumprelu_bandwidth, mode=cfg.jumprelu_sparsity,
                                   coefficient=cfg.l1_coefficient, target_l0=cfg.k)
    grads = torch.autograd.grad(loss, [*p.values(), x])
    return loss, dict(zip([*PARAMS, "x"], grads, strict=True))


def _ours(sae: SAE, x: torch.Tensor, backend: str):
    x = x.detach().clone().requires_grad_(True)
    with use_backend(backend):
        out = sae(x)
    grads = torch.autograd.grad(out.loss, [getattr(sae, name) for name in PARAMS] + [x])
    return out, dict(zip([*PARAMS, "x"], grads, strict=True))


def _window_counts(sae: SAE, x: torch.Tensor) -> tuple[int, int]:
    """(entries within ε/2 above θ, within ε/2 below it) of the float64 pre-activations."""
    pre = (x.double() - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc.double()
    d = pre - sae.threshold.double()
    half = sae.cfg.jumprelu_bandwidth / 2
    return int(((d > 0) & (d < half)).sum()), int(((d <= 0) & (d > -half)).sum())


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("mode", MODES)
def test_every_gradient_matches_the_dense_estimator_fp32(mode, backend):
    sae, x = _sae(mode), torch.randn(N, D_IN, generator=torch.Generator().manual_seed(3))
    above, below = _window_counts(sae, x)
    assert above > 0 and below > 0, "the window must hold active and halo entries, or θ's test could not fail"
    ref_loss, ref = _reference(sae, x)
    out, got = _ours(sae, x, backend)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out.loss.double(), ref_loss, atol=20 * atol, rtol=rtol)
    for name, want in ref.items():
        assert want.abs().max() > 0, f"{name}'s gradient is zero: the test could not fail"
        torch.testing.assert_close(got[name].double(), want, atol=20 * atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _dyadic(shape, gen, scale=4) -> torch.Tensor:
    """Multiples of 1/scale in [-2/scale, 2/scale]: every pre-activation below is a multiple of 1/16 under 4 in size,
    exact in bf16, so that bf16 and float64 put the same entries in the same windows."""
    return torch.randint(-2, 3, shape, generator=gen).double() / scale


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_every_gradient_matches_the_dense_estimator_bf16(mode, backend):
    gen = torch.Generator().manual_seed(5)
    sae = _sae(mode, dtype="bfloat16", bandwidth=0.25)
    with torch.no_grad():
        sae.W_enc.copy_(_dyadic((D_SAE, D_IN), gen))
        sae.b_enc.copy_(_dyadic((D_SAE,), gen, scale=16))
        sae.b_dec.zero_()
        # θ = m/16 + 1/32: the window's edges θ ± 1/8 are never a multiple of 1/16, so never a pre-activation
        sae.threshold.copy_((torch.randint(2, 9, (D_SAE,), generator=gen) / 16 + 1 / 32).to(sae.threshold))
    x = _dyadic((N, D_IN), gen).to(torch.bfloat16)
    above, below = _window_counts(sae, x)
    assert above > 0 and below > 0
    _, ref = _reference(sae, x)
    _, got = _ours(sae, x, backend)
    atol, rtol = TOL[torch.bfloat16]
    for name, want in ref.items():
        assert want.abs().max() > 0, f"{name}'s gradient is zero: the test could not fail"
        scale = float(want.abs().max())  # bf16's relative error, of the gradient's size
        torch.testing.assert_close(got[name].double(), want, atol=atol * max(scale, 1.0), rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_theta_gradient_needs_the_halo():
    """A check that the test above can fail: dropping the below-θ entries changes θ's gradient."""
    sae, x = _sae("step"), torch.randn(N, D_IN, generator=torch.Generator().manual_seed(3))
    _, ref = _reference(sae, x)
    _, got = _ours(sae, x, "torch")
    pre = (x.double() - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc.double()
    d = pre - sae.threshold.double()
    below = ((d <= 0) & (d > -sae.cfg.jumprelu_bandwidth / 2)).sum(0).double()  # (d_sae,)
    # the step term's halo part alone: −coefficient/(N·ε) per entry
    halo_part = -sae.cfg.l1_coefficient / (N * sae.cfg.jumprelu_bandwidth) * below
    assert halo_part.abs().max() > 0.1
    torch.testing.assert_close(got["threshold"].double(), ref["threshold"], atol=1e-4, rtol=1e-4)
    assert (got["threshold"].double() - halo_part - ref["threshold"]).abs().max() > 0.1


def test_inference_keeps_the_plain_encoder():
    """Without grad (or θ frozen) encode gives the active latents only, no halo; the loss is the same value."""
    sae, x = _sae("step"), torch.randn(N, D_IN, generator=torch.Generator().manual_seed(3))
    trained = sae(x)
    with torch.no_grad():
        plain = sae(x)
    torch.testing.assert_close(plain.loss, trained.loss.detach())
    torch.testing.assert_close(plain.latents.to_dense(), trained.latents.to_dense().detach())
    assert (plain.latents.values > 0).sum() == (plain.latents.values != 0).sum()
    assert trained.latents.width >= plain.latents.width


def test_optimizers_train_theta():
    sae = _sae("step")
    assert sae.threshold.requires_grad
    fused = SAEAdam(sae)
    assert any(p is sae.threshold for g in fused.param_groups for p in g["params"])
    plain = build_optimizer(sae, OptimizerConfig(kind="torch"))
    assert any(p is sae.threshold for g in plain.param_groups for p in g["params"])


def _toy(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(24, D_IN, generator=gen), dim=1)
    codes = torch.rand(n, 24, generator=gen) * (torch.rand(n, 24, generator=gen) < 0.15)
    return codes @ dirs * 3 + 0.05 * torch.randn(n, D_IN, generator=gen)


@pytest.mark.parametrize("mode", ["step", "tanh"])
def test_training_moves_theta_and_a_larger_coefficient_lowers_l0(mode):
    batches = [_toy(64, seed) for seed in range(40)]
    held = _toy(512, 99)
    l0 = {}
    for coefficient in (0.01, 1.0):
        sae = _sae(mode, bandwidth=0.1, coefficient=coefficient)
        with torch.no_grad():
            sae.threshold.fill_(0.1)
        cfg = TrainConfig.flat(lr=1e-2, optimizer="torch", l1_warmup_fraction=0.0)
        train(sae, batches, cfg)
        assert (sae.threshold - 0.1).abs().max() > 1e-3, "θ did not move"
        assert (sae.threshold >= 0).all()
        with torch.no_grad():
            l0[coefficient] = float(sae.encode(held).l0.float().mean())
    assert l0[1.0] < 0.8 * l0[0.01], l0


@pytest.mark.parametrize("settings,field", [
    (dict(jumprelu_bandwidth=0.0), "jumprelu_bandwidth"),
    (dict(jumprelu_bandwidth=-1e-3), "jumprelu_bandwidth"),
    (dict(jumprelu_bandwidth=float("inf")), "jumprelu_bandwidth"),
    (dict(jumprelu_sparsity="L0"), "jumprelu_sparsity"),
    (dict(jumprelu_sparsity="quadratic"), "SAEConfig.k"),
])
def test_bad_settings_are_refused_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        SAEConfig(D_IN, D_SAE, activation="jumprelu", **settings)


def test_ops_refuse_a_bad_bandwidth():
    from fastsae.ops import torch_backend

    x, W, b, theta = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(5), torch.full((5,), 0.1)
    for backend in (torch_backend, reference):
        with pytest.raises(ValueError, match="bandwidth"):
            backend.encode_jumprelu(x, W, b, theta, 0.0)


def test_l1_mode_keeps_theta_frozen_with_the_l1_term():
    sae, x = _sae("l1"), torch.randn(N, D_IN, generator=torch.Generator().manual_seed(3))
    assert not sae.threshold.requires_grad
    assert not any(p is sae.threshold for g in SAEAdam(sae).param_groups for p in g["params"])
    out = sae(x)
    assert out.l0 is None and out.l1 is not None
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(out.l1, (out.latents.to_dense() * norms).sum(-1).mean())

