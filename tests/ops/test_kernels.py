"""Every Triton kernel (kernels/) against the float64 reference (fastsae/ops/reference.py), in every dtype.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1);
on a CUDA machine the same tests run compiled. Shapes are never block multiples.
The autotuner is tested in test_autotune.py, the whole SAE on this backend in
tests/modules/test_sae_backends.py.
"""

import pytest
import torch

from fastsae.kernels._autotune import EncoderConfig, topk_k_pad
from fastsae.kernels.encoder_threshold import encoder_threshold
from fastsae.kernels.encoder_topk import MAX_K, encoder_topk, encoder_topk_candidates
from fastsae.kernels.segment_reduce import segment_reduce
from fastsae.kernels.sparse_decode import sparse_decode, sparse_value_grad
from fastsae.ops import reference

from conftest import make_sae
from helpers import TOL, assert_close, assert_valid_topk, dense_pre_activations, float64_copy

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
    # without a bias, signed coefficients: the encoders' input gradient (gather_rows), in W's dtype or in fp32
    coef = torch.randn(n, width).to(dtype)
    expected = reference.gather_rows(coef.double(), indices, W.double())
    for out_dtype in (None, torch.float32):
        no_bias = sparse_decode(coef.to(DEVICE), indices.to(DEVICE), W.to(DEVICE), out_dtype=out_dtype)
        assert no_bias.dtype == (out_dtype or dtype)
        assert_close(no_bias.cpu(), expected, dtype, scale=2 * width)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,width,d_in,d_sae", [(1, 1, 7, 5), (19, 6, 33, 50), (21, 3, 300, 40)])
def test_sparse_value_grad(dtype, n, width, d_in, d_sae):
    W = torch.randn(d_sae, d_in).to(dtype)
    grad = torch.randn(n, d_in).to(dtype)
    indices = torch.randint(0, d_sae, (n, width))
    got = sparse_value_grad(grad.to(DEVICE), indices.to(DEVICE), W.to(DEVICE))
    assert got.dtype == torch.float32
    expected = reference.decode_value_grad(grad.double(), indices, W.double())
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
    expected, expected_sum = reference.segment_sum(indices, coef.double(), y.double(), d_sae)
    assert out.dtype == out_sum.dtype == torch.float32
    assert_close(out.cpu(), expected, dtype, scale=n ** 0.5)
    assert_close(out_sum.cpu(), expected_sum, torch.float32, scale=n ** 0.5)
    again = segment_reduce(indices.to(DEVICE), coef.to(DEVICE), y.to(DEVICE), d_sae, out_dtype=torch.float32)
    assert torch.equal(again, out)  # deterministic: same bits
    in_dtype = segment_reduce(indices.to(DEVICE), coef.to(DEVICE), y.to(DEVICE), d_sae)  # the decoder's W grad
    assert in_dtype.dtype == dtype
    assert_close(in_dtype.cpu(), expected, dtype, scale=n ** 0.5)
