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

from ._autotune import EncoderConfig, choose
from ._common import check_encoder_inputs, dot_precision, encoder_grid, interpreting
from ._gemm import encoder_tile, quarters, tile_sources


@triton.jit
def _append(pre, offs_n, mask_m, theta_ptr, out_ptr, row_start, count, n_latents, capacity):
    """Append each row's active (pre, latent) pairs of a (BLOCK_M, width) tile of latents offs_n to its list
    (entries out_ptr + row_start + [0, capacity)); returns count + the row's active latents in the tile."""
    mask_n = offs_n < n_latents
    theta = tl.load(theta_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # zeros for ReLU
    active = (pre > theta[None, :]) & mask_m[:, None] & mask_n[None, :]
    rank = tl.cumsum(active.to(tl.int32), axis=1)  # (BLOCK_M, width): 1 + active latents before
    entry = (pre.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs_n[None, :].to(tl.int64)
    tl.store(out_ptr + (row_start + count - 1)[:, None] + rank, entry,
             mask=active & (rank <= (capacity - count)[:, None]))
    return count + tl.sum(active.to(tl.int32), axis=1)


@triton.jit
def _encoder_threshold_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, theta_ptr, out_ptr, count_ptr,
    # sizes
    n_rows, n_latents, d_in, tiles_per_split, capacity,
    # strides (out: (N, S, C) packed entries; count: (N, S))
    stride_xm, stride_xd, stride_wl, stride_wd, stride_om, stride_cm,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, QUARTERS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    count = tl.zeros((BLOCK_M,), dtype=tl.int32)  # active latents of each row so far in this slice
    # One base pointer and int32 offsets: a 2-D tensor of 64-bit pointers for the scattered store costs two
    # registers per element, and two stores (values, indices) instead of one packed entry spilled on sm_90.
    out_ptr += row0.to(tl.int64) * stride_om + pid_s * capacity
    row_start = tl.arange(0, BLOCK_M) * stride_om  # (BLOCK_M,)

    for t in range(pid_s * tiles_per_split, (pid_s + 1) * tiles_per_split):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_latents
        pre = encoder_tile(x_ptr, w_ptr, b_ptr, row0, offs_m.to(tl.int64), mask_m, t * BLOCK_N, offs_n.to(tl.int64),
                           mask_n, d_in, stride_xm, stride_xd, stride_wl, stride_wd,
                           BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, TMA)
        if QUARTERS:  # in latent order, so the lists are the same as the whole tile's
            Q: tl.constexpr = BLOCK_N // 4
            p0, p1, p2, p3 = quarters(pre, BLOCK_M, BLOCK_N)
            n0 = t * BLOCK_N
            count = _append(p0, n0 + tl.arange(0, Q), mask_m, theta_ptr, out_ptr, row_start, count, n_latents, capacity)
            count = _append(p1, n0 + Q + tl.arange(0, Q), mask_m, theta_ptr, out_ptr, row_start, count, n_latents,
                            capacity)
            count = _append(p2, n0 + 2 * Q + tl.arange(0, Q), mask_m, theta_ptr, out_ptr, row_start, count,
                            n_latents, capacity)
            count = _append(p3, n0 + 3 * Q + tl.arange(0, Q), mask_m, theta_ptr, out_ptr, row_start, count,
                            n_latents, capacity)
        else:
            count = _append(pre, offs_n, mask_m, theta_ptr, out_ptr, row_start, count, n_latents, capacity)

    tl.store(count_ptr + offs_m * stride_cm + pid_s, count, mask=mask_m)


def encoder_threshold(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor | None,
                      capacity: int, splits: int | None = None, config: EncoderConfig | None = None):
    """One pass of the fused threshold encoder.

    x (N, d_in), W_enc (d_sae, d_in), b_enc (d_sae,), threshold (d_sae,) or None for ReLU.
    Returns values (N, S, C) fp32 and indices (N, S, C) int32 (unused slots 0), and
    counts (N, S) int32 of active latents per row and slice; the result is exact iff
    counts.max() <= capacity C. config pins the tiles (default: the autotuner's choice for this shape).
    """
    N, d_in = x.shape
    check_encoder_inputs(x, W_enc, b_enc)
    d_sae = W_enc.shape[0]
    if threshold is not None and threshold.shape != (d_sae,):
        raise ValueError(f"threshold must have shape ({d_sae},), got {tuple(threshold.shape)}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    precision = dot_precision(x.dtype)
    # ReLU is the threshold 0: one compiled kernel for both (a d_sae-float load per tile is noise).
    theta = threshold.float().contiguous() if threshold is not None else x.new_zeros(d_sae, dtype=torch.float32)

    def launch(c: EncoderConfig, splits: int | None = None):
        g = encoder_grid(N, d_sae, x.device, c.block_m, c.block_n, splits)
        entries = torch.zeros(N, g.splits, capacity, device=x.device, dtype=torch.int64)  # (value bits, index)
        counts = torch.empty(N, g.splits, device=x.device, dtype=torch.int32)
        x_src, w_src, c = tile_sources(x, W_enc, c)
        _encoder_threshold_kernel[(g.row_blocks, g.splits)](
            x_src, w_src, b_enc, theta, entries, counts,
            N, d_sae, d_in, g.tiles_per_split, capacity,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), entries.stride(0), counts.stride(0),
            **threshold_constexprs(c, precision), **c.launch_options(),
        )
        values = (entries >> 32).to(torch.int32).view(torch.float32)
        return values, (entries & 0xFFFFFFFF).to(torch.int32), counts

    if config is None:
        config = choose("threshold", d_in, d_sae, None, x.dtype, precision, x.device, launch)
    return launch(config, splits)


def threshold_constexprs(config: EncoderConfig, precision: str) -> dict:
    """The kernel's compile-time arguments (shared with the compile check, fastsae.kernels._variants)."""
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                BLOCK_K=config.block_k, UPCAST=interpreting(), PRECISION=precision, TMA=config.tma,
                QUARTERS=config.quarters)
