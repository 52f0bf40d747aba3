"""Sparse weight gradients as a deterministic segment reduction over latents.

    out[i]     = Σ_{(n, j): idx[n, j] = i} c[n, j] · y[n]      (d_sae, d_in)
    out_sum[i] = Σ_{(n, j): idx[n, j] = i} c[n, j]             (d_sae,)   optional

With c = values and y = grad_x_hat this is the decoder's weight gradient; with
c = the masked value gradient and y = x, the encoder's weight (and bias)
gradient. The host sorts the (row, slot) entries by latent (a stable sort), so
every latent owns one contiguous segment; one program per (latent, d_in block)
sums its segment in order and writes its row, zeros for latents that did not
fire. No floating-point atomics: two runs give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_matrix, interpreting


@triton.jit
def _segment_reduce_kernel(
    # pointers
    seg_start_ptr, rows_ptr, coef_ptr, y_ptr, out_ptr, out_sum_ptr,
    # sizes
    d_in,
    # strides
    stride_ym, stride_ol,
    # meta-parameters
    HAS_SUM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    latent = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d_in
    start = tl.load(seg_start_ptr + latent)
    end = tl.load(seg_start_ptr + latent + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    total = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        rows = tl.load(rows_ptr + offs_e, mask=mask_e, other=0)
        c = tl.load(coef_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_ym + offs_d[None, :],
                    mask=mask_e[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(c[:, None] * y, axis=0)
        total += c
    tl.store(out_ptr + latent * stride_ol + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)
    if HAS_SUM:
        if pid_d == 0:
            tl.store(out_sum_ptr + latent, tl.sum(total, axis=0))


def blocks(d_in: int) -> tuple[int, int]:
    """(BLOCK_E entries, BLOCK_D columns): a 128-wide slice of d_in, narrower (>= 16) only when d_in is."""
    return 16 if interpreting() else 32, max(16, min(128, triton.next_power_of_2(d_in)))


def segment_reduce(indices: torch.Tensor, coef: torch.Tensor, y: torch.Tensor, n_latents: int,
                   out_dtype: torch.dtype | None = None, with_sum: bool = False):
    """indices, coef (N, w); y (N, d_in) -> out (n_latents, d_in) [, out_sum (n_latents,) fp32].

    Entries with coef 0 (padding, latents that did not fire) are sent to a spare
    segment past the last latent, which no program reads.
    """
    check_matrix("indices", indices)
    if coef.shape != indices.shape:
        raise ValueError(f"coef must have the shape of indices {tuple(indices.shape)}, got {tuple(coef.shape)}")
    check_matrix("y", y, rows=indices.shape[0])
    y = y.contiguous()
    width = indices.shape[1]
    flat_coef = coef.reshape(-1)
    seg = torch.where(flat_coef != 0, indices.reshape(-1), n_latents)
    order = torch.sort(seg, stable=True).indices
    seg_start = torch.zeros(n_latents + 2, device=y.device, dtype=torch.int64)
    seg_start[1:] = torch.cumsum(torch.bincount(seg, minlength=n_latents + 1), 0)
    rows = (order // width).contiguous()
    sorted_coef = flat_coef[order].float().contiguous()
    d_in = y.shape[1]
    out = torch.empty(n_latents, d_in, device=y.device, dtype=out_dtype or y.dtype)
    out_sum = torch.empty(n_latents, device=y.device, dtype=torch.float32) if with_sum else out
    block_e, block_d = blocks(d_in)
    _segment_reduce_kernel[(n_latents, triton.cdiv(d_in, block_d))](
        seg_start, rows, sorted_coef, y, out, out_sum, d_in, y.stride(0), out.stride(0),
        HAS_SUM=with_sum, BLOCK_E=block_e, BLOCK_D=block_d,
    )
    return (out, out_sum) if with_sum else out
