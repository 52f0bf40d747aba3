"""The sparse encoder's autograd, shared by the torch and Triton backends.

Forward: a backend `select(x, W_enc, b_enc) -> values, indices (N, w), *extra`
that never keeps the (N, d_sae) pre-activations; extra outputs (BatchTopK's batch
threshold) leave the Function as values, without gradient. Backward: the activation's
gradient is zero wherever a latent is off (value 0, padding included), so

    g        = grad_values · 1[value > 0]                       (N, w)
    grad_x   = Σ_j g[n, j] · W_enc[idx[n, j]]                   a gather, (N, d_in)
    grad_W   = Σ_{entries of latent i} g · x[row]               a segment sum, rows of fired latents only
    grad_b   = Σ_{entries of latent i} g

The backend supplies the two primitives that do the work (`SparsePrims`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SparsePrims:
    # (coef (N, w), indices (N, w), W (d_sae, d_in)) -> (N, d_in): Σ_j coef[n, j] · W[idx[n, j]]
    gather_rows: Callable[[Tensor, Tensor, Tensor], Tensor]
    # (indices, coef (N, w), y (N, d_in), d_sae) -> (Σ_seg coef·y (d_sae, d_in) fp32-accumulated, Σ_seg coef (d_sae,))
    segment_sum: Callable[[Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor]]


class SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, select: Callable, prims: SparsePrims):
        values, indices, *extra = select(x, W_enc, b_enc)
        ctx.mark_non_differentiable(indices, *extra)
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.prims = prims
        return (values, indices, *extra)

    @staticmethod
    def backward(ctx, grad_values: Tensor, *_grad_rest):
        x, W_enc, values, indices = ctx.saved_tensors
        g = grad_values * (values > 0)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.prims.gather_rows(g.to(W_enc.dtype), indices, W_enc).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_W, grad_b = ctx.prims.segment_sum(indices, g, x, W_enc.shape[0])
            grad_W, grad_b = grad_W.to(W_enc.dtype), grad_b.to(W_enc.dtype)
        return grad_x, grad_W, grad_b, None, None
