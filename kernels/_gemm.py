"""The encoder GEMM tile shared by the fused encoders."""

import triton
import triton.language as tl


@triton.jit
def encoder_tile(x_ptr, w_ptr, b_ptr, offs_m, mask_m, offs_n, mask_n, d_in,
                 stride_xm, stride_xd, stride_wl, stride_wd,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of x @ W^T + b: fp32 accumulation over d_in, bias added once."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
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
