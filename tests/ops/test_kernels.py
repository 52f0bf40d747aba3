"""Every Triton kernel against the float64 reference.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1);
on a CUDA machine the same tests run compiled. Shapes are never block multiples.
"""

import pytest
import torch

from fastsae.kernels import _autotune, _common
from fastsae.kernels._autotune import EncoderConfig, encoder_configs, topk_k_pad
from fastsae.kernels.encoder_threshold import encoder_threshold
from fastsae.kernels.encoder_topk import MAX_K, encoder_topk, encoder_topk_candidates
from fastsae.kernels.segment_reduce import segment_reduce
from fastsae.kernels.sparse_decode import sparse_decode, sparse_value_grad
from fastsae.ops import reference, triton_backend

from conftest import make_sae
from helpers import TOL, assert_close, assert_valid_topk, dense_pre_activations, float64_copy, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _encoder_inputs(sae, x):
    x_c = (x - sae.b_dec).detach()
    return x_c.to(DEVICE), sae.W_enc.detach().to(DEVICE), sae.b_enc.detach().to(DEVICE)


# ---- fused TopK encoder -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d_in,d_sae,k,splits", [
    (1, 13, 37, 1, None), (7, 24, 100, 5, 2), (33, 40, 129, 16, None), (5, 16, 20, 20, 1), (18, 17, 70, 3, 3),
])
def test_encoder_topk(dtype, n, d_in, d_sae, k, splits):
    sae = make_sae(d_in, d_sae, "topk", k=k, dtype=DTYPE_NAMES[dtype])
    x = torch.randn(n, d_in).to(dtype)
    values, indices = encoder_topk(*_encoder_inputs(sae, x), k, splits=splits)
    assert values.shape == indices.shape == (n, k)
    assert values.dtype == dtype and indices.dtype == torch.int64
    assert_valid_topk(float64_copy(sae), x.double(), values.cpu(), indices.cpu(), k, dtype, scale=4)


def test_encoder_topk_ties_pick_distinct_latents():
    sae = make_sae(8, 40, "topk", k=6)
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[:1].expand(40, 8))  # every latent has the same pre-activation
        sae.b_enc.zero_()
    x = torch.randn(3, 8)
    values, indices = encoder_topk(*_encoder_inputs(sae, x), 6, splits=2)
    for row in indices.cpu():
        assert row.unique().numel() == 6
    assert_valid_topk(float64_copy(sae), x.double(), values.cpu(), indices.cpu(), 6, torch.float32)


def test_encoder_topk_all_negative_rows():
    sae = make_sae(8, 30, "topk", k=4)
    with torch.no_grad():
        sae.b_enc.fill_(-50.0)
    values, indices = encoder_topk(*_encoder_inputs(sae, torch.randn(5, 8)), 4)
    assert (values == 0).all()
    for row in indices.cpu():
        assert row.unique().numel() == 4 and row.max() < 30


def test_encoder_topk_past_16_bit_indices():
    """d_sae > 65,536 with few rows: indices keep all 32 bits."""
    sae = make_sae(16, 70_000, "topk", k=2)
    with torch.no_grad():  # winners beyond 2^16, so a truncated index would show
        sae.b_enc[69_999] = 50.0
        sae.b_enc[65_536] = 40.0
    x = torch.randn(1, 16)
    values, indices = encoder_topk(*_encoder_inputs(sae, x), 2, splits=1, config=EncoderConfig(16, 256, 16, 4, 1))
    assert indices.cpu().tolist() == [[69_999, 65_536]]
    assert_valid_topk(float64_copy(sae), x.double(), values.cpu(), indices.cpu(), 2, torch.float32)


def test_encoder_topk_candidates_hold_each_rows_topk():
    sae = make_sae(12, 90, "topk", k=5)
    x = torch.randn(9, 12)
    cand_val, cand_idx = encoder_topk_candidates(*_encoder_inputs(sae, x), 5, splits=3)
    assert cand_val.shape == (9, 3 * topk_k_pad(5))
    pre = dense_pre_activations(float64_copy(sae), x.double()).relu()
    for row in range(9):
        want = set(torch.topk(pre[row], 5).indices.tolist())
        assert want <= set(cand_idx[row].cpu().tolist())


@pytest.mark.parametrize("config", [EncoderConfig(16, 16, 16, 4, 1), EncoderConfig(32, 64, 32, 4, 1)])
def test_encoder_topk_pinned_config_compacts_often(config):
    """Narrow tiles against a wide k: each row's candidate list fills and is compacted many times."""
    sae = make_sae(20, 300, "topk", k=20)
    x = torch.randn(37, 20)
    values, indices = encoder_topk(*_encoder_inputs(sae, x), 20, splits=2, config=config)
    assert_valid_topk(float64_copy(sae), x.double(), values.cpu(), indices.cpu(), 20, torch.float32)


