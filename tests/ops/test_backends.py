"""The backends against the float64 reference: decode's autograd op by op on the torch and Triton backends in
every dtype, and the whole SAE on the torch backend (values and every gradient, for every activation; the
Triton backend's whole-SAE tests are tests/modules/test_sae_backends.py)."""

import pytest
import torch

from fastsae import use_backend
from fastsae.ops import reference, torch_backend, triton_backend

from conftest import make_sae
from helpers import assert_close, assert_valid_topk, float64_copy, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ACTS = [("relu", None), ("jumprelu", None), ("topk", 1), ("topk", 5), ("batchtopk", 3)]
# (rows, d_in, d_sae), never block multiples; d_sae 640 (20 groups of TOPK_GROUP) takes the two-level top-k
SHAPES = [(1, 7, 23), (5, 13, 37), (33, 24, 100), (2, 16, 16), (9, 13, 640)]


@pytest.mark.parametrize("activation,k", ACTS)
@pytest.mark.parametrize("n,d_in,d_sae", SHAPES)
def test_torch_matches_reference_fp32(activation, k, n, d_in, d_sae):
    k = min(k, d_sae) if k else None
    sae = make_sae(d_in, d_sae, activation, k, l1_coefficient=None if k else 0.7)
    ref = float64_copy(sae)
    x = torch.randn(n, d_in)
    out_ref, g_ref = run(ref, x.double(), "reference")
    out, g = run(sae, x, "torch")
    assert_close(out.x_hat, out_ref.x_hat, torch.float32)
    assert_close(out.loss, out_ref.loss, torch.float32, scale=10)
    assert_close(out.latents.to_dense(), out_ref.latents.to_dense(), torch.float32)
    assert set(g) == set(g_ref)
    for name in g_ref:
        assert_close(g[name], g_ref[name], torch.float32, scale=10, msg=f"grad of {name}")


