"""Scratch memory a caller keeps from one call to the next: the torch backend's dense pre-activations.

The torch backend's encoders build the (N, d_sae) pre-activations, read them once (top-k or threshold)
and drop them. Allocated fresh, that buffer costs its page faults and its release every time: at N 2048,
d_sae 16384 (134 MB) on 2 CPU cores, keeping it took the median training step from 405 to 383 ms in a process
of its own (7 ms in another such run), and from 396 to 381 ms in a process that other large allocations had
fragmented (bench/cpu_step.py's "fresh pre-activations" row, bench/results/cpu-step-2026-11-21*.md), with
transparent huge pages on. A `Workspace` keeps
it: the trainer owns one and makes it the active workspace around each step (`with workspace.active():`), so
the memory lives as long as the trainer and no longer; outside an active workspace every call allocates as
before.

A buffer handed out by `scratch` is only used inside one backend call (the selections copy what they
keep out of it), so one buffer per (dtype, device) serves every call of a step, AuxK's included.
The active workspace is a context variable: each thread (and asyncio task) sees its own.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar

import torch

_ACTIVE: ContextVar[Workspace | None] = ContextVar("fastsae_workspace", default=None)


class Workspace:
    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of shape, reusing this workspace's buffer when it is large enough."""
        numel = math.prod(shape)
        key = (dtype, torch.device(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)  # free the smaller one before allocating the larger
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    @contextlib.contextmanager
    def active(self):
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty(shape), from the active workspace's memory when there is one."""
    workspace = _ACTIVE.get()
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.take(shape, dtype, device)
