"""Batches from an in-memory or memory-mapped activation array, in a seeded, repeatable order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .. import io


def load_array(path: str | Path) -> np.ndarray | torch.Tensor:
    """(N, d_in) activations from .npy (memory-mapped) or .safetensors (its only tensor, or 'activations')."""
    path = Path(path)
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":  # np.load would take it for a pickle, which it refuses without saying why
            raise io.CorruptFileError(path, "not an .npy array (no NUMPY header)")
        data = io.read_npy(path)  # memory-mapped once its header is checked against the file (truncated?)
        if data.dtype.kind not in "fiu":
            raise io.CorruptFileError(path, f"expected numbers, got dtype {data.dtype}")
    elif path.suffix == ".safetensors":
        tensors = io.read_tensors(path)
        if len(tensors) != 1 and "activations" not in tensors:
            raise ValueError(f"{path}: expected one tensor or one named 'activations', got {sorted(tensors)}")
        data = tensors.get("activations", next(iter(tensors.values())))
    else:
        raise ValueError(f"{path}: expected a .npy or .safetensors file")
    if data.ndim != 2 or data.shape[0] == 0:
        raise ValueError(f"{path}: expected activations of shape (N >= 1, d_in), got {tuple(data.shape)}")
    return data


class ArrayBatches:
    """steps batches of batch_size rows, reshuffled every epoch; the same sequence on every iteration,
    so a resumed run skips exactly the batches it consumed."""

    def __init__(self, data: np.ndarray | torch.Tensor, batch_size: int, steps: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", name: str = "the array"):
        if batch_size < 1 or steps < 1:
            raise ValueError(f"batch_size and steps must be >= 1, got {batch_size}, {steps}")
        self.data, self.batch_size, self.steps, self.seed = data, batch_size, steps, seed
        self.name = name  # what errors call the array (its file)
        self.dtype, self.device = dtype, torch.device(device)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = self.data.shape[0]
        gen = torch.Generator().manual_seed(self.seed)
        order, pos = torch.randperm(n, generator=gen), 0
        for _ in range(self.steps):
            take = []
            while sum(len(t) for t in take) < self.batch_size:
                if pos == n:
                    order, pos = torch.randperm(n, generator=gen), 0
                step = min(self.batch_size - sum(len(t) for t in take), n - pos)
                take.append(order[pos:pos + step])
                pos += step
            rows = torch.cat(take).sort().values.numpy()  # sorted: sequential reads from a memmap
            batch = torch.as_tensor(np.asarray(self.data[rows]))
            if batch.is_floating_point() and not torch.isfinite(batch).all():  # name the rows, not "x"
                bad = rows[(~torch.isfinite(batch)).any(-1).numpy()]
                raise ValueError(f"{self.name}: row {bad[0]} holds NaN or Inf")
            yield batch.to(device=self.device, dtype=self.dtype)
