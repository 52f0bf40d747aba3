"""Fused encoder + ReLU / JumpReLU with compact output: no (N, d_sae) matrix is written.

Each program owns BLOCK_M rows and one of SPLITS contiguous slices of the
latents. It computes the encoder GEMM tile by tile; the epilogue adds the bias,
keeps pre > threshold (0 for ReLU, a per-latent vector for JumpReLU), and
appends the active (value, index) pairs of each row to that row's slot list
for the slice, in latent order (a cumsum gives each its position, so no atomics
and the layout is deterministic). Rows count all their active latents, also
those past the capacity, so the host knows when a second pass is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_encoder_inputs, dot_precision, encoder_grid, interpreting
from ._gemm import encoder_tile


@triton.jit
def _encoder_threshold_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, theta_ptr, out_val_ptr, out_idx_ptr, count_ptr,
    # sizes
    n_rows, n_latents, d_in, tiles_per_split, capacity,
    # strides
    stride_xm, stride_xd, stride_wl, stride_wd, stride_om, stride_os, stride_cm,
    # meta-parameters
    HAS_THRESHOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    count = tl.zeros((BLOCK_M,), dtype=tl.int32)  # active latents of each row so far in this slice
    out_row = out_val_ptr + offs_m * stride_om + pid_s * stride_os
    idx_row = out_idx_ptr + offs_m * stride_om + pid_s * stride_os

    for t in range(pid_s * tiles_per_split, (pid_s + 1) * tiles_per_split):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: offs_n · stride_wl can pass 2^31
        mask_n = offs_n < n_latents
        pre = encoder_tile(x_ptr, w_ptr, b_ptr, offs_m, mask_m, offs_n, mask_n, d_in,
                           stride_xm, stride_xd, stride_wl, stride_wd, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        if HAS_THRESHOLD:
            theta = tl.load(theta_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            active = pre > theta[None, :]
        else:
            active = pre > 0.0
        active = active & mask_m[:, None] & mask_n[None, :]
        hits = active.to(tl.int32)
        pos = count[:, None] + tl.cumsum(hits, axis=1) - 1  # (BLOCK_M, BLOCK_N) slot of each active latent
        keep = active & (pos < capacity)
        tl.store(out_row[:, None] + pos, pre, mask=keep)
        tl.store(idx_row[:, None] + pos, offs_n.to(tl.int32)[None, :], mask=keep)
        count += tl.sum(hits, axis=1)

    tl.store(count_ptr + offs_m * stride_cm + pid_s, count, mask=mask_m)


def encoder_threshold(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor | None,
                      capacity: int, splits: int | None = None, block_m: int | None = None,
                      block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None):
    """One pass of the fused threshold encoder.

    x (N, d_in), W_enc (d_sae, d_in), b_enc (d_sae,), threshold (d_sae,) or None for ReLU.
    Returns values (N, S, C) fp32 and indices (N, S, C) int32 (unused slots 0), and
    counts (N, S) int32 of active latents per row and slice; the result is exact iff
    counts.max() <= capacity C.
    """
    N, d_in = x.shape
    check_encoder_inputs(x, W_enc, b_enc)
    d_sae = W_enc.shape[0]
    if threshold is not None and threshold.shape != (d_sae,):
        raise ValueError(f"threshold must have shape ({d_sae},), got {tuple(threshold.shape)}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    g = encoder_grid(N, d_sae, x.device, block_m, block_n, block_k, num_warps, splits)
    splits = g.splits
    values = torch.zeros(N, splits, capacity, device=x.device, dtype=torch.float32)
    indices = torch.zeros(N, splits, capacity, device=x.device, dtype=torch.int32)
    counts = torch.empty(N, splits, device=x.device, dtype=torch.int32)
    theta = threshold.float().contiguous() if threshold is not None else b_enc  # b_enc: any valid pointer
    _encoder_threshold_kernel[(g.row_blocks, splits)](
        x, W_enc, b_enc, theta, values, indices, counts,
        N, d_sae, d_in, g.tiles_per_split, capacity,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), values.stride(0), values.stride(1),
        counts.stride(0),
        HAS_THRESHOLD=threshold is not None, BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k,
        UPCAST=interpreting(), PRECISION=dot_precision(), num_warps=g.num_warps,
    )
    return values, indices, counts
