"""Host helpers shared by the kernel launchers."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tests): kernels then upcast right after loads,
    because the interpreter's bf16/fp16 arithmetic is wrong."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_programs_target(device: torch.device) -> int:
    """About four waves of programs: enough to fill every SM with room to balance."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def dot_precision() -> str:
    """fp32 inputs use TF32 tensor cores only where PyTorch's own matmuls are allowed to."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def encoder_blocks(block_m: int | None, block_n: int | None, block_k: int | None, num_warps: int | None,
                   min_block_n: int = 16) -> tuple[int, int, int, int]:
    """Tile sizes of the fused encoders: small in the interpreter, tensor-core sized on a GPU.
    tl.dot needs every dimension >= 16. The GPU defaults are a starting point for
    bench/ to tune, not a measured optimum."""
    if interpreting():
        defaults = (16, 32, 16, 4)
    else:
        defaults = (32, 128, 64, 8)
    block_m = block_m or defaults[0]
    block_n = max(block_n or defaults[1], min_block_n)
    block_k = block_k or defaults[2]
    return block_m, block_n, block_k, num_warps or defaults[3]


def check_encoder_inputs(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> None:
    check_matrix("x", x)
    check_matrix("W_enc", W_enc, cols=x.shape[1])
    d_sae = W_enc.shape[0]
    if b_enc.shape != (d_sae,):
        raise ValueError(f"b_enc must have shape ({d_sae},), got {tuple(b_enc.shape)}")
    if W_enc.dtype != x.dtype:
        raise TypeError(f"x and W_enc must share a dtype for tl.dot, got {x.dtype} and {W_enc.dtype}")
    if not (x.device == W_enc.device == b_enc.device):
        raise ValueError(f"x, W_enc, b_enc must be on one device, got {x.device}, {W_enc.device}, {b_enc.device}")


def check_matrix(name: str, t: torch.Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows or cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} must have shape ({rows}, {cols}), got {tuple(t.shape)}")
