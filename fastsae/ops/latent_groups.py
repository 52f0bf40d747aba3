"""Sparse entries grouped by latent, deterministically (a stable sort, no atomics): the segment sums of the
torch path's sparse backwards (torch_backend.segment_rows_sum) and of JumpReLU's threshold gradient
(ops/jumprelu.py), both of which import it from here."""

from __future__ import annotations

import torch
from torch import Tensor


def latent_segments(indices: Tensor, coef: Tensor, num_segments: int) -> tuple[Tensor, Tensor, Tensor]:
    """The entries of (N, w) indices with coef != 0, grouped by latent, as embedding_bag bags.

    Returns rows (E,) int64 (the batch row of each entry, latent-major, batch order within a latent),
    their coefficients (E,), and offsets (num_segments + 1,) int64 (latent i's entries are
    offsets[i]:offsets[i + 1]). Padding and latents that did not fire (coef 0) are dropped.
    """
    w = indices.shape[1]
    flat_coef = coef.reshape(-1)
    keep = (flat_coef != 0).nonzero().squeeze(1)
    seg = indices.reshape(-1)[keep]
    order = torch.argsort(seg, stable=True)  # one contiguous run per latent, batch order inside it
    offsets = torch.zeros(num_segments + 1, dtype=torch.int64, device=indices.device)
    offsets[1:] = torch.cumsum(torch.bincount(seg, minlength=num_segments), 0)
    return keep[order] // w, flat_coef[keep][order], offsets
