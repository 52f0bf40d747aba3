"""Host helpers shared by the kernel launchers."""

from __future__ import annotations

import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class EncoderGrid:
    """Tiles and launch grid of a fused encoder: programs are (row block, slice of the latents)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    row_blocks: int
    splits: int
    tiles_per_split: int


def encoder_grid(n_rows: int, d_sae: int, device: torch.device, block_m: int | None = None,
                 block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                 splits: int | None = None, min_block_n: int = 16) -> EncoderGrid:
    """Small tiles in the interpreter, tensor-core sized ones on a GPU (tl.dot needs every dimension >= 16;
    the GPU defaults are a starting point for bench/ to tune, not a measured optimum). The latents are split
    into slices until there are about num_programs_target programs."""
    defaults = (16, 32, 16, 4) if interpreting() else (32, 128, 64, 8)
    block_m = block_m or defaults[0]
    block_n = max(block_n or defaults[1], min_block_n)
    n_tiles = triton.cdiv(d_sae, block_n)
    row_blocks = triton.cdiv(n_rows, block_m)
    if splits is None:
        splits = min(n_tiles, max(1, triton.cdiv(num_programs_target(device), row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return EncoderGrid(block_m, block_n, block_k or defaults[2], num_warps or defaults[3], row_blocks,
                       triton.cdiv(n_tiles, tiles_per_split), tiles_per_split)


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
