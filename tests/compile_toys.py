"""Kernels that exist to make tests/ops/test_compile.py fail: the check must catch them."""

import triton
import triton.language as tl


@triton.jit
def spilling_kernel(x_ptr, out_ptr, n):
    offs = tl.arange(0, 128)
    tile = offs[:, None] * 128 + offs[None, :]
    acc = tl.zeros((128, 128), dtype=tl.float32)
    for i in range(n):
        acc += tl.load(x_ptr + i * 16384 + tile)
    tl.store(out_ptr + tile, acc)
