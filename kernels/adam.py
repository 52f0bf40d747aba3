"""Fused Adam step with the SAE decoder constraint, one pass over a parameter.

For each row of a parameter (a decoder/encoder row, or a slice of a bias):
    if CONSTRAIN:  g ← g − <g, w> w               (keep the unit-norm row on the sphere)
    m ← m + (1 − β1)(g − m)                        (torch.optim.Adam's own update order)
    v ← β2 v + (1 − β2) g²
    w ← w − lr/bc1 · m / (√v / √bc2 + ε)
    if RENORM:     w ← w / ||w||

State may be fp32 or bf16 (halving the optimizer's memory); the arithmetic is
fp32, cast once on store. At realistic sizes Adam's memory traffic (read w, g,
m, v; write w, m, v) costs about as much as the encoder GEMM, so fusing the
constraint and renormalisation saves two more full passes over W_dec.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _adam_rows_kernel(
    # pointers
    w_ptr, g_ptr, m_ptr, v_ptr,
    # sizes and scalars
    n_elements, row_len, beta1, beta2, step_size, bc2_sqrt, eps,
    # meta-parameters
    CONSTRAIN: tl.constexpr, RENORM: tl.constexpr, BLOCK: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * row_len
    row_end = tl.minimum(row_start + row_len, n_elements)
    offs = tl.arange(0, BLOCK)
    dot = 0.0
    if CONSTRAIN:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(row_start, row_end, BLOCK):
            mask = c0 + offs < row_end
            w = tl.load(w_ptr + c0 + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + c0 + offs, mask=mask, other=0.0).to(tl.float32)
            acc += w * g
        dot = tl.sum(acc, axis=0)
    sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(row_start, row_end, BLOCK):
        mask = c0 + offs < row_end
        w = tl.load(w_ptr + c0 + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + c0 + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + c0 + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + c0 + offs, mask=mask, other=0.0).to(tl.float32)
        if CONSTRAIN:
            g = g - dot * w
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * v + (1.0 - beta2) * g * g
        w = w - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
        tl.store(m_ptr + c0 + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + c0 + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
        w_out = w.to(w_ptr.dtype.element_ty)
        tl.store(w_ptr + c0 + offs, w_out, mask=mask)
        if RENORM:
            w_stored = w_out.to(tl.float32)
            sq += tl.where(mask, w_stored * w_stored, 0.0)
    if RENORM:
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), 1e-30)
        for c0 in range(row_start, row_end, BLOCK):
            mask = c0 + offs < row_end
            w = tl.load(w_ptr + c0 + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(w_ptr + c0 + offs, (w * inv).to(w_ptr.dtype.element_ty), mask=mask)


def adam_block(row_len: int) -> int:
    """Elements per loop step: the row, up to 1024 (fastsae.kernels._variants compiles each choice)."""
    return min(1024, triton.next_power_of_2(row_len))


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
              step: int, lr: float, beta1: float, beta2: float, eps: float, rows: bool = False) -> None:
    """In place. rows=True: param is (R, C) with unit rows to keep (constraint + renormalisation);
    otherwise any shape, updated elementwise."""
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape:
            raise ValueError(f"{name} must have the parameter's shape {tuple(param.shape)}, got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if not param.is_contiguous():
        raise ValueError("param must be contiguous")
    if rows and param.dim() != 2:
        raise ValueError(f"rows=True needs a 2-D parameter, got shape {tuple(param.shape)}")
    n = param.numel()
    row_len = param.shape[1] if rows else 4096
    block = adam_block(row_len)
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    _adam_rows_kernel[(triton.cdiv(n, row_len),)](
        param, grad, exp_avg, exp_avg_sq, n, row_len, beta1, beta2, lr / bc1, bc2**0.5, eps,
        CONSTRAIN=rows, RENORM=rows, BLOCK=block,
    )
