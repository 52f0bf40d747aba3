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


def check_matrix(name: str, t: torch.Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows or cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} must have shape ({rows}, {cols}), got {tuple(t.shape)}")
