"""The whole SAE through the Triton backend against the float64 reference backend: forward, loss and every
gradient for every activation, and what the backend does around its kernels (the threshold encoder's second
pass, the dense fallback past the kernels' k, determinism, no (N, d_sae) allocation, refusing CPU tensors).

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); on a CUDA machine the same
tests run compiled. The ops one by one are tested in tests/ops/ (the table in fastsae/ops/__init__.py).
"""

import pytest
import torch

from fastsae import use_backend
from fastsae.kernels.encoder_topk import MAX_K
from fastsae.ops import triton_backend

from conftest import make_sae
from helpers import assert_close, dense_pre_activations, float64_copy, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_threshold_overflow_takes_a_second_exact_pass():
    sae = make_sae(10, 60, "relu")
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every latent fires: far past the capacity
    triton_backend._capacity_hint[60] = 16
    before = triton_backend.STATS["threshold_second_pass"]
    x = torch.randn(4, 10).to(DEVICE)
    sae = sae.to(DEVICE)
    with use_backend("triton"):
        lat = sae.encode(x)
    assert triton_backend.STATS["threshold_second_pass"] == before + 1
    assert (lat.l0 == 60).all()
    torch.testing.assert_close(lat.to_dense().cpu().double(),
                               dense_pre_activations(float64_copy(sae.cpu()), x.cpu().double()),
                               atol=1e-5, rtol=1e-5)
    one_pass = triton_backend.STATS["threshold_one_pass"]
    with use_backend("triton"):
        sae.encode(x)  # the capacity adapted: the next batch fits in one pass
    assert triton_backend.STATS["threshold_one_pass"] == one_pass + 1


ACTS = [("relu", None), ("jumprelu", None), ("topk", 1), ("topk", 4), ("batchtopk", 3)]


@pytest.mark.parametrize("activation,k", ACTS)
@pytest.mark.parametrize("n,d_in,d_sae", [(1, 7, 23), (21, 19, 67)])
def test_sae_forward_backward_matches_reference(activation, k, n, d_in, d_sae):
    sae = make_sae(d_in, d_sae, activation, k)
    ref = float64_copy(sae)
    x = torch.randn(n, d_in)
    out_ref, g_ref = run(ref, x.double(), "reference")
    sae = sae.to(DEVICE)
    out, g = run(sae, x.to(DEVICE), "triton")
    assert_close(out.x_hat.cpu(), out_ref.x_hat, torch.float32, scale=4)
    assert_close(out.loss.cpu(), out_ref.loss, torch.float32, scale=20)
    assert_close(out.latents.to_dense().cpu(), out_ref.latents.to_dense(), torch.float32, scale=4)
    assert set(g) == set(g_ref)
    for name in g_ref:
        assert_close(g[name].cpu(), g_ref[name], torch.float32, scale=20, msg=f"grad of {name}")


def test_relu_bf16_sae_matches_reference():
    sae = make_sae(32, 75, "relu", dtype="bfloat16")
    ref = float64_copy(sae)
    x = torch.randn(9, 32).to(torch.bfloat16)
    out_ref, g_ref = run(ref, x.double(), "reference")
    out, g = run(sae.to(DEVICE), x.to(DEVICE), "triton")
    assert_close(out.x_hat.cpu(), out_ref.x_hat, torch.bfloat16, scale=4)
    for name in ("W_dec", "b_dec", "b_enc"):
        assert_close(g[name].cpu(), g_ref[name], torch.bfloat16, scale=8, msg=f"grad of {name}")


def test_wide_topk_and_batchtopk_fall_back_to_the_dense_path():
    """k past the kernel's register budget (MAX_K) still gives the exact result, through the torch path."""
    for activation, k in (("topk", MAX_K + 1), ("batchtopk", MAX_K // 2 + 1)):
        sae = make_sae(8, 2 * MAX_K + 100, activation, k).to(DEVICE)
        x = torch.randn(4, 8).to(DEVICE)
        key = {"topk": "topk_dense_fallback", "batchtopk": "batchtopk_dense_fallback"}[activation]
        before = triton_backend.STATS[key]
        with use_backend("triton"):
            got = sae(x).x_hat
        with use_backend("torch"):
            want = sae(x).x_hat
        assert triton_backend.STATS[key] == before + 1
        torch.testing.assert_close(got, want)


def test_backward_is_deterministic():
    sae = make_sae(16, 90, "topk", k=4).to(DEVICE)
    x = torch.randn(40, 16).to(DEVICE)
    _, a = run(sae, x, "triton")
    _, b = run(sae, x, "triton")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_topk_op_allocates_nothing_of_size_n_by_d_sae():
    n, d_in, d_sae, k = 32, 8, 1024, 2
    sae = make_sae(d_in, d_sae, "topk", k=k).to(DEVICE)
    x = torch.randn(n, d_in).to(DEVICE)
    sizes = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func._schema.name.endswith("_"):  # in-place (the interpreter's copy-backs): allocates nothing
                return result
            for t in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    sizes.append((t.numel(), str(func)))
            return result

    with use_backend("triton"), Spy():
        out = sae(x)
        out.loss.backward()
    largest = max(sizes)
    assert largest[0] < n * d_sae, f"{largest[1]} made {largest[0]} elements >= N*d_sae={n * d_sae}"


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("checks the CPU message")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sae = make_sae(8, 20, "topk", k=2)
    with use_backend("triton"), pytest.raises(RuntimeError, match="CUDA"):
        sae(torch.randn(2, 8))
