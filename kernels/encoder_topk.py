"""Fused encoder + TopK: relu(x @ W_enc^T + b_enc), each row's top-k, without the (N, d_sae) matrix.

Each program owns BLOCK_M rows and a contiguous slice of the latents (one of
SPLITS slices). It computes the encoder GEMM one (BLOCK_M, BLOCK_N) tile at a
time. The running top-k is not held in registers (at K_PAD 256 that alone is
BLOCK_M·256·8 bytes, and the merge of the old design spilled there): each row
keeps only a threshold tau, the K_PAD-th best value seen so far, and the
epilogue appends the tile's values above tau to the row's candidate list in
global memory (a cumsum gives each its slot; no atomics). After a few tiles
tau is high and a tile appends about k/t values per row (t: tiles seen), so
this costs little next to the GEMM. When a row's list could overflow (CAP
slots), the program compacts: row chunk by row chunk (SUB_M rows, so the sort
fits in registers) it keeps each row's top-K_PAD keys and raises tau. A last
compaction leaves each row's top-K_PAD of the slice in slots [0, K_PAD); the
host takes the final top-k over SPLITS·K_PAD candidates per row.

Exactness of the filter: a value equal to tau never beats it, because the
later latent has the larger index and ties go to the smaller index.

Extra memory: N·SPLITS·CAP·8 bytes, e.g. 64 MB at N 8192, 4 slices, CAP 256,
against 2 GB for the fp32 pre-activations at d_sae 65,536.

Sort key (int64): [ fp32 bits of relu(pre) (31 bits, >= 0) | 2^31 - 1 - index ]
Non-negative floats order like their bit patterns, so keys order by value, and
among equal values the smaller index wins. 32-bit indices: d_sae may pass 65,536.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import EncoderConfig, choose, topk_capacity, topk_k_pad
from ._common import check_encoder_inputs, dot_precision, encoder_grid, interpreting
from ._gemm import encoder_tile, quarters, tile_sources

# Largest k the fused kernel takes; past it the ops layer uses the dense path.
# The compaction sorts CAP = next_pow2(K_PAD + BLOCK_N) keys per row in chunks
# of rows, so K_PAD 256 fits in registers without spilling (tests/ops/test_compile.py).
MAX_K = 256
INDEX_MAX = 2**31 - 1


@triton.jit
def _compact(key_ptr, count_ptr, tau_ptr, row0, n_rows, stride_km, stride_cm,
             K_PAD: tl.constexpr, CAP: tl.constexpr, BLOCK_M: tl.constexpr, SUB_M: tl.constexpr):
    """Each of the BLOCK_M rows from row0 (key_ptr points at row0's list): keep the top-K_PAD of its
    count_ptr[row] listed keys in slots [0, K_PAD) (-1 where there are fewer), and write the K_PAD-th
    value as its new tau."""
    offs_c = tl.arange(0, CAP)
    for r0 in range(0, BLOCK_M, SUB_M):
        local = r0 + tl.arange(0, SUB_M)  # (SUB_M,)
        rows = row0 + local
        live = rows < n_rows
        count = tl.load(count_ptr + rows * stride_cm, mask=live, other=0)
        slot = local[:, None] * stride_km + offs_c[None, :]  # (SUB_M, CAP)
        filled = live[:, None] & (offs_c[None, :] < count[:, None])
        best = tl.topk(tl.load(key_ptr + slot, mask=filled, other=-1), K_PAD)  # (SUB_M, K_PAD), descending
        tl.store(key_ptr + local[:, None] * stride_km + tl.arange(0, K_PAD)[None, :], best, mask=live[:, None])
        last = tl.min(best, axis=1)  # the K_PAD-th best key, -1 while fewer than K_PAD were seen
        tl.store(tau_ptr + rows * stride_cm, tl.where(last >= 0, _value(last), -1.0), mask=live)
        tl.store(count_ptr + rows * stride_cm, tl.minimum(count, K_PAD), mask=live)


@triton.jit
def _value(keys):
    return (keys >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _append(pre, offs_n, mask_m, tau, key_ptr, list_start, count, n_latents):
    """Append the keys of relu(pre) > tau of a (BLOCK_M, width) tile of latents offs_n to each row's list
    (key_ptr + list_start + count..); returns count + the keys appended per row."""
    pre = tl.maximum(pre, 0.0)
    hit = (pre > tau[:, None]) & (offs_n < n_latents)[None, :] & mask_m[:, None]  # (BLOCK_M, width)
    slot = (list_start + count)[:, None] + tl.cumsum(hit.to(tl.int32), axis=1) - 1
    keys = (pre.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - offs_n)[None, :].to(tl.int64)
    tl.store(key_ptr + slot, keys, mask=hit)
    return count + tl.sum(hit.to(tl.int32), axis=1)


@triton.jit
def _encoder_topk_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, key_ptr, count_ptr, tau_ptr,
    # sizes
    n_rows, n_latents, d_in, tiles_per_split,
    # strides (keys: (N, S, CAP); count/tau: (N, S))
    stride_xm, stride_xd, stride_wl, stride_wd, stride_km, stride_cm,
    # meta-parameters
    K_PAD: tl.constexpr, CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SUB_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr, QUARTERS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    # This program's lists: rows row0.., slice pid_s. One base pointer and int32 offsets: a 2-D tensor of
    # 64-bit pointers for the scattered store below costs 2 registers per element and spilled.
    key_ptr += row0.to(tl.int64) * stride_km + pid_s * CAP
    count_ptr += pid_s
    tau_ptr += pid_s
    list_start = tl.arange(0, BLOCK_M) * stride_km  # (BLOCK_M,) offset of each row's list
    count = tl.zeros((BLOCK_M,), dtype=tl.int32)  # listed keys of each row
    tau = tl.full((BLOCK_M,), -1.0, tl.float32)  # each row's K_PAD-th best so far (-1: fewer seen)

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
            count = _append(p0, n0 + tl.arange(0, Q), mask_m, tau, key_ptr, list_start, count, n_latents)
            count = _append(p1, n0 + Q + tl.arange(0, Q), mask_m, tau, key_ptr, list_start, count, n_latents)
            count = _append(p2, n0 + 2 * Q + tl.arange(0, Q), mask_m, tau, key_ptr, list_start, count, n_latents)
            count = _append(p3, n0 + 3 * Q + tl.arange(0, Q), mask_m, tau, key_ptr, list_start, count, n_latents)
        else:
            count = _append(pre, offs_n, mask_m, tau, key_ptr, list_start, count, n_latents)
        if tl.max(count, axis=0) > CAP - BLOCK_N:  # the next tile could overflow some row's list
            tl.store(count_ptr + offs_m * stride_cm, count, mask=mask_m)
            tl.debug_barrier()  # the lists and counts, written by every thread, are read by others
            _compact(key_ptr, count_ptr, tau_ptr, row0, n_rows, stride_km, stride_cm, K_PAD, CAP, BLOCK_M, SUB_M)
            tl.debug_barrier()
            count = tl.minimum(count, K_PAD)
            tau = tl.load(tau_ptr + offs_m * stride_cm, mask=mask_m, other=-1.0)

    tl.store(count_ptr + offs_m * stride_cm, count, mask=mask_m)
    tl.debug_barrier()
    _compact(key_ptr, count_ptr, tau_ptr, row0, n_rows, stride_km, stride_cm, K_PAD, CAP, BLOCK_M, SUB_M)


def encoder_topk_candidates(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                            splits: int | None = None,
                            config: EncoderConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k candidates of relu(x @ W_enc^T + b_enc).

    x (N, d_in), W_enc (d_sae, d_in), b_enc (d_sae,) -> values (N, S·K_PAD) fp32 and indices
    (N, S·K_PAD) int32, with K_PAD = topk_k_pad(k) >= k; every row's true top-k is among its candidates.
    Unfilled slots hold value -1. config pins the tiles (default: the autotuner's choice for this shape).
    """
    N, d_in = x.shape
    check_encoder_inputs(x, W_enc, b_enc)
    d_sae = W_enc.shape[0]
    if not 1 <= k <= min(d_sae, MAX_K):
        raise ValueError(f"k must be in [1, min(d_sae={d_sae}, {MAX_K})], got {k}")
    if d_sae > INDEX_MAX:
        raise ValueError(f"d_sae must be < 2^31 for 32-bit indices, got {d_sae}")
    k_pad = topk_k_pad(k)
    precision = dot_precision(x.dtype)

    def launch(c: EncoderConfig, splits: int | None = None):
        g = encoder_grid(N, d_sae, x.device, c.block_m, c.block_n, splits)
        cap = topk_capacity(k_pad, c.block_n)
        keys = torch.empty(N, g.splits, cap, device=x.device, dtype=torch.int64)  # (N, S, CAP) lists
        counts = torch.empty(N, g.splits, device=x.device, dtype=torch.int32)  # scratch: list lengths
        taus = torch.empty(N, g.splits, device=x.device, dtype=torch.float32)  # scratch: thresholds
        x_src, w_src, c = tile_sources(x, W_enc, c)
        _encoder_topk_kernel[(g.row_blocks, g.splits)](
            x_src, w_src, b_enc, keys, counts, taus,
            N, d_sae, d_in, g.tiles_per_split,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), keys.stride(0), counts.stride(0),
            **topk_constexprs(k_pad, c, precision), **c.launch_options(),
        )
        best = keys[:, :, :k_pad].reshape(N, -1)
        values = torch.where(best >= 0, (best >> 32).to(torch.int32).view(torch.float32), -1.0)
        return values, torch.where(best >= 0, INDEX_MAX - (best & INDEX_MAX), 0).to(torch.int32)

    if config is None:
        config = choose("topk", d_in, d_sae, k_pad, x.dtype, precision, x.device, launch)
    return launch(config, splits)


def topk_constexprs(k_pad: int, config: EncoderConfig, precision: str) -> dict:
    """The kernel's compile-time arguments for a K_PAD and tile config (shared with tests/ops/test_compile.py)."""
    cap = topk_capacity(k_pad, config.block_n)
    return dict(K_PAD=k_pad, CAP=cap, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                SUB_M=config.sub_m(cap), UPCAST=interpreting(), PRECISION=precision, TMA=config.tma,
                QUARTERS=config.quarters)


def encoder_topk(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                 **launch) -> tuple[torch.Tensor, torch.Tensor]:
    """values (N, k) in x's dtype and indices (N, k) int64 of each row's top-k of relu(pre)."""
    cand_val, cand_idx = encoder_topk_candidates(x, W_enc, b_enc, k, **launch)
    values, slot = torch.topk(cand_val, k, dim=1)  # merge the slices' candidates
    return values.to(x.dtype), cand_idx.gather(1, slot).long()
