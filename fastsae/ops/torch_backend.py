"""Sparse-aware plain PyTorch: fast on CPU and any GPU, no Triton needed.

The encoder forward builds the (N, d_sae) pre-activations (the Triton backend
removes them), for fp32 on CPU with MKL's or oneDNN's GEMM, the faster as measured (ops/cpu_gemm.py), and selects
from them with a two-level top-k on CPU; nothing of that size is built in
decode or in any backward, and
every sparse reduction is one of two fused CPU kernels, `F.embedding_bag`
(a weighted gather-sum of rows, multi-threaded over bags) and its per-sample
weight gradient (a dot product per entry), so no (N·k, d_in) intermediate is
ever written:

- decode is `F.embedding_bag` over the active decoder rows; its backward
  gives the value gradients as dot products, taken latent by latent so each
  decoder row is read once, and the decoder gradient only for rows that fired,
  as a latent-sorted segment sum;
- the encoder backward masks the value gradient by "fired", gathers `grad_x`
  with another `embedding_bag`, and forms the encoder weight gradient as the
  same segment sum over x: entries sorted by latent, one bag per latent,
  summed in a fixed order (no atomics, the same bits whatever the thread count).

At N 2048, d_in 768, d_sae 16384, k 32 on 2 CPU cores the two segment sums take
~30 ms together with their sort, against ~150 ms for a sparse CSR matmul and
~400 ms with the sort it needs (bench/cpu_step.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_gemm, jumprelu, screened_topk
from ._autograd import SparseEncode, SparsePrims
from .latent_groups import latent_segments
from .matryoshka import matryoshka_decode  # noqa: F401 (the backend's op, written in ops/matryoshka.py)
from .row_select import TOPK_GROUP, _pack_rows, rows_dot, topk_rows


def segment_rows_sum(indices: Tensor, coef: Tensor, y: Tensor, num_segments: int) -> Tensor:
    """out[i] = Σ_{(n, j): indices[n, j] = i} coef[n, j] · y[n], in fp32.

    indices, coef: (N, w); y: (N, d) → (num_segments, d). One embedding_bag bag per latent over the rows of
    y; entries with coef 0 (padding, latents that did not fire) are dropped before the reduction.
    """
    rows, c, offsets = latent_segments(indices, coef, num_segments)
    return F.embedding_bag(rows, y.float(), offsets, mode="sum", per_sample_weights=c.float(),
                           include_last_offset=True)


def _select_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values, indices = topk_rows(pre, k)
    return values.clamp_min_(0), indices


def _select_active(pre: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """Compact form of pre where active: width = the largest row count, padding 0, latent order."""
    rows, cols = active.nonzero(as_tuple=True)  # row-major: each row's latents in order
    return _pack_rows(pre.shape[0], rows, pre[rows, cols], cols, 0.0)


def _segment_sum(indices: Tensor, coef: Tensor, y: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    grad_b = torch.zeros(d_sae, dtype=torch.float32, device=coef.device)
    grad_b.index_add_(0, indices.reshape(-1), coef.reshape(-1).float())
    return segment_rows_sum(indices, coef, y, d_sae), grad_b


PRIMS = SparsePrims(
    gather_rows=lambda coef, indices, W: F.embedding_bag(indices, W, per_sample_weights=coef, mode="sum"),
    segment_sum=_segment_sum,
)


def _dense_select(select: Callable) -> Callable:
    """select(pre) -> a backend select(x, W, b) that goes through the dense pre-activations."""

    def run(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> tuple[Tensor, ...]:
        # (N, d_sae), the one dense tensor of this backend: fp32 on CPU by the faster of oneDNN's GEMM and MKL's,
        # measured on this machine (ops/cpu_gemm.py), elsewhere F.linear's; select copies out what it keeps.
        # In its inputs' dtype whatever autocast says, as the op's compiled form (a custom op) and the Triton
        # kernel compute it: which GEMM was picked must not change what autocast does
        with torch.autocast(x.device.type, enabled=False):
            return select(cpu_gemm.linear(x, W_enc, b_enc))

    return run


def encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if screened_topk.pays(x, W_enc, b_enc, k):  # a bf16 screen and an fp32 rescore, where that is faster
        return SparseEncode.apply(x, W_enc, b_enc, lambda x, W, b: _screened(x, W, b, k), PRIMS)
    return SparseEncode.apply(x, W_enc, b_enc, _dense_select(lambda pre: _select_topk(pre, k)), PRIMS)


def _screened(x: Tensor, W: Tensor, b: Tensor, k: int) -> tuple[Tensor, Tensor]:
    with torch.autocast(x.device.type, enabled=False):  # fp32, as _dense_select's GEMM
        values, indices = screened_topk.screened_topk(x, W, b, k)
    return values.clamp_min_(0), indices


def encode_threshold(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor | None) -> tuple[Tensor, Tensor]:
    theta = torch.zeros((), dtype=x.dtype, device=x.device) if threshold is None else threshold.detach()
    return SparseEncode.apply(x, W_enc, b_enc, _dense_select(lambda pre: _select_active(pre, pre > theta)), PRIMS)


def encode_jumprelu(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor,
                    bandwidth: float) -> tuple[Tensor, Tensor, Tensor]:
    """JumpReLU with θ's straight-through gradient (ops/jumprelu.py): the active latents and the halo
    (pre in (θ − ε/2, θ], value 0), and the window (N, w) bool of the slots within ε/2 of θ."""
    theta = threshold.detach()
    low = theta - bandwidth / 2

    def select(pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rows, cols = (pre > low).nonzero(as_tuple=True)  # padding -inf: outside every window
        packed, columns = _pack_rows(pre.shape[0], rows, pre[rows, cols], cols, float("-inf"))
        return jumprelu.split_window(packed, columns, theta, bandwidth)

    values, indices, window = SparseEncode.apply(x, W_enc, b_enc, _dense_select(select), PRIMS)
    return jumprelu.attach_threshold(values, indices, window, threshold, bandwidth), indices, window


def _select_batchtopk(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    n, d = pre.shape
    budget = min(k * n, pre.numel())
    if pre.device.type == "cpu" and pre.is_contiguous() and d % TOPK_GROUP == 0 and n * d // TOPK_GROUP >= 4 * budget:
        found = two_level_batch_select(pre, budget, TOPK_GROUP)
        if found is not None:
            return found
    pre = pre.relu_()
    tau = torch.topk(pre.reshape(-1), budget).values[-1]
    # active iff >= tau and > 0: the same rule as the reference, robust to ties
    return (*_select_active(pre, (pre >= tau) & (pre > 0)), tau.float())


def two_level_batch_select(pre: Tensor, budget: int, group: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """BatchTopK's selection (the entries >= tau, the budget-th largest of (N, d) contiguous pre, and > 0) looking
    only in the budget groups of largest maximum, as two_level_topk does per row: a pass of group maxima and a
    top-k over them instead of a top-k over all N·d entries and two more passes (at N 2,048, d 16,384, k 32 on 2
    cores: 101 against 777 ms, bench/cpu_parts.py). Every entry >= tau lies in a chosen group when tau > floor, the
    least chosen maximum (an unchosen group's maximum is <= floor); None (the caller's full pass) when tau equals
    floor (a tie may sit in an unchosen group), when floor <= 0 (ReLU's zeros) or when a NaN is among them."""
    n, d = pre.shape
    groups = pre.view(-1, group)
    best, chosen = torch.topk(groups.amax(1), budget, sorted=False)
    floor = best.min()
    if not floor > 0:  # also NaN
        return None
    chosen = chosen.sort().values  # row-major: each row's groups, and so its entries, in column order
    candidates = groups.index_select(0, chosen)  # (budget, group)
    tau = torch.topk(candidates.reshape(-1), budget).values[-1]
    if not tau > floor:
        return None
    at, slots = (candidates >= tau).nonzero(as_tuple=True)
    flat = chosen[at] * group + slots  # positions in the (N, d) matrix, ascending
    values, indices = _pack_rows(n, flat // d, candidates[at, slots], flat % d, 0.0)
    return values, indices, tau.float()


def encode_batchtopk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    return SparseEncode.apply(x, W_enc, b_enc, _dense_select(lambda pre: _select_batchtopk(pre, k)), PRIMS)


class _DecodeRows(torch.autograd.Function):
    """Σ_j v[n, j] · W[idx[n, j]] with a backward whose reductions do not depend on the rest of the batch:
    the weight gradient is the latent-sorted segment sum (no embedding_bag backward, whose order does)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W)
        # values in W's dtype: under autocast a bf16 encoder GEMM hands bf16 values to an fp32 decoder
        return F.embedding_bag(indices, W, per_sample_weights=values.to(W.dtype), mode="sum")  # (N, d_in)

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, indices, W = ctx.saved_tensors
        grad_values, grad_W = decode_grads(grad, values, indices, W, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return grad_values, None, grad_W


def decode_grads(grad: Tensor, values: Tensor, indices: Tensor, W: Tensor, need_values: bool,
                 need_W: bool) -> tuple[Tensor | None, Tensor | None]:
    """decode's backward without its bias: grad (N, d_in) -> grad_values (N, w), grad_W (d_sae, d_in), None where
    not asked for (also ops/custom_ops.py's decode_grads under torch.compile)."""
    grad_values = grad_W = None
    if need_values:  # <grad[n], W[idx[n, j]]>
        grad_values = rows_dot(grad, indices, W).to(values.dtype)
    if need_W:
        grad_W = segment_rows_sum(indices, values, grad, W.shape[0]).to(W.dtype)
    return grad_values, grad_W


def decode_rows(values: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """(N, w) values and latent indices, W (d_sae, d_in) -> (N, d_in), no bias."""
    return _DecodeRows.apply(values, indices, W)


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    return decode_rows(values, indices, W_dec) + b_dec


# ---- the optimizer step and resampling -------------------------------------------------------------


def adam_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, lr: float,
              beta1: float, beta2: float, eps: float, rows: bool = False) -> None:
    """The fused kernel's arithmetic (kernels/adam.py) as in-place PyTorch ops, in torch.optim.Adam's own order."""
    w = param
    g = grad.float() if grad.dtype != torch.float32 else grad
    if rows:
        g = g - (g * w.float()).sum(1, keepdim=True) * w.float()
    fp32_state = exp_avg.dtype == torch.float32
    m32 = exp_avg if fp32_state else exp_avg.float()
    v32 = exp_avg_sq if fp32_state else exp_avg_sq.float()
    m32.lerp_(g, 1.0 - beta1)
    v32.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    denom = (v32.sqrt() / bc2**0.5).add_(eps)
    if w.dtype == torch.float32:
        w.addcdiv_(m32, denom, value=-lr / bc1)
    else:
        w.copy_(w.float().addcdiv_(m32, denom, value=-lr / bc1))
    if not fp32_state:
        exp_avg.copy_(m32)
        exp_avg_sq.copy_(v32)
    if rows:
        w.div_(w.float().norm(dim=1, keepdim=True).clamp_min(1e-30).to(w.dtype))


def resample_rows(latents: Tensor, directions: Tensor, W_dec: Tensor, W_enc: Tensor | None, b_enc: Tensor,
                  encoder_scale: float, state: dict[str, Tensor] | None = None) -> None:
    """The writes of kernels/resample.py: W_dec[i] = u, W_enc[i] = encoder_scale · u, b_enc[i] = 0, moments 0."""
    W_dec[latents] = directions.to(W_dec.dtype)
    if W_enc is not None:
        W_enc[latents] = (directions * encoder_scale).to(W_enc.dtype)
    b_enc[latents] = 0
    for t in (state or {}).values():
        t[latents] = 0
