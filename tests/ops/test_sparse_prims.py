"""The torch backend's sparse primitives (embedding_bag segment sums and per-entry dots, the two-level top-k)
against the float64 reference (fastsae/ops/reference.py) on odd shapes, with repeated latents, padding and
latents that never fire, in every dtype they take."""

import copy

import pytest
import torch

from fastsae.ops import reference, torch_backend
from fastsae.ops.latent_groups import latent_segments
from fastsae.ops.row_select import TOPK_GROUP, rows_dot, topk_rows, two_level_topk
from fastsae.ops.torch_backend import segment_rows_sum, two_level_batch_select
from fastsae.train import TrainConfig, Trainer

from conftest import make_sae
from helpers import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

SHAPES = [(1, 1, 5, 1), (7, 3, 11, 13), (33, 5, 37, 24), (130, 9, 301, 17)]  # (N, w, d_sae, d)


def _entries(n, w, d_sae, seed=0):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, d_sae, (n, w), generator=gen)
    indices[:, -1] = indices[:, 0]  # a latent twice in one row (the compact form's padding repeats index 0)
    coef = torch.randn(n, w, generator=gen)
    coef[::3, -1] = 0  # padding / latents that did not fire
    return indices, coef


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,w,d_sae,d", SHAPES)
def test_segment_rows_sum_matches_the_reference(n, w, d_sae, d, dtype):
    indices, coef = _entries(n, w, d_sae)
    coef, y = coef.to(dtype), torch.randn(n, d).to(dtype)
    out = segment_rows_sum(indices, coef, y, d_sae)
    assert out.shape == (d_sae, d) and out.dtype == torch.float32  # fp32-accumulated whatever the inputs
    expect, _ = reference.segment_sum(indices, coef.double(), y.double(), d_sae)
    assert_close(out, expect, torch.float32, scale=n**0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,w,d_sae,d", SHAPES)
def test_prims_match_the_reference(n, w, d_sae, d, dtype):
    """The torch path's SparsePrims: gather_rows in W's dtype, segment_sum and its coefficient sums in fp32."""
    indices, coef = _entries(n, w, d_sae, seed=3)
    coef, y, W = coef.to(dtype), torch.randn(n, d).to(dtype), torch.randn(d_sae, d).to(dtype)
    got = torch_backend.PRIMS.gather_rows(coef, indices, W)
    assert got.shape == (n, d) and got.dtype == dtype
    assert_close(got, reference.gather_rows(coef.double(), indices, W.double()), dtype, scale=w)
    out, sums = torch_backend.PRIMS.segment_sum(indices, coef, y, d_sae)
    expect, expect_sums = reference.segment_sum(indices, coef.double(), y.double(), d_sae)
    assert out.dtype == sums.dtype == torch.float32
    assert_close(out, expect, torch.float32, scale=n**0.5)
    assert_close(sums, expect_sums, torch.float32, scale=n**0.5)


@pytest.mark.parametrize("n,w,d_sae,d", SHAPES)
def test_latent_segments_group_entries_by_latent_in_batch_order(n, w, d_sae, d):
    indices, coef = _entries(n, w, d_sae, seed=1)
    rows, c, offsets = latent_segments(indices, coef, d_sae)
    assert offsets[0] == 0 and offsets[-1] == rows.numel() == int((coef != 0).sum())
    for i in range(d_sae):
        seg = slice(int(offsets[i]), int(offsets[i + 1]))
        hit = (indices == i) & (coef != 0)
        expect_rows = hit.nonzero()[:, 0]  # row-major: batch order
        assert torch.equal(rows[seg], expect_rows)
        assert torch.equal(c[seg], coef[hit])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,w,d_sae,d", SHAPES)
def test_rows_dot_matches_the_reference(n, w, d_sae, d, dtype):
    indices, _ = _entries(n, w, d_sae, seed=2)
    grad, W = torch.randn(n, d), torch.randn(d_sae, d).to(dtype)
    out = rows_dot(grad, indices, W)
    assert out.shape == (n, w) and out.dtype == dtype
    # rows_dot takes grad in W's dtype (decode's backward gets it so): the reference sees the same rounded grad
    expect = reference.decode_value_grad(grad.to(dtype).double(), indices, W.double())
    assert_close(out, expect, dtype, scale=d**0.5)


TOPK_SHAPES = [(1, 128, 1, 32), (7, 640, 5, 32), (33, 1024, 7, 16), (130, 4096, 32, 32), (9, 96, 3, 8)]


def _check_topk(pre, k, values, indices):
    """values are torch.topk's exactly; indices are k distinct columns holding them."""
    expect = torch.topk(pre, k, dim=1).values
    torch.testing.assert_close(values, expect, rtol=0, atol=0, equal_nan=True)
    assert indices.dtype == torch.int64 and indices.shape == (pre.shape[0], k)
    torch.testing.assert_close(pre.gather(1, indices), values, rtol=0, atol=0, equal_nan=True)
    assert all(len(set(row.tolist())) == k for row in indices)


@pytest.mark.parametrize("n,d,k,group", TOPK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_level_topk_is_torch_topk(n, d, k, group, dtype):
    pre = torch.randn(n, d, generator=torch.Generator().manual_seed(d)).to(dtype)
    values, indices = two_level_topk(pre, k, group)
    _check_topk(pre, k, values, indices)
    if dtype == torch.float32:  # distinct values: the very same entries, in the same order
        assert torch.equal(indices, torch.topk(pre, k, dim=1).indices)


@pytest.mark.parametrize("case", ["ties", "one hot group", "minus inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # groups of adjacent / strided columns
def test_two_level_topk_edge_cases(case, dtype):
    gen = torch.Generator().manual_seed(3)
    n, d, k, group = 6, 512, 8, 16
    if case == "ties":  # few distinct values: many groups share the k-th maximum
        pre = torch.randint(0, 3, (n, d), generator=gen).float()
    else:
        pre = torch.randn(n, d, generator=gen)
    if case == "one hot group":  # every top entry in one group, the other groups far below
        pre[:, 32:48] += 100
    if case == "minus inf":  # a row with fewer finite entries than k, and one all -inf
        pre[0] = float("-inf")
        pre[1, 3:] = float("-inf")
    if case == "nan":
        pre[2, 7] = float("nan")
    pre = pre.to(dtype)
    values, indices = two_level_topk(pre, k, group)
    if case == "minus inf":  # which -inf columns fill the row is free
        torch.testing.assert_close(values, torch.topk(pre, k, dim=1).values, rtol=0, atol=0)
        assert all(len(set(row.tolist())) == k for row in indices)
    else:
        _check_topk(pre, k, values, indices)


def test_topk_rows_goes_two_level_only_where_it_pays(monkeypatch):
    calls = []
    monkeypatch.setattr("fastsae.ops.row_select.two_level_topk",
                        lambda pre, k, group: calls.append(pre.shape) or torch.topk(pre, k, dim=1))
    for shape, k in [((4, 16 * TOPK_GROUP), 4), ((4, 16 * TOPK_GROUP), 5), ((4, 16 * TOPK_GROUP + 1), 2)]:
        _check_topk(pre := torch.randn(shape), k, *topk_rows(pre, k))
    assert calls == [(4, 16 * TOPK_GROUP)]  # not with fewer than 4k groups, nor d off the group size
    pre = torch.randn(8, 32 * TOPK_GROUP).T.contiguous().T  # not contiguous
    _check_topk(pre, 2, *topk_rows(pre, 2))
    assert len(calls) == 1


def test_empty_segments():
    indices, coef = torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2)
    out = segment_rows_sum(indices, coef, torch.randn(4, 3), 6)
    assert torch.equal(out, torch.zeros(6, 3))


def test_cpu_trainer_uses_torch_fused_adam_and_matches_the_per_tensor_loop():
    """auto on CPU: torch.optim.Adam(fused=True); the same arithmetic as torch's default Adam."""
    sae = make_sae(13, 37, "topk", 4)
    other = copy.deepcopy(sae)
    trainer = Trainer(sae, TrainConfig.flat(lr=1e-2, progress=False))
    assert trainer.optimizer.defaults["fused"] is True
    slow = Trainer(other, TrainConfig.flat(lr=1e-2, progress=False))
    slow.optimizer = torch.optim.Adam([p for p in other.parameters() if p.requires_grad], lr=1e-2, fused=False)
    for _ in range(4):
        x = torch.randn(20, 13)
        trainer.step(x)
        slow.step(x)
    for (name, a), b in zip(sae.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def _full_batch_select(pre, budget):
    """BatchTopK's rule over every entry: >= the budget-th largest of relu(pre), and > 0."""
    p = pre.relu()
    tau = torch.topk(p.reshape(-1), budget).values[-1]
    return (p >= tau) & (p > 0), tau


@pytest.mark.parametrize("n,d,k", [(19, 256, 2), (7, 1024, 5), (33, 512, 1)])
def test_two_level_batch_select_is_the_full_selection(n, d, k):
    pre = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    found = two_level_batch_select(pre.clone(), n * k, TOPK_GROUP)
    assert found is not None
    values, indices, tau = found
    active, want_tau = _full_batch_select(pre, n * k)
    assert tau == want_tau
    dense = torch.zeros(n, d).scatter_add_(1, indices, values)
    torch.testing.assert_close(dense, torch.where(active, pre, 0), rtol=0, atol=0)
    live = values > 0  # each row's latents in column order, padding (value 0) after them
    assert all(torch.equal(row[m], row[m].sort().values) for row, m in zip(indices, live, strict=True))
    assert int(live.sum()) == int(active.sum()) == n * k


@pytest.mark.parametrize("case", ["few positive", "tie at the floor", "nan"])
def test_two_level_batch_select_hands_back_what_it_cannot_decide(case):
    n, d, k = 8, 512, 2
    pre = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    if case == "few positive":  # fewer positive entries than the budget: tau is 0
        pre = -pre.abs()
        pre[0, :3] = 1.0
    if case == "tie at the floor":  # every group's maximum equal: tau is the floor
        pre = torch.zeros(n, d)
        pre.view(-1, TOPK_GROUP)[:, 0] = 1.0
    if case == "nan":
        pre[3, 5] = float("nan")
    assert two_level_batch_select(pre.clone(), n * k, TOPK_GROUP) is None


def test_batchtopk_encoder_goes_two_level_and_matches_the_reference(monkeypatch):
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(0))
    W = torch.randn(16 * TOPK_GROUP, 24, generator=torch.Generator().manual_seed(1)) / 5
    b = torch.zeros(16 * TOPK_GROUP)
    calls = []
    spy = lambda *a: calls.append(1) or two_level_batch_select(*a)  # noqa: E731
    monkeypatch.setattr(torch_backend, "two_level_batch_select", spy)
    values, indices, tau = torch_backend.encode_batchtopk(x, W, b, 3)
    assert calls
    active, want_tau = _full_batch_select(x @ W.T + b, 64 * 3)
    dense = torch.zeros(64, W.shape[0]).scatter_add_(1, indices, values.detach())
    torch.testing.assert_close(dense, torch.where(active, x @ W.T + b, 0))
    torch.testing.assert_close(tau, want_tau)
