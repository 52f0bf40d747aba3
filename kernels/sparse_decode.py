"""Sparse-latent decode and its value gradient: gathers over the active decoder rows.

    decode:      out[n]    = Σ_j v[n, j] · W[idx[n, j]]  (+ bias)        (N, d_in)
    value grad:  gv[n, j]  = <g[n], W[idx[n, j]]>                         (N, w)

The decode kernel also gives the encoder's input gradient (W = W_enc, v = the
masked value gradients). Each program owns BLOCK_M rows and one BLOCK_D slice
of d_in and walks the w slots in order: fp32 accumulation, no atomics, the
same bits on every run. Padding slots (value 0) add exactly 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_matrix, interpreting


@triton.jit
def _decode_kernel(
    # pointers
    val_ptr, idx_ptr, w_ptr, bias_ptr, out_ptr,
    # sizes
    n_rows, width, d_in,
    # strides
    stride_vm, stride_wl, stride_om,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_rows
    mask_d = offs_d < d_in
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j in range(0, width):
        v = tl.load(val_ptr + offs_m * stride_vm + j, mask=mask_m, other=0.0).to(tl.float32)
        row = tl.load(idx_ptr + offs_m * stride_vm + j, mask=mask_m, other=0).to(tl.int64)
        w = tl.load(w_ptr + row[:, None] * stride_wl + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += v[:, None] * w
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _value_grad_kernel(
    # pointers
    grad_ptr, idx_ptr, w_ptr, out_ptr,
    # sizes
    n_rows, width, d_in,
    # strides
    stride_gm, stride_im, stride_wl,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    for j in range(0, width):
        row = tl.load(idx_ptr + offs_m * stride_im + j, mask=mask_m, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, d_in, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_m[:, None] & (offs_d < d_in)[None, :]
            g = tl.load(grad_ptr + offs_m[:, None] * stride_gm + offs_d[None, :], mask=mask, other=0.0)
            w = tl.load(w_ptr + row[:, None] * stride_wl + offs_d[None, :], mask=mask, other=0.0)
            acc += tl.sum(g.to(tl.float32) * w.to(tl.float32), axis=1)
        tl.store(out_ptr + offs_m * stride_im + j, acc, mask=mask_m)


def blocks(d_in: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D): a 128-wide slice of d_in, narrower (>= 16) only when d_in is."""
    return 16 if interpreting() else 32, max(16, min(128, triton.next_power_of_2(d_in)))


def _check(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> None:
    check_matrix("values", values)
    if indices.shape != values.shape:
        raise ValueError(f"indices must have the shape of values {tuple(values.shape)}, got {tuple(indices.shape)}")
    check_matrix("W", W)
    if W.stride(1) != 1:
        raise ValueError("W must be contiguous along d_in")


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor,
                  bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, w) values and indices, W (d_sae, d_in), bias (d_in,) -> (N, d_in) in out_dtype (default W's)."""
    _check(values, indices, W)
    values, indices = values.contiguous(), indices.contiguous()
    N, width = values.shape
    d_in = W.shape[1]
    out = torch.empty(N, d_in, device=W.device, dtype=out_dtype or W.dtype)
    block_m, block_d = blocks(d_in)
    grid = (triton.cdiv(N, block_m), triton.cdiv(d_in, block_d))
    _decode_kernel[grid](values, indices, W, bias if bias is not None else W, out, N, width, d_in,
                         values.stride(0), W.stride(0), out.stride(0),
                         HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_D=block_d)
    return out


def sparse_value_grad(grad: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """grad (N, d_in), indices (N, w), W (d_sae, d_in) -> (N, w) fp32 dot products <grad[n], W[idx[n, j]]>."""
    check_matrix("grad", grad, cols=W.shape[1])
    _check(indices.to(W.dtype), indices, W)
    grad, indices = grad.contiguous(), indices.contiguous()
    N, width = indices.shape
    out = torch.empty(N, width, device=W.device, dtype=torch.float32)
    block_m, block_d = blocks(W.shape[1])
    _value_grad_kernel[(triton.cdiv(N, block_m),)](grad, indices, W, out, N, width, W.shape[1],
                                                   grad.stride(0), indices.stride(0), W.stride(0),
                                                   BLOCK_M=block_m, BLOCK_D=block_d)
    return out
