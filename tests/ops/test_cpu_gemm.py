"""ops/cpu_gemm.py: fp32 linears on CPU by oneDNN, the same function as F.linear (checked against the float64
reference.linear); the choice between it and MKL, measured once per key and cached in memory and on disk, and
its overrides; and the models fastsae.model loads, whose nn.Linear layers use it."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastsae.model import random_causal_lm, with_cpu_gemm
from fastsae.model.loading import CPUGemmLinear
from fastsae.ops import cpu_gemm, reference

pytestmark = pytest.mark.skipif(cpu_gemm._op() is None, reason="this PyTorch build has no oneDNN")


@pytest.fixture(autouse=True)
def fresh_verdicts(tmp_path, monkeypatch):
    """Each test measures into its own cache directory, with no verdict in memory; oneDNN forced unless a test
    says otherwise (the tests of the function itself must take the oneDNN path)."""
    monkeypatch.setenv("FASTSAE_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu_gemm.ENV, "onednn")
    monkeypatch.setattr(cpu_gemm, "_verdicts", {})


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


def _fake_timer(monkeypatch, faster: str) -> list[str]:
    """Make path `faster` time 1 s and the other 2 s; the list records every path timed."""
    timed = []

    def seconds(path, run):
        run()  # the real GEMM still runs: the measurement must be able to call it
        timed.append(path)
        return 1.0 if path == faster else 2.0

    monkeypatch.setattr(cpu_gemm, "_seconds", seconds)
    return timed


@pytest.mark.parametrize("faster", ["mkl", "onednn"])
def test_the_faster_path_is_chosen_once_per_key_then_read_from_memory_and_disk(monkeypatch, faster):
    monkeypatch.setenv(cpu_gemm.ENV, "auto")
    timed = _fake_timer(monkeypatch, faster)
    gen = torch.Generator().manual_seed(3)
    x, W, b = torch.randn(37, 19, generator=gen), torch.randn(53, 19, generator=gen), torch.randn(53, generator=gen)
    assert cpu_gemm.applies(x, W, b) == (faster == "onednn")
    assert sorted(timed) == ["mkl", "onednn"]
    for _ in range(3):  # the same key (37 and 33 rows share a bucket): no new measurement
        torch.testing.assert_close(cpu_gemm.linear(x[:33], W, b), F.linear(x[:33], W, b))
    assert len(timed) == 2
    entry = json.loads(cpu_gemm.cache_file().read_text())["verdicts"][cpu_gemm.key(x, W)]
    assert entry == {"path": faster, "onednn_s": 1.0 if faster == "onednn" else 2.0,
                     "mkl_s": 1.0 if faster == "mkl" else 2.0}
    monkeypatch.setattr(cpu_gemm, "_verdicts", {})  # a new process: the verdict comes from disk
    assert cpu_gemm.applies(x, W, b) == (faster == "onednn") and len(timed) == 2
    cpu_gemm.linear(torch.randn(70, 19), W, b)  # another row bucket: measured, and added beside the first
    assert len(timed) == 4 and len(json.loads(cpu_gemm.cache_file().read_text())["verdicts"]) == 2
    threads = torch.get_num_threads()
    try:  # the thread count is part of the key
        torch.set_num_threads(1 if threads > 1 else 2)
        cpu_gemm.linear(x, W, b)
    finally:
        torch.set_num_threads(threads)
    assert len(timed) == 6


@pytest.mark.parametrize("damage", ["{not json", '{"verdicts": [1, 2]}', '["a list"]', "\x00\x01binary"])
def test_a_damaged_cache_file_is_measured_again_and_rewritten(monkeypatch, damage):
    monkeypatch.setenv(cpu_gemm.ENV, "auto")
    timed = _fake_timer(monkeypatch, "mkl")
    cpu_gemm.cache_file().write_text(damage)
    x, W = torch.randn(5, 7), torch.randn(9, 7)
    assert not cpu_gemm.applies(x, W) and len(timed) == 2
    assert json.loads(cpu_gemm.cache_file().read_text())["verdicts"][cpu_gemm.key(x, W)]["path"] == "mkl"
    # an entry that is not a verdict is ignored too
    cpu_gemm.cache_file().write_text(json.dumps({"version": 1, "verdicts": {cpu_gemm.key(x, W): {"path": "x"}}}))
    monkeypatch.setattr(cpu_gemm, "_verdicts", {})
    assert not cpu_gemm.applies(x, W) and len(timed) == 4


def test_an_unwritable_cache_keeps_the_verdict_in_memory(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_gemm.ENV, "auto")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FASTSAE_CACHE", str(tmp_path / "file"))  # a file where the directory should be
    timed = _fake_timer(monkeypatch, "onednn")
    x, W = torch.randn(5, 7), torch.randn(9, 7)
    assert cpu_gemm.applies(x, W) and cpu_gemm.applies(x, W) and len(timed) == 2


def test_overrides_force_either_path_without_measuring(monkeypatch):
    timed = _fake_timer(monkeypatch, "onednn")
    x, W, b = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4)
    monkeypatch.setenv(cpu_gemm.ENV, "mkl")
    assert not cpu_gemm.applies(x, W, b)
    assert torch.equal(cpu_gemm.linear(x, W, b), F.linear(x, W, b))
    monkeypatch.setenv(cpu_gemm.ENV, " OneDNN ")
    assert cpu_gemm.applies(x, W, b)
    monkeypatch.setenv(cpu_gemm.ENV, "auto")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # PyTorch's switch: MKL, nothing measured
    assert not cpu_gemm.applies(x, W, b)
    assert timed == []
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    monkeypatch.setenv(cpu_gemm.ENV, "blas")
    with pytest.raises(ValueError, match=r"FASTSAE_CPU_GEMM must be one of auto, mkl, onednn, got 'blas'"):
        cpu_gemm.linear(torch.randn(6, 5), W, b)


def test_nothing_is_measured_while_torch_compile_traces(monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV, "auto")
    timed = _fake_timer(monkeypatch, "onednn")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, W = torch.randn(6, 5), torch.randn(4, 5)
    assert not cpu_gemm.applies(x, W) and timed == []
    assert torch.equal(cpu_gemm.linear(x, W), F.linear(x, W))


def test_the_real_timer_measures_and_either_verdict_gives_f_linear(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    x, W, b = torch.randn(37, 19, generator=gen), torch.randn(53, 19, generator=gen), torch.randn(53, generator=gen)
    calls = []
    assert 0 < cpu_gemm._seconds("mkl", lambda: calls.append(F.linear(x, W, b))) < 1
    assert len(calls) == 1 + cpu_gemm.REPEATS
    monkeypatch.setenv(cpu_gemm.ENV, "auto")
    got = cpu_gemm.linear(x, W, b)
    assert cpu_gemm._verdicts[cpu_gemm.key(x, W)] in ("mkl", "onednn")
    torch.testing.assert_close(got, F.linear(x, W, b), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(cpu_gemm._op() is None, reason="this torch has no oneDNN")
def test_autocast_gets_the_same_encoder_whichever_gemm_was_picked(monkeypatch):
    """The encoder's GEMM runs in its inputs' dtype under autocast, as its compiled form does: otherwise F.linear
    (MKL, which autocast casts to bf16) and oneDNN's op (which it does not) would give different latents."""
    from fastsae import SAE, SAEConfig, set_backend

    sae = SAE(SAEConfig(d_in=24, d_sae=96, activation="topk", k=6), seed=0)
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(1))
    outs = []
    set_backend("torch")
    try:
        for choice in ("mkl", "onednn"):
            monkeypatch.setenv(cpu_gemm.ENV, choice)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(sae.encode(x))
    finally:
        set_backend(None)
    assert outs[0].values.dtype == torch.float32
    assert torch.equal(outs[0].indices, outs[1].indices)
    torch.testing.assert_close(outs[0].values, outs[1].values, atol=1e-5, rtol=1e-5)