def test_encoder_topk_k_256():
    """The largest k the fused kernel takes (K_PAD 256, lists of 512 slots)."""
    sae = make_sae(16, 600, "topk", k=MAX_K)
    x = torch.randn(3, 16)
    values, indices = encoder_topk(*_encoder_inputs(sae, x), MAX_K, splits=2)
    assert_valid_topk(float64_copy(sae), x.double(), values.cpu(), indices.cpu(), MAX_K, torch.float32)


def test_encoder_topk_refuses_bad_arguments():
    sae = make_sae(8, 30, "topk", k=4)
    x, W, b = _encoder_inputs(sae, torch.randn(2, 8))
    with pytest.raises(ValueError, match="k must be"):
        encoder_topk(x, W, b, 0)
    with pytest.raises(ValueError, match="k must be"):
        encoder_topk(x, W, b, 31)
    with pytest.raises(ValueError, match="b_enc"):
        encoder_topk(x, W, b[:-1], 2)
    with pytest.raises(ValueError, match="W_enc"):
        encoder_topk(x, W[:, :-1], b, 2)
    assert MAX_K >= 128  # the benchmark's largest k runs fused


# ---- fused threshold encoder ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("jump", [False, True])
@pytest.mark.parametrize("n,d_in,d_sae,capacity,splits", [
    (1, 13, 37, 64, None), (17, 24, 100, 3, 2), (33, 19, 129, 200, 1), (6, 16, 50, 1, 3),
])
def test_encoder_threshold(dtype, jump, n, d_in, d_sae, capacity, splits):
    sae = make_sae(d_in, d_sae, "jumprelu" if jump else "relu", dtype=DTYPE_NAMES[dtype])
    theta = (0.2 * torch.rand(d_sae)).to(DEVICE) if jump else None
    x = torch.randn(n, d_in).to(dtype)
    values, indices, counts = encoder_threshold(*_encoder_inputs(sae, x), theta, capacity, splits=splits)
    pre = dense_pre_activations(float64_copy(sae), x.double())
    active = pre > (theta.cpu().double() if jump else 0)
    totals = counts.cpu().sum(1)
    atol, rtol = TOL[dtype]
    near = (pre - (theta.cpu().double() if jump else 0)).abs() < 4 * (atol + rtol * pre.abs())
    # Counts are exact up to latents sitting on the threshold within rounding.
    assert ((totals - active.sum(1)).abs() <= near.sum(1)).all()
    if counts.max() <= capacity:  # everything fit: the compact lists are the dense result
        got = torch.zeros(n, d_sae, dtype=torch.float64)
        got.scatter_add_(1, indices.cpu().reshape(n, -1).long(), values.cpu().reshape(n, -1).double())
        expected = pre * active
        torch.testing.assert_close(got[~near], expected[~near], atol=4 * atol, rtol=4 * rtol)


def test_threshold_overflow_takes_a_second_exact_pass():
    sae = make_sae(10, 60, "relu")
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every latent fires: far past the capacity
    triton_backend._capacity_hint[60] = 16
    before = triton_backend.STATS["threshold_second_pass"]
    x = torch.randn(4, 10).to(DEVICE)
    sae = sae.to(DEVICE)
    from fastsae import use_backend

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


# ---- tile configs and the autotuner --------------------------------------------------------------


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "tf32"), (torch.float32, "ieee"),
                                             (torch.bfloat16, "ieee"), (torch.float16, "ieee")])
def test_pruned_candidates_are_a_subset_of_the_compiled_grid(dtype, precision):
    """The compile test compiles the candidates of the largest shapes; no shape may pick one outside them."""
    for k_pad in (None, 64, 128, 256):
        grid = set(encoder_configs(1 << 20, 1 << 20, k_pad, dtype, precision))
        for d_in in (1, 17, 64, 300, 4096):
            for d_sae in (1, 40, 100, 1000, 70_000):
                kept = encoder_configs(d_in, d_sae, k_pad, dtype, precision)
                assert kept and set(kept) <= grid


def test_autotuner_times_each_candidate_once_per_shape(monkeypatch):
    monkeypatch.setattr(_autotune, "interpreting", lambda: False)
    monkeypatch.setattr(_autotune, "_chosen", {})
    monkeypatch.delenv("FASTSAE_AUTOTUNE", raising=False)
    slow = EncoderConfig(64, 128, 64, 8, 3)
    runs = []
    monkeypatch.setattr(_autotune.triton.testing, "do_bench",
                        lambda fn, **kw: (fn(), 2.0 if runs[-1] == slow else 1.0)[1])
    args = (4096, 65536, 64, torch.bfloat16, "ieee", torch.device("cpu"), runs.append)
    first = _autotune.choose("topk", *args)
    n = len(encoder_configs(4096, 65536, 64, torch.bfloat16, "ieee"))
    assert first != slow and len(runs) == n > 1
    assert _autotune.choose("topk", *args) == first and len(runs) == n  # cached: no new timing
    _autotune.choose("topk", 2048, *args[1:])  # another shape is tuned afresh
    assert len(runs) > n
    monkeypatch.setenv("FASTSAE_AUTOTUNE", "0")
    assert _autotune.choose("topk", 1024, *args[1:]) == encoder_configs(1024, 65536, 64, torch.bfloat16, "ieee")[0]


