"""Streaming: train straight from the model's forward passes, with no store on disk.

Consecutive tokens of one window are strongly correlated, so batches are drawn
from a mixing buffer: the model fills it to `buffer_rows` vectors (from many
windows), the buffer is shuffled, batches are served until half of it is left,
and the model refills it. Every kept vector is served exactly once; memory is
bounded by the buffer. The order depends only on the seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..model import capture, keep_mask, special_token_ids


class StreamingActivations:
    def __init__(self, model: nn.Module, site: str, sequences: Tensor, batch_size: int, *, model_batch_size: int = 8,
                 buffer_rows: int = 65_536, seed: int = 0, exclude_token_ids: list[int] | None = None,
                 scale: float = 1.0, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
        if sequences.dim() != 2:
            raise ValueError(f"sequences must be (S, T) token ids, got shape {tuple(sequences.shape)}")
        if min(batch_size, model_batch_size) < 1 or buffer_rows < 2 * batch_size:
            raise ValueError(f"need batch_size, model_batch_size >= 1 and buffer_rows >= 2 * batch_size, got "
                             f"{batch_size}, {model_batch_size}, {buffer_rows}")
        self.model, self.site, self.sequences = model, site, sequences
        self.batch_size, self.model_batch_size, self.buffer_rows = batch_size, model_batch_size, buffer_rows
        self.seed, self.scale, self.dtype = seed, scale, dtype
        self.model_device = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else self.model_device
        excluded = special_token_ids(model) if exclude_token_ids is None else exclude_token_ids
        self.excluded = sorted(excluded)

    def _vectors(self) -> Iterator[Tensor]:
        for first in range(0, self.sequences.shape[0], self.model_batch_size):
            ids = self.sequences[first:first + self.model_batch_size]
            acts = capture(self.model, [self.site], input_ids=ids.to(self.model_device))[self.site]
            keep = keep_mask(ids, self.excluded)
            yield acts[keep.to(acts.device)].to(device=self.device, dtype=self.dtype)

    def __iter__(self) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        buffer: Tensor | None = None
        for rows in self._vectors():
            buffer = rows if buffer is None else torch.cat([buffer, rows])
            if buffer.shape[0] < self.buffer_rows:
                continue
            buffer = buffer[torch.randperm(buffer.shape[0], generator=gen).to(buffer.device)]
            serve = (buffer.shape[0] - self.buffer_rows // 2) // self.batch_size * self.batch_size
            for start in range(0, serve, self.batch_size):
                yield self._out(buffer[start:start + self.batch_size])
            buffer = buffer[serve:]
        if buffer is not None and buffer.shape[0]:
            buffer = buffer[torch.randperm(buffer.shape[0], generator=gen).to(buffer.device)]
            for start in range(0, buffer.shape[0], self.batch_size):
                yield self._out(buffer[start:start + self.batch_size])

    def _out(self, batch: Tensor) -> Tensor:
        return batch * self.scale if self.scale != 1.0 else batch
