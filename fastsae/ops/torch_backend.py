"""Sparse-aware plain PyTorch: fast on CPU and any GPU, no Triton needed.

The encoder forward builds the (N, d_sae) pre-activations (the Triton backend
removes them); nothing of that size is built in decode or in any backward:

- decode is `F.embedding_bag` over the active decoder rows, whose autograd
  gives the value gradients as dot products and the decoder gradient only for
  rows that fired;
- the encoder backward masks the value gradient by "fired", gathers `grad_x`
  with another `embedding_bag`, and forms the encoder weight gradient as a
  CSR matrix (latents × rows, sorted by latent) times x: a segment reduction
  with no atomics and no (N·k, d_in) intermediate.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def segment_rows_sum(indices: Tensor, coef: Tensor, y: Tensor, num_segments: int) -> Tensor:
    """out[i] = Σ_{(n, j): indices[n, j] = i} coef[n, j] · y[n], in fp32.

    indices, coef: (N, w); y: (N, d) → (num_segments, d). Entries with coef 0
    (padding, latents that did not fire) are dropped before the reduction.
    """
    N, w = indices.shape
    flat_coef = coef.reshape(-1)
    keep = (flat_coef != 0).nonzero().squeeze(1)
    seg = indices.reshape(-1)[keep]
    order = torch.argsort(seg, stable=True)  # sort by latent: one contiguous segment per latent
    crow = torch.zeros(num_segments + 1, dtype=torch.int64, device=y.device)
    crow[1:] = torch.cumsum(torch.bincount(seg, minlength=num_segments), 0)
    cols = keep[order] // w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        G = torch.sparse_csr_tensor(crow, cols, flat_coef[keep][order].float(), size=(num_segments, N))
        return G @ y.float()


def _select_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values, indices = torch.topk(pre, k, dim=-1)
    return values.clamp_min_(0), indices


def _select_active(pre: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """Compact form of pre where active: width = the largest row count, padding 0."""
    width = max(1, int(active.sum(-1).max()))
    values, indices = torch.topk(pre.masked_fill_(~active, 0), width, dim=-1)
    return values, indices


class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, select: Callable) -> tuple[Tensor, Tensor]:
        pre = F.linear(x, W_enc, b_enc)  # (N, d_sae), the one dense tensor of this backend
        values, indices = select(pre)
        del pre
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(x, W_enc, values, indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices):
        x, W_enc, values, indices = ctx.saved_tensors
        g = grad_values * (values > 0)  # the activation's gradient is 0 where the latent is off
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=g.to(W_enc.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            grad_W = segment_rows_sum(indices, g, x, W_enc.shape[0]).to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[0], dtype=torch.float32, device=g.device)
            grad_b = grad_b.index_add_(0, indices.reshape(-1), g.reshape(-1).float()).to(W_enc.dtype)
        return grad_x, grad_W, grad_b, None


def encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return _SparseEncode.apply(x, W_enc, b_enc, lambda pre: _select_topk(pre, k))


def encode_threshold(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor | None) -> tuple[Tensor, Tensor]:
    theta = torch.zeros((), dtype=x.dtype, device=x.device) if threshold is None else threshold.detach()
    return _SparseEncode.apply(x, W_enc, b_enc, lambda pre: _select_active(pre, pre > theta))


def encode_batchtopk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    taus = []

    def select(pre: Tensor) -> tuple[Tensor, Tensor]:
        pre = pre.relu_()
        tau = torch.topk(pre.reshape(-1), min(k * pre.shape[0], pre.numel())).values[-1]
        taus.append(tau.float())
        # active iff >= tau and > 0: the same rule as the reference, robust to ties
        return _select_active(pre, (pre >= tau) & (pre > 0))

    values, indices = _SparseEncode.apply(x, W_enc, b_enc, select)
    return values, indices, taus[0]


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    x_hat = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")  # (N, d_in)
    return x_hat + b_dec
