"""The fused optimizer step against torch.optim.Adam plus the same constraint steps in PyTorch."""

import copy

import pytest
import torch

from fastsae import use_backend
from fastsae.kernels.adam import adam_step
from fastsae.ops import reference, torch_backend, triton_backend
from fastsae.train import SAEAdam, TrainConfig, Trainer

from conftest import make_sae


def _steps(sae, opt, xs, constrain):
    for x in xs:
        opt.zero_grad(set_to_none=True)
        sae(x).loss.backward()
        if constrain:
            sae.remove_parallel_decoder_grad_()
        opt.step()
        if constrain:
            sae.normalize_decoder_()


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("activation,k,kw", [("topk", 4, {}), ("relu", None, {}), ("relu", None, {"tied": True}),
                                             ("topk", 3, {"normalize_decoder": False}), ("jumprelu", None, {})])
def test_matches_torch_adam_with_the_constraint(backend, activation, k, kw):
    ref = make_sae(13, 37, activation, k, **kw)
    fused = copy.deepcopy(ref)
    xs = [torch.randn(20, 13) for _ in range(6)]
    _steps(ref, torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.9, 0.99)), xs, ref.cfg.normalize_decoder)
    with use_backend(backend):  # the backend governs the optimizer step too
        _steps(fused, SAEAdam(fused, lr=1e-2, betas=(0.9, 0.99)), xs, False)
    for (name, a), b in zip(ref.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=2e-5, msg=name)
    if ref.cfg.normalize_decoder:
        torch.testing.assert_close(fused.W_dec.norm(dim=1), torch.ones(37))


def test_bf16_state_tracks_fp32_state():
    a = make_sae(13, 37, "topk", 4)
    b = copy.deepcopy(a)
    xs = [torch.randn(20, 13) for _ in range(6)]
    _steps(a, SAEAdam(a, lr=1e-2), xs, False)
    opt = SAEAdam(b, lr=1e-2, state_dtype=torch.bfloat16)
    _steps(b, opt, xs, False)
    assert opt.state[b.W_dec]["exp_avg"].dtype == torch.bfloat16
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, atol=2e-3, rtol=2e-2, msg=name)


@pytest.mark.parametrize("backend", [torch_backend, triton_backend])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,rows", [((1, 5), True), ((37, 13), True), ((5000,), False), ((3, 4097), False)])
def test_adam_step_matches_the_float64_reference_on_odd_shapes(backend, state_dtype, shape, rows):
    p = torch.randn(shape)
    if rows:
        p /= p.norm(dim=1, keepdim=True)
    g, m, v = torch.randn(shape), torch.randn(shape).to(state_dtype), torch.rand(shape).to(state_dtype)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    kw = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, rows=rows)
    backend.adam_step(p, g, m, v, **kw)
    reference.adam_step(p2, g, m2, v2, **kw)
    # bf16 moments: one bf16 rounding on store (2^-8 relative); fp32: fp32 arithmetic against float64
    atol, rtol = (1e-6, 1e-5) if state_dtype == torch.float32 else (1e-2, 1e-2)
    for a, b in ((p, p2), (m, m2), (v, v2)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_bad_arguments():
    with pytest.raises(ValueError, match="state_dtype"):
        SAEAdam(make_sae(), state_dtype=torch.float16)
    with pytest.raises(ValueError, match="grad"):
        adam_step(torch.zeros(3), torch.zeros(4), torch.zeros(3), torch.zeros(3), step=1, lr=1, beta1=0.9,
                  beta2=0.9, eps=1e-8)
    with pytest.raises(ValueError, match=r"OptimizerConfig\.kind must be .* got 'sgd'"):
        TrainConfig.flat(optimizer="sgd")
    with pytest.raises(ValueError, match="fused optimizer"):
        TrainConfig.flat(optimizer="torch", optimizer_state_dtype="bfloat16")


def test_trainer_picks_the_fused_step_on_cuda_and_when_asked():
    sae = make_sae(8, 24, "topk", 3)
    assert not isinstance(Trainer(sae, TrainConfig.flat(progress=False)).optimizer, SAEAdam)  # auto, on CPU
    assert isinstance(Trainer(sae, TrainConfig.flat(optimizer_state_dtype="bfloat16")).optimizer, SAEAdam)
    trainer = Trainer(sae, TrainConfig.flat(lr=1e-2, progress=False, optimizer="fused"))
    assert isinstance(trainer.optimizer, SAEAdam)
    for _ in range(3):
        trainer.step(torch.randn(16, 8))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(24))
