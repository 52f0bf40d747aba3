"""The encoder GEMM tile shared by the fused encoders, and the host side of its tensor descriptors."""

import dataclasses

import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor  # Triton >= 3.4; the GPU machine runs 3.6


@triton.jit
def encoder_tile(x_ptr, w_ptr, b_ptr, m0, offs_m, mask_m, n0, offs_n, mask_n, d_in,
                 stride_xm, stride_xd, stride_wl, stride_wd,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of x @ W^T + b for rows m0.. and latents n0..: fp32 accumulation over
    d_in, bias added once. TMA: x_ptr and w_ptr are tensor descriptors (blocks (BLOCK_M, BLOCK_K) and
    (BLOCK_N, BLOCK_K)); Hopper's copy engine fetches the tiles and zero-fills past the edges, so no masks."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        if TMA:
            a = x_ptr.load([m0, k0])  # (BLOCK_M, BLOCK_K)
            w = w_ptr.load([n0, k0]).T  # (BLOCK_K, BLOCK_N): W's rows are latents
        else:
            mask_k = (k0 + offs_k) < d_in
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xd,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_ptr + offs_n[None, :] * stride_wl + (k0 + offs_k)[:, None] * stride_wd,
                        mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # (BLOCK_K, BLOCK_N)
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]


def tma_ok(t) -> bool:
    """Whether a tensor descriptor can cover t (rows x d_in): a 16-bit dtype, unit inner stride, and base and
    row stride 16-byte aligned (the copy engine's rules; TensorDescriptor asserts them)."""
    return (t.element_size() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and t.stride(0) * t.element_size() % 16 == 0)


def tile_sources(x, W, config):
    """(x source, W source, config) for a launch: tensor descriptors when config.tma and both tensors allow it,
    else the tensors themselves and the config with tma off (the same tiles through plain loads)."""
    if not config.tma:
        return x, W, config
    if not (tma_ok(x) and tma_ok(W)):
        return x, W, dataclasses.replace(config, tma=False)
    return (TensorDescriptor.from_tensor(x, [config.block_m, config.block_k]),
            TensorDescriptor.from_tensor(W, [config.block_n, config.block_k]), config)


@triton.jit
def quarters(tile, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """tile (BLOCK_M, BLOCK_N) -> its four column quarters (BLOCK_M, BLOCK_N // 4), left to right. An epilogue
    that runs quarter by quarter holds a quarter of its int64 temporaries: with a 64 x 128 accumulator per
    warpgroup (HGMMA.64x128) the whole-tile epilogue spilled 300-680 B on sm_90, the quarters none."""
    lo, hi = tl.split(tl.permute(tl.reshape(tile, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    q0, q1 = tl.split(tl.permute(tl.reshape(lo, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
    q2, q3 = tl.split(tl.permute(tl.reshape(hi, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
    return q0, q1, q2, q3
