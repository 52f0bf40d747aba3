"""Compiled kernels at realistic sizes (bf16): skipped without CUDA.

Run on a GPU machine with `bash bench/gpu_check.sh`, which also runs
tests/test_kernels.py compiled and the quick benchmark.
"""

import pytest
import torch

from fastsae import SAE, SAEConfig, use_backend

from conftest import make_sae

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16 = torch.bfloat16


def _sae(d_in, d_sae, activation, k=None, seed=0):
    sae = SAE(SAEConfig(d_in, d_sae, activation=activation, k=k, dtype="bfloat16"), device="cuda", seed=seed)
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae


def _dense_pre_rows(sae, x, rows):
    """fp32 relu pre-activations of a few rows, from the same bf16 inputs."""
    xr = x[rows].float() - sae.b_dec.float()
    return torch.relu(xr @ sae.W_enc.float().T + sae.b_enc.float())


def _check_topk_rows(sae, x, lat, k, rows):
    pre = _dense_pre_rows(sae, x, rows)  # (r, d_sae)
    idx = lat.indices[rows]
    picked = pre.gather(1, idx)
    torch.testing.assert_close(lat.values[rows].float(), picked, atol=2e-2, rtol=2e-2)
    rest = pre.scatter(1, idx, -1.0)
    slack = 2e-2 * picked.abs().max(1).values + 2e-2
    assert (picked.min(1).values >= rest.max(1).values - slack).all()
    assert all(r.unique().numel() == k for r in idx)


@pytest.mark.parametrize("d_sae", [65_536, 2**20])
def test_topk_bf16_realistic_and_memory(d_sae):
    n, d_in, k = (8192, 2048, 64) if d_sae == 65_536 else (1024, 1024, 32)
    sae = _sae(d_in, d_sae, "topk", k)
    x = torch.randn(n, d_in, device="cuda", dtype=BF16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with use_backend("triton"), torch.no_grad():
        lat = sae.encode(x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    pre_bytes = n * d_sae * 2  # what the bf16 pre-activation matrix alone would take
    assert extra < pre_bytes / 8, f"encode used {extra / 2**20:.0f} MiB, pre-activations are {pre_bytes / 2**20:.0f}"
    _check_topk_rows(sae, x, lat, k, torch.arange(0, n, n // 16, device="cuda"))


@pytest.mark.parametrize("activation,k", [("topk", 64), ("relu", None), ("batchtopk", 32)])
def test_train_step_bf16_matches_torch_backend(activation, k):
    n, d_in, d_sae = 4096, 2048, 32_768
    sae = _sae(d_in, d_sae, activation, k)
    if activation == "relu":
        with torch.no_grad():
            sae.b_enc.fill_(-0.35)  # ~1% density on unit-variance inputs
    x = torch.randn(n, d_in, device="cuda", dtype=BF16)
    grads = {}
    for backend in ("torch", "triton"):
        sae.zero_grad(set_to_none=True)
        with use_backend(backend):
            out = sae(x)
            out.loss.backward()
        grads[backend] = (out.x_hat.float(), {n_: p.grad.float() for n_, p in sae.named_parameters()})
    (xh_t, g_t), (xh_k, g_k) = grads["torch"], grads["triton"]
    # Selections can differ where bf16 rounding reorders near-ties: compare in aggregate.
    rel = (xh_k - xh_t).norm() / xh_t.norm()
    assert rel < 2e-2, f"x_hat differs by {rel:.3g}"
    for name in g_t:
        rel = (g_k[name] - g_t[name]).norm() / g_t[name].norm().clamp_min(1e-12)
        assert rel < 5e-2, f"grad of {name} differs by {rel:.3g}"


def test_compiled_kernels_match_reference_fp32():
    """A small fp32 case through the whole SAE, compiled (ieee fp32 dots)."""
    from helpers import assert_close, float64_copy, run

    for activation, k in [("relu", None), ("topk", 8), ("jumprelu", None), ("batchtopk", 4)]:
        sae = make_sae(96, 1000, activation, k)
        ref = float64_copy(sae)
        x = torch.randn(300, 96)
        out_ref, g_ref = run(ref, x.double(), "reference")
        out, g = run(sae.cuda(), x.cuda(), "triton")
        assert_close(out.x_hat.cpu(), out_ref.x_hat, torch.float32, scale=10)
        for name in g_ref:
            assert_close(g[name].cpu(), g_ref[name], torch.float32, scale=50, msg=f"{activation}: grad of {name}")
