"""ops/cpu_gemm.py: fp32 linears on CPU by oneDNN, the same function as F.linear (checked against the float64
reference.linear); and the models fastsae.model loads, whose nn.Linear layers use it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastsae.model import random_causal_lm, with_cpu_gemm
from fastsae.model.loading import CPUGemmLinear
from fastsae.ops import cpu_gemm, reference

pytestmark = pytest.mark.skipif(cpu_gemm._op() is None, reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("lead,d_in,d_out", [((1,), 1, 1), ((37,), 19, 53), ((3, 5), 64, 129), ((2, 0), 7, 9),
                                            ((300,), 768, 1000)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_is_f_linear_to_fp32_rounding(lead, d_in, d_out, bias):
    gen = torch.Generator().manual_seed(d_in * d_out)
    x, W = torch.randn(*lead, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen)
    b = torch.randn(d_out, generator=gen) if bias else None
    assert cpu_gemm.applies(x, W, b)
    got = cpu_gemm.linear(x, W, b)
    want = reference.linear(x.reshape(-1, d_in), W, b).reshape(*lead, d_out)
    assert got.dtype == torch.float32 and got.shape == (*lead, d_out)
    scale = x.abs().sum(-1, keepdim=True).double() * W.abs().max().double() + 1  # |Σ x W| bound, per row
    assert (got.double() - want).abs().le(1e-6 * scale).all()


def test_linear_takes_strided_views_and_gives_the_same_bits_for_any_thread_count():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(65, 40, generator=gen).t()  # (40, 65) non-contiguous
    W = torch.randn(65, 33, generator=gen).t()  # (33, 65) non-contiguous
    assert torch.allclose(cpu_gemm.linear(x, W), F.linear(x, W), atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemm.linear(x.contiguous(), W.contiguous())
        torch.set_num_threads(2)
        two = cpu_gemm.linear(x.contiguous(), W.contiguous())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_linear_keeps_f_linear_where_onednn_does_not_apply(monkeypatch):
    x, W, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5)
    for args in [(x.double(), W.double(), b.double()), (x.bfloat16(), W.bfloat16(), None), (x[0], W, b)]:
        assert not cpu_gemm.applies(*args)
        assert torch.equal(cpu_gemm.linear(*args), F.linear(*args))
    with monkeypatch.context() as m:  # PyTorch's own switch turns it off
        m.setattr(torch.backends.mkldnn, "enabled", False)
        assert not cpu_gemm.applies(x, W, b)
    assert cpu_gemm.applies(x, W, b)
    # a gradient asked for: F.linear (the oneDNN op has no backward), and the gradient is right
    Wg = W.clone().requires_grad_()
    assert not cpu_gemm.applies(x, Wg, b)
    cpu_gemm.linear(x, Wg, b).sum().backward()
    assert torch.allclose(Wg.grad, x.sum(0).expand(5, 6))
    with torch.no_grad():
        assert cpu_gemm.applies(x, Wg, b)


def test_loaded_models_use_it_and_compute_the_same_function():
    model, _ = random_causal_lm(hidden_size=48, num_layers=2, intermediate_size=80, num_heads=4)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is CPUGemmLinear for m in linears)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if type(m) is CPUGemmLinear:
            m.__class__ = nn.Linear
    ids = torch.randint(4, 40, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert model.state_dict().keys() == plain.state_dict().keys()
    # gradients still flow through it (SpliceKL trains through the model's upper layers)
    x = model.gpt_neox.embed_in(ids).detach().requires_grad_()
    model(inputs_embeds=x).logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert with_cpu_gemm(plain) is plain and all(type(m) is CPUGemmLinear for m in plain.modules()
                                                 if isinstance(m, nn.Linear))
