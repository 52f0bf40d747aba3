"""The Matryoshka loss's fused prefix decode, forward: x_hat and every nested prefix's squared error in one
pass over the active latents (fastsae/ops/matryoshka.py has the formulas and the torch path).

    x̂_p[n]  = b + Σ_{j: idx[n, j] < m_p} v[n, j] · W[idx[n, j]]     prefixes m_0 < … < m_{P-1} = d_sae
    loss_p  = mean over rows of ||x[n] - x̂_p[n]||²                  (P,)    x_hat = x̂_{P-1}  (N, d_in)

The host sorts each row's entries by latent index (one torch.sort), so a row's entries of bucket p (those
first counted in prefix p) are the contiguous run ends[n, p-1]:ends[n, p]. Each program owns BLOCK_M rows and
one BLOCK_D slice of d_in, keeps the running reconstruction in registers and walks the buckets in order: after
bucket p its squared residual over the slice is prefix p's partial loss. Those partials go to a (P, programs)
fp32 buffer summed on the host: no atomics, the same bits on every run, and nothing per prefix but P scalars
a program. The loop over prefixes is a runtime loop (nothing is kept per prefix in registers), so one compiled
variant serves every P. Padding entries (value 0) add exactly 0 wherever they sort.

The backward stays on the torch path (ops/matryoshka.py `backward`: a walk down the buckets with suffix sums
of the prefixes' residual gradients, on embedding_bag gathers), which runs on CUDA tensors as well.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_matrix
from .sparse_decode import blocks


@triton.jit
def _prefix_decode_kernel(
    # pointers
    val_ptr, idx_ptr, ends_ptr, w_ptr, bias_ptr, x_ptr, out_ptr, part_ptr,
    # sizes
    n_rows, d_in, n_prefixes,
    # strides
    stride_vm, stride_em, stride_wl, stride_xm, stride_om,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_rows
    mask_d = offs_d < d_in
    mask = mask_m[:, None] & mask_d[None, :]
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32) + bias[None, :]
    part = part_ptr + pid_m * tl.num_programs(1) + pid_d  # this program's column of the (P, programs) buffer
    programs = tl.num_programs(0) * tl.num_programs(1)
    lo = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for p in range(0, n_prefixes):
        hi = tl.load(ends_ptr + offs_m * stride_em + p, mask=mask_m, other=0).to(tl.int32)
        # the block's rows hold different counts in bucket p: walk the longest, the others masked
        for jj in range(0, tl.max(hi - lo, axis=0)):
            j = lo + jj
            live = mask_m & (j < hi)
            v = tl.load(val_ptr + offs_m * stride_vm + j, mask=live, other=0.0).to(tl.float32)
            row = tl.load(idx_ptr + offs_m * stride_vm + j, mask=live, other=0).to(tl.int64)
            w = tl.load(w_ptr + row[:, None] * stride_wl + offs_d[None, :], mask=live[:, None] & mask_d[None, :],
                        other=0.0).to(tl.float32)
            acc += v[:, None] * w
        # x is read again at each boundary (P reads of one tile, from L2) rather than held: a second
        # (BLOCK_M, BLOCK_D) tile in registers through the walk would double them
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        res = tl.where(mask, x - acc, 0.0)
        tl.store(part + p * programs, tl.sum(tl.sum(res * res, axis=1), axis=0))
        lo = hi
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def num_warps(block_d: int) -> int:
    """4 warps; 2 for the narrowest slice (d_in <= 16), where ptxas held 4 warps to 32 registers and spilled 8 B
    on sm_80 (tests/compile_check.py)."""
    return 2 if block_d <= 16 else 4


def sort_by_latent(values: torch.Tensor, indices: torch.Tensor, widths: tuple[int, ...]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's entries sorted by latent index: values, indices (N, w) and ends (N, P) int32, ends[n, p] the
    number of row n's entries below widths[p] (so bucket p is the run ends[n, p-1]:ends[n, p])."""
    indices, order = torch.sort(indices, dim=1)
    bounds = torch.tensor(widths, dtype=indices.dtype, device=indices.device).expand(indices.shape[0], -1)
    ends = torch.searchsorted(indices, bounds.contiguous(), out_int32=True)
    return values.gather(1, order).contiguous(), indices.contiguous(), ends.contiguous()


def _check(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
           widths: tuple[int, ...]) -> None:
    check_matrix("values", values)
    if indices.shape != values.shape:
        raise ValueError(f"indices must have the shape of values {tuple(values.shape)}, got {tuple(indices.shape)}")
    check_matrix("W", W)
    check_matrix("x", x, rows=values.shape[0], cols=W.shape[1])
    if bias.shape != (W.shape[1],):
        raise ValueError(f"bias must have shape ({W.shape[1]},), got {tuple(bias.shape)}")
    if not widths or list(widths) != sorted(set(widths)) or widths[0] < 1 or widths[-1] != W.shape[0]:
        raise ValueError(f"widths must be strictly increasing in [1, d_sae={W.shape[0]}] and end with d_sae, "
                         f"got {widths!r}")


def prefix_decode(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, bias: torch.Tensor,
                  x: torch.Tensor, widths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """values, indices (N, w), W (d_sae, d_in), bias (d_in,), x (N, d_in), widths (P,) -> x_hat (N, d_in) in W's
    dtype (the whole dictionary's decode) and loss (P,) fp32, each prefix's mean over rows of ||x - x̂_p||²."""
    widths = tuple(int(m) for m in widths)
    _check(values, indices, W, bias, x, widths)
    W, x, bias = W.contiguous(), x.contiguous(), bias.contiguous()
    values, indices, ends = sort_by_latent(values, indices, widths)
    N, d_in = x.shape
    out = torch.empty(N, d_in, device=W.device, dtype=W.dtype)
    block_m, block_d = blocks(d_in)
    grid = (triton.cdiv(N, block_m), triton.cdiv(d_in, block_d))
    part = torch.zeros(len(widths), grid[0] * grid[1], device=W.device, dtype=torch.float32)
    if N:
        _prefix_decode_kernel[grid](values, indices, ends, W, bias, x, out, part, N, d_in, len(widths),
                                    values.stride(0), ends.stride(0), W.stride(0), x.stride(0), out.stride(0),
                                    BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps(block_d))
    return out, part.sum(1) / max(N, 1)
