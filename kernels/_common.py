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


# fp32 encoders on a GPU multiply in TF32 by default (10-bit mantissa products, fp32 accumulation: about
# 1e-3 relative error on a pre-activation, against 8x the tensor-core throughput of exact fp32 FMAs on an
# H100). FASTSAE_FP32_MATMUL=ieee, or set_fp32_matmul("ieee"), asks for exact fp32.
FP32_MATMUL_ENV = "FASTSAE_FP32_MATMUL"
FP32_MATMUL_MODES = ("tf32", "ieee")
_fp32_matmul: str | None = None


def set_fp32_matmul(mode: str | None) -> None:
    """"tf32" (default) or "ieee" for the fp32 encoder GEMMs of the Triton backend; None: back to the default."""
    global _fp32_matmul
    if mode is not None and mode not in FP32_MATMUL_MODES:
        raise ValueError(f"fp32 matmul mode must be one of {FP32_MATMUL_MODES}, got {mode!r}")
    _fp32_matmul = mode


def fp32_matmul() -> str:
    """The mode in force: set_fp32_matmul(), else $FASTSAE_FP32_MATMUL, else "tf32"."""
    if _fp32_matmul is not None:
        return _fp32_matmul
    mode = os.environ.get(FP32_MATMUL_ENV, "tf32")
    if mode not in FP32_MATMUL_MODES:
        raise ValueError(f"${FP32_MATMUL_ENV} must be one of {FP32_MATMUL_MODES}, got {mode!r}")
    return mode


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of this dtype (16-bit inputs ignore it: "ieee")."""
    return fp32_matmul() if dtype == torch.float32 else "ieee"


@dataclass(frozen=True)
class EncoderGrid:
    """Launch grid of a fused encoder: programs are (row block, slice of the latents)."""

    row_blocks: int
    splits: int
    tiles_per_split: int


def encoder_grid(n_rows: int, d_sae: int, device: torch.device, block_m: int, block_n: int,
                 splits: int | None = None) -> EncoderGrid:
    """The latents are split into contiguous slices until there are about num_programs_target programs."""
    n_tiles = triton.cdiv(d_sae, block_n)
    row_blocks = triton.cdiv(n_rows, block_m)
    if splits is None:
        splits = min(n_tiles, max(1, triton.cdiv(num_programs_target(device), row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, min(max(1, splits), n_tiles))
    return EncoderGrid(row_blocks, triton.cdiv(n_tiles, tiles_per_split), tiles_per_split)


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