@pytest.mark.parametrize("activation,k", ACTS)
def test_reference_gradients_match_finite_differences(activation, k):
    sae = float64_copy(make_sae(5, 11, activation, k))
    x = torch.randn(4, 5, dtype=torch.float64)
    names = [n for n, p in sae.named_parameters() if p.requires_grad]
    with torch.no_grad():  # keep every pre-activation away from the kink, so the loss is smooth nearby
        pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        assert (pre.abs() > 1e-3).all()

    def loss(*tensors):
        with use_backend("reference"):
            return torch.func.functional_call(sae, dict(zip(names, tensors, strict=True)), (x,)).loss

    inputs = [getattr(sae, n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("activation,k", ACTS)
def test_leading_dims(activation, k):
    sae = make_sae(6, 20, activation, k)
    x = torch.randn(2, 3, 4, 6)
    out = sae(x)
    assert out.x_hat.shape == (2, 3, 4, 6)
    assert out.latents.values.shape[:3] == (2, 3, 4)
    if activation == "batchtopk":
        sae.eval()  # training-mode BatchTopK couples the rows; inference does not
        out = sae(x)
    torch.testing.assert_close(out.x_hat.reshape(-1, 6), sae(x.reshape(-1, 6)).x_hat)
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.x_hat)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_relu_low_precision(dtype):
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    sae = make_sae(32, 75, "relu", dtype=name)
    ref = float64_copy(sae)
    x = torch.randn(9, 32).to(dtype)
    out_ref, g_ref = run(ref, x.double(), "reference")
    out, g = run(sae, x, "torch")
    assert out.x_hat.dtype == dtype
    assert_close(out.x_hat, out_ref.x_hat, dtype, scale=4)
    for name in ("W_dec", "b_dec", "b_enc"):
        assert_close(g[name], g_ref[name], dtype, scale=8, msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_low_precision_selects_a_true_topk(dtype):
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    sae = make_sae(32, 75, "topk", k=6, dtype=name)
    x = torch.randn(9, 32).to(dtype)
    lat = sae.encode(x)
    assert lat.values.dtype == dtype
    assert_valid_topk(float64_copy(sae), x.double(), lat.values, lat.indices, 6, dtype, scale=4)
    # decode of those latents equals the float64 decode of the same latents
    ref = float64_copy(sae)
    with use_backend("reference"):
        expected = ref.decode(type(lat)(lat.values.double(), lat.indices, lat.d_sae))
    assert_close(sae.decode(lat), expected, dtype, scale=4)


def test_all_negative_rows_fire_nothing():
    sae = make_sae(8, 30, "relu")
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
    for backend in ("torch", "reference"):
        out, g = run(sae, torch.randn(4, 8), backend)
        assert (out.latents.l0 == 0).all()
        torch.testing.assert_close(out.x_hat, sae.b_dec.detach().expand(4, 8))
        assert (g["W_enc"] == 0).all() and (g["b_enc"] == 0).all()


def test_batchtopk_selects_n_times_k_over_the_batch():
    sae = make_sae(10, 40, "batchtopk", k=4)
    x = torch.randn(16, 10)
    out = sae(x)
    lat = out.latents
    assert int(lat.l0.sum()) == 16 * 4  # no ties on random data
    assert lat.l0.max() > lat.l0.min()  # rows share the budget unevenly
    # the batch threshold comes back as a value: the smallest selected activation; encode has no side effect
    assert float(out.threshold) == pytest.approx(float(lat.values[lat.values > 0].min()))
    assert float(sae.threshold) == 0
    with torch.no_grad():
        sae.threshold.fill_(float(out.threshold))  # what the trainer records after the first batch
    sae.eval()  # inference uses the recorded threshold
    lat_eval = sae.encode(x)
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).detach()
    torch.testing.assert_close(lat_eval.to_dense(), pre * (pre > sae.threshold))


def test_sparse_backward_builds_no_dense_batch_by_latent_tensor():
    """The torch backend's decode and backward allocate nothing of size N x d_sae."""
    n, d_in, d_sae, k = 64, 8, 4096, 4
    sae = make_sae(d_in, d_sae, "topk", k=k)
    x = torch.randn(n, d_in)
    out = sae(x)
    sizes = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:  # a sparse matrix holds nnz values
                    sizes.append(t.numel())
            return result

    with Spy():
        out.loss.backward()
        sae.decode(out.latents.detach())
    assert sizes and max(sizes) < n * d_sae, f"largest tensor {max(sizes)} >= N*d_sae={n * d_sae}"
    assert max(sizes) >= d_sae * d_in  # the weight gradients themselves


@pytest.mark.parametrize("backend", [torch_backend, triton_backend], ids=["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,w,d_in,d_sae", [(1, 1, 7, 5), (19, 6, 33, 50)])
def test_decode_autograd_matches_the_reference(backend, dtype, n, w, d_in, d_sae):
    """x_hat and the gradients of values (decode_value_grad), W_dec (segment_sum) and b_dec."""
    gen = torch.Generator().manual_seed(n * d_sae)
    values = torch.rand(n, w, generator=gen).to(dtype)
    values[:, -1] = 0  # a padding slot
    indices = torch.randint(0, d_sae, (n, w), generator=gen)
    W, b = torch.randn(d_sae, d_in, generator=gen).to(dtype), torch.randn(d_in, generator=gen).to(dtype)
    grad = torch.randn(n, d_in, generator=gen).to(dtype)
    leaves = [t.to(DEVICE).requires_grad_() for t in (values, W, b)]
    x_hat = backend.decode(leaves[0], indices.to(DEVICE), leaves[1], leaves[2])
    x_hat.backward(grad.to(DEVICE))
    assert x_hat.dtype == dtype and all(t.grad.dtype == dtype for t in leaves)
    assert_close(x_hat.cpu(), reference.decode(values.double(), indices, W.double(), b.double()), dtype, scale=2 * w)
    g = grad.double()
    assert_close(leaves[0].grad.cpu(), reference.decode_value_grad(g, indices, W.double()), dtype, scale=d_in**0.5)
    assert_close(leaves[1].grad.cpu(), reference.segment_sum(indices, values.double(), g, d_sae)[0], dtype,
                 scale=n**0.5)
    assert_close(leaves[2].grad.cpu(), g.sum(0), dtype, scale=n**0.5)
