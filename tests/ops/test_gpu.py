"""Compiled kernels at realistic sizes (bf16): skipped without CUDA.

Run on a GPU machine with `python -m pytest tests/ops/test_gpu.py`; `bash bench/gpu_check.sh` is the prepared
timed run (bench/gpu_stages.py), which checks every kernel against its float64 reference itself.
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


@pytest.mark.parametrize("mode", ["ieee", "tf32"])
def test_compiled_kernels_match_reference_fp32(mode):
    """A small fp32 case through the whole SAE, compiled: exact fp32 dots (the opt-out) and TF32 (the default,
    compared with TF32's 10-bit mantissa tolerance)."""
    from fastsae.ops.triton_backend import set_fp32_matmul

    from helpers import assert_close, float64_copy, run

    set_fp32_matmul(mode)
    try:
        for activation, k in [("relu", None), ("topk", 8), ("jumprelu", None), ("batchtopk", 4)]:
            sae = make_sae(96, 1000, activation, k)
            ref = float64_copy(sae)
            x = torch.randn(300, 96)
            out_ref, g_ref = run(ref, x.double(), "reference")
            out, g = run(sae.cuda(), x.cuda(), "triton")
            scale = 1 if mode == "ieee" else 300  # tf32 rounds inputs to 2^-11 relative, fp32 is 2^-24
            assert_close(out.x_hat.cpu(), out_ref.x_hat, torch.float32, scale=10 * scale)
            for name in g_ref:
                assert_close(g[name].cpu(), g_ref[name], torch.float32, scale=50 * scale,
                             msg=f"{activation}: grad of {name}")
    finally:
        set_fp32_matmul(None)


@pytest.mark.parametrize("k", [1, 64, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_every_k_pad_and_dtype_compiled(k, dtype):
    """Every compiled K_PAD (64, 128, 256) and dtype against the dense fp32 answer of the same inputs."""
    from fastsae.kernels.encoder_topk import encoder_topk

    n, d_in, d_sae = 777, 320, 5000  # nothing a block multiple
    x = torch.randn(n, d_in, device="cuda").to(dtype)
    W = (torch.randn(d_sae, d_in, device="cuda") / d_in**0.5).to(dtype)
    b = (0.1 * torch.randn(d_sae, device="cuda")).to(dtype)
    values, indices = encoder_topk(x, W, b, k)
    pre = torch.relu(x.float() @ W.float().T + b.float())
    picked = pre.gather(1, indices)
    tol = 1e-2 if dtype == torch.float32 else 2e-2  # fp32 runs in TF32 by default
    torch.testing.assert_close(values.float(), picked, atol=tol, rtol=tol)
    kth = torch.topk(pre, k, dim=1).values[:, -1]
    assert (picked.min(1).values >= kth - tol * (1 + kth.abs())).all()
    assert all(r.unique().numel() == k for r in indices)


def test_ica_baseline_fits_on_the_gpu_as_on_the_cpu():
    """The ICA baseline (fastsae.evaluation.ica) runs on the activations' device: on CUDA it gives the CPU's
    result to float64 rounding, and the evaluation's baselines fit there (issue #18 part 5's GPU path)."""
    from fastsae.evaluation import baselines
    from fastsae.evaluation.ica import fast_ica

    gen = torch.Generator().manual_seed(0)
    sources = torch.cat([torch.rand(4000, 6, generator=gen) - 0.5,
                         torch.distributions.Laplace(0.0, 1.0).sample((4000, 6))], 1).double()
    x = sources @ torch.randn(12, 12, generator=gen, dtype=torch.float64)
    cpu, gpu = fast_ica(x, 12, seed=1, max_iter=300), fast_ica(x.cuda(), 12, seed=1, max_iter=300)
    assert gpu.components.is_cuda and gpu.n_iter == cpu.n_iter
    scale = cpu.components.abs().max()
    torch.testing.assert_close(gpu.components.cpu(), cpu.components, atol=1e-8 * float(scale), rtol=0)
    xf = x.float()
    on_gpu, on_cpu = baselines.fit("ica", xf.cuda(), n=12, k=3), baselines.fit("ica", xf, n=12, k=3)
    assert on_gpu.directions.is_cuda
    torch.testing.assert_close(on_gpu.decode(on_gpu.encode(xf.cuda())).cpu(), on_cpu.decode(on_cpu.encode(xf)),
                               atol=1e-4, rtol=1e-4)
