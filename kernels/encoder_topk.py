"""Fused encoder + TopK: relu(x @ W_enc^T + b_enc), each row's top-k, without the (N, d_sae) matrix.

Each program owns BLOCK_M rows and a contiguous slice of the latents (one of
SPLITS slices). It computes the encoder GEMM one (BLOCK_M, BLOCK_N) tile at a
time, and in the epilogue packs every pre-activation with its latent index into
one int64 key, takes the tile's top-K_PAD keys and merges them into a running
top-K_PAD held in registers. Only those K_PAD candidates per (row, slice) are
written; the host takes the final top-k over SPLITS·K_PAD candidates per row.

Peak extra memory: N·SPLITS·K_PAD·8 bytes, e.g. 16 MB at N = 8192, k = 64,
4 slices, against 2 GB for the fp32 pre-activations at d_sae = 65,536.

Key layout (int64): [ fp32 bits of relu(pre) (31 bits, >= 0) | 2^31 - 1 - index ]
Non-negative floats order like their bit patterns, so keys order by value, and
among equal values the smaller index wins. 32-bit indices: d_sae may pass 65,536.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_encoder_inputs, dot_precision, encoder_grid, interpreting, next_pow2
from ._gemm import encoder_tile

# Largest K_PAD kept in registers: (BLOCK_M, 2·K_PAD) int64 keys per merge.
# Larger k goes through the dense path of the ops layer.
MAX_K = 256
INDEX_MAX = 2**31 - 1


@triton.jit
def _pack(values, offs_n, n_latents):
    """relu'd fp32 values (>= 0) and their latent indices -> int64 keys; -1 outside the latent range."""
    bits = values.to(tl.int32, bitcast=True).to(tl.int64)
    keys = (bits << 32) | (2147483647 - offs_n).to(tl.int64)
    return tl.where(offs_n[None, :] < n_latents, keys, -1)


@triton.jit
def _encoder_topk_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, cand_val_ptr, cand_idx_ptr,
    # sizes
    n_rows, n_latents, d_in, tiles_per_split,
    # strides
    stride_xm, stride_xd, stride_wl, stride_wd, stride_cm, stride_cs,
    # meta-parameters
    K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    best = tl.full((BLOCK_M, K_PAD), -1, tl.int64)  # the running top-K_PAD keys of each row

    for t in range(pid_s * tiles_per_split, (pid_s + 1) * tiles_per_split):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: offs_n · stride_wl can pass 2^31
        mask_n = offs_n < n_latents
        pre = encoder_tile(x_ptr, w_ptr, b_ptr, offs_m, mask_m, offs_n, mask_n, d_in,
                           stride_xm, stride_xd, stride_wl, stride_wd, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        pre = tl.maximum(pre, 0.0)
        keys = tl.where(mask_m[:, None], _pack(pre, offs_n, n_latents), -1)
        # Skip the sort when no row of the block has a key above its current k-th best:
        # once the running top-k has seen many tiles, most tiles change nothing.
        improves = tl.max(keys, axis=1) > tl.min(best, axis=1)
        if tl.max(improves.to(tl.int32), axis=0) > 0:
            tile_top = tl.topk(keys, K_PAD)  # (BLOCK_M, K_PAD)
            both = tl.reshape(tl.join(best, tile_top), (BLOCK_M, 2 * K_PAD))
            best = tl.topk(both, K_PAD)

    values = tl.where(best >= 0, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True), -1.0)
    indices = tl.where(best >= 0, 2147483647 - (best & 2147483647), 0).to(tl.int32)
    offs_c = tl.arange(0, K_PAD)
    out = offs_m[:, None] * stride_cm + pid_s * stride_cs + offs_c[None, :]
    tl.store(cand_val_ptr + out, values, mask=mask_m[:, None])
    tl.store(cand_idx_ptr + out, indices, mask=mask_m[:, None])


def encoder_topk_candidates(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                            splits: int | None = None, block_m: int | None = None, block_n: int | None = None,
                            block_k: int | None = None,
                            num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k candidates of relu(x @ W_enc^T + b_enc).

    x (N, d_in), W_enc (d_sae, d_in), b_enc (d_sae,) -> values (N, S·K_PAD) fp32 and indices
    (N, S·K_PAD) int32, with K_PAD = next_pow2(k); every row's true top-k is among its candidates.
    Unfilled slots hold value -1.
    """
    N, d_in = x.shape
    check_encoder_inputs(x, W_enc, b_enc)
    d_sae = W_enc.shape[0]
    if not 1 <= k <= min(d_sae, MAX_K):
        raise ValueError(f"k must be in [1, min(d_sae={d_sae}, {MAX_K})], got {k}")
    if d_sae > INDEX_MAX:
        raise ValueError(f"d_sae must be < 2^31 for 32-bit indices, got {d_sae}")
    k_pad = next_pow2(k)
    g = encoder_grid(N, d_sae, x.device, block_m, block_n, block_k, num_warps, splits, min_block_n=k_pad)
    splits = g.splits
    cand_val = torch.empty(N, splits, k_pad, device=x.device, dtype=torch.float32)
    cand_idx = torch.empty(N, splits, k_pad, device=x.device, dtype=torch.int32)
    _encoder_topk_kernel[(g.row_blocks, splits)](
        x, W_enc, b_enc, cand_val, cand_idx,
        N, d_sae, d_in, g.tiles_per_split,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), cand_val.stride(0), cand_val.stride(1),
        K_PAD=k_pad, BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k,
        UPCAST=interpreting(), PRECISION=dot_precision(), num_warps=g.num_warps,
    )
    return cand_val.view(N, -1), cand_idx.view(N, -1)


def encoder_topk(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                 **blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """values (N, k) in x's dtype and indices (N, k) int64 of each row's top-k of relu(pre)."""
    cand_val, cand_idx = encoder_topk_candidates(x, W_enc, b_enc, k, **blocks)
    values, slot = torch.topk(cand_val, k, dim=1)  # merge the slices' candidates
    return values.to(x.dtype), cand_idx.gather(1, slot).long()
