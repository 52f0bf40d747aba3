"""The fused optimizer step against torch.optim.Adam plus the same constraint steps in PyTorch."""

import copy

import pytest
import torch

from fastsae import use_backend
from fastsae.kernels.adam import adam_step
from fastsae.ops import reference, torch_backend, triton_backend
from fastsae.train import SAEAdam, TrainConfig, Trainer, optim

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


def _per_parameter_path(monkeypatch):
    """SAEAdam as it was before the fused CPU step: the torch backend's adam_step for every parameter."""
    monkeypatch.setattr(optim, "_fused_cpu", lambda p, state: False)


@pytest.mark.parametrize("activation,k,kw", [("topk", 4, {}), ("topk", 3, {"normalize_decoder": False}),
                                             ("relu", None, {"tied": True})])
def test_the_fused_cpu_step_matches_the_per_parameter_step(monkeypatch, activation, k, kw):
    monkeypatch.setattr(optim, "ROW_CHUNK", 16)  # 37 rows: blocks of 16, 16 and 5
    calls = []
    fused_adam = torch._fused_adam_
    monkeypatch.setattr(torch, "_fused_adam_", lambda *a, **kw: calls.append(1) or fused_adam(*a, **kw))
    a = make_sae(13, 37, activation, k, **kw)
    b = copy.deepcopy(a)
    xs = [torch.randn(20, 13) for _ in range(6)]
    opt_a = SAEAdam(a, lr=1e-2, betas=(0.9, 0.99))
    _steps(a, opt_a, xs, False)
    assert calls, "the fused CPU step was not taken"
    grads = [p.grad.clone() for p in a.parameters()]
    with monkeypatch.context() as m:
        _per_parameter_path(m)
        opt_b = SAEAdam(b, lr=1e-2, betas=(0.9, 0.99))
        _steps(b, opt_b, xs, False)
    for (name, pa), pb, g in zip(a.named_parameters(), b.parameters(), grads, strict=True):
        torch.testing.assert_close(pa, pb, atol=2e-6, rtol=2e-5, msg=name)
        torch.testing.assert_close(g, pb.grad, msg=name)  # the projection did not touch p.grad
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_a.state[pa][key], opt_b.state[pb][key], atol=1e-7, rtol=2e-5)
    if a.cfg.normalize_decoder:
        torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(37))


def test_the_fused_cpu_step_resumes_from_a_state_dict_like_the_per_parameter_step(monkeypatch):
    a = make_sae(13, 37, "topk", 4)
    xs = [torch.randn(20, 13) for _ in range(6)]
    opt = SAEAdam(a, lr=1e-2)
    _steps(a, opt, xs[:3], False)
    saved_sae, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt.state_dict())
    _steps(a, opt, xs[3:], False)  # uninterrupted
    resumed = {}
    for fused in (True, False):
        b = make_sae(13, 37, "topk", 4)
        b.load_state_dict(saved_sae)
        opt_b = SAEAdam(b, lr=1e-2)
        opt_b.load_state_dict(copy.deepcopy(saved_opt))
        assert opt_b.state[b.W_dec]["step"].dtype == torch.float32 and opt_b.state[b.W_dec]["step"].dim() == 0
        with monkeypatch.context() as m:
            if not fused:
                _per_parameter_path(m)
            _steps(b, opt_b, xs[3:], False)
        resumed[fused] = b
    for (name, pa), pf, pp in zip(a.named_parameters(), resumed[True].parameters(), resumed[False].parameters(),
                                  strict=True):
        torch.testing.assert_close(pf, pa, atol=0, rtol=0, msg=name)  # resuming is exact
        torch.testing.assert_close(pp, pa, atol=2e-6, rtol=2e-5, msg=name)


def test_bf16_state_keeps_the_per_parameter_step(monkeypatch):
    monkeypatch.setattr(torch, "_fused_adam_", lambda *a, **kw: pytest.fail("bf16 state took the fused step"))
    sae = make_sae(13, 37, "topk", 4)
    opt = SAEAdam(sae, lr=1e-2, state_dtype=torch.bfloat16)
    _steps(sae, opt, [torch.randn(20, 13) for _ in range(2)], False)
    assert opt.state[sae.W_dec]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(37))


@pytest.mark.parametrize("n", [1, 12, 16, 37])
def test_the_fused_cpu_step_gives_an_element_the_same_bits_wherever_it_sits(n):
    """The scalar tail of torch's fused CPU Adam rounds differently from its vector body; SAEAdam pads the tail
    into the vector path, so n elements alone equal the same n inside a longer tensor (an ensemble's stack)."""
    gen = torch.Generator().manual_seed(n)
    p, g, m = (torch.randn(3 * n + 5, generator=gen) for _ in range(3))
    v = torch.rand(3 * n + 5, generator=gen)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    alone = [t[:n].clone() for t in (p, g, m, v)]
    want = [t.clone() for t in alone]
    optim._fused_adam(p, g, m, v, torch.tensor(3.0), kw)
    optim._fused_adam(*alone, torch.tensor(3.0), kw)
    for a, b in zip(alone, (p, g, m, v), strict=True):
        assert torch.equal(a, b[:n])
    torch_backend.adam_step(want[0], want[1], want[2], want[3], step=3, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8)
    for a, b in zip(alone, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