def test_fp32_matmul_defaults_to_tf32_with_an_exact_opt_out(monkeypatch):
    monkeypatch.delenv(_common.FP32_MATMUL_ENV, raising=False)
    assert _common.dot_precision(torch.float32) == "tf32"
    assert _common.dot_precision(torch.bfloat16) == "ieee"
    monkeypatch.setenv(_common.FP32_MATMUL_ENV, "ieee")
    assert _common.dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv(_common.FP32_MATMUL_ENV, "fp64")
    with pytest.raises(ValueError, match=_common.FP32_MATMUL_ENV):
        _common.dot_precision(torch.float32)
    _common.set_fp32_matmul("tf32")
    try:
        assert _common.dot_precision(torch.float32) == "tf32"  # the call wins over the environment
    finally:
        _common.set_fp32_matmul(None)
    with pytest.raises(ValueError, match="fp32 matmul mode"):
        _common.set_fp32_matmul("fast")


# ---- decode and value gradient --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,width,d_in,d_sae", [(1, 1, 7, 5), (19, 6, 33, 50), (40, 13, 130, 70)])
def test_sparse_decode(dtype, n, width, d_in, d_sae):
    W = torch.randn(d_sae, d_in).to(dtype)
    b = torch.randn(d_in).to(dtype)
    values = torch.rand(n, width).to(dtype)
    values[:, -1] = 0  # a padding slot
    indices = torch.randint(0, d_sae, (n, width))
    got = sparse_decode(values.to(DEVICE), indices.to(DEVICE), W.to(DEVICE), b.to(DEVICE))
    expected = reference.decode(values.double(), indices, W.double(), b.double())
    assert got.dtype == dtype
    assert_close(got.cpu(), expected, dtype, scale=2 * width)
    no_bias = sparse_decode(values.to(DEVICE), indices.to(DEVICE), W.to(DEVICE), out_dtype=torch.float32)
    assert_close(no_bias.cpu(), expected - b.double(), dtype, scale=2 * width)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,width,d_in,d_sae", [(1, 1, 7, 5), (19, 6, 33, 50), (21, 3, 300, 40)])
def test_sparse_value_grad(dtype, n, width, d_in, d_sae):
    W = torch.randn(d_sae, d_in).to(dtype)
    grad = torch.randn(n, d_in).to(dtype)
    indices = torch.randint(0, d_sae, (n, width))
    got = sparse_value_grad(grad.to(DEVICE), indices.to(DEVICE), W.to(DEVICE))
    expected = torch.einsum("nd,nwd->nw", grad.double(), W.double()[indices])
    assert_close(got.cpu(), expected, dtype, scale=d_in ** 0.5)


# ---- segment reduction ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,width,d_in,d_sae", [(1, 1, 7, 5), (37, 5, 33, 23), (50, 9, 140, 300)])
def test_segment_reduce(dtype, n, width, d_in, d_sae):
    indices = torch.randint(0, d_sae, (n, width))
    coef = torch.randn(n, width)
    coef[coef.abs() < 0.3] = 0  # padding / latents that did not fire
    y = torch.randn(n, d_in).to(dtype)
    out, out_sum = segment_reduce(indices.to(DEVICE), coef.to(DEVICE), y.to(DEVICE), d_sae,
                                  out_dtype=torch.float32, with_sum=True)
    expected = torch.zeros(d_sae, d_in, dtype=torch.float64)
    expected.index_add_(0, indices.reshape(-1), coef.reshape(-1, 1).double() * y.double().repeat_interleave(width, 0))
    expected_sum = torch.zeros(d_sae, dtype=torch.float64).index_add_(0, indices.reshape(-1), coef.reshape(-1).double())
    assert_close(out.cpu(), expected, dtype, scale=n ** 0.5)
    assert_close(out_sum.cpu(), expected_sum, torch.float32, scale=n ** 0.5)
    again = segment_reduce(indices.to(DEVICE), coef.to(DEVICE), y.to(DEVICE), d_sae, out_dtype=torch.float32)
    assert torch.equal(again, out)  # deterministic: same bits


# ---- the whole SAE through the triton backend -----------------------------------------------------

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
    from fastsae import use_backend

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

    from fastsae import use_backend

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
    from fastsae import use_backend

    with use_backend("triton"), pytest.raises(RuntimeError, match="CUDA"):
        sae(torch.randn(2, 8))
