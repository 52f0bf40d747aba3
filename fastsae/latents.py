"""`SparseLatents`: the sparse code of a batch, as values + indices, never dense unless asked."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SparseLatents:
    """The active latents of each row.

    values:  (*lead, w) float, the latent activations (>= 0)
    indices: (*lead, w) int64, which latent each value belongs to

    TopK: w = k, every slot is a selected latent (a value may be 0 when fewer
    than k pre-activations are positive).
    ReLU / JumpReLU / BatchTopK (the compact form): w is the largest number of
    active latents of any row in the batch; shorter rows are padded with
    value 0 at index 0. A slot is active iff its value is > 0, so padding is
    inert everywhere (decode, gradients, counts). Order within a row is
    unspecified and differs between backends.
    """

    values: Tensor
    indices: Tensor
    d_sae: int

    def __post_init__(self):
        if self.values.shape != self.indices.shape:
            raise ValueError(f"SparseLatents: values {tuple(self.values.shape)} and indices "
                             f"{tuple(self.indices.shape)} must have the same shape")

    @property
    def width(self) -> int:
        return self.values.shape[-1]

    @property
    def active(self) -> Tensor:
        """(*lead, w) bool: which slots hold an active latent."""
        return self.values > 0

    @property
    def l0(self) -> Tensor:
        """(*lead,) number of active latents per row."""
        return self.active.sum(-1)

    def fire_counts(self) -> Tensor:
        """(d_sae,) int64: on how many rows each latent is active. Indices outside [0, d_sae) are refused
        (bincount finds them anyway: no extra pass)."""
        try:
            counts = torch.bincount(self.indices[self.active], minlength=self.d_sae)
        except RuntimeError as err:  # a negative index
            raise ValueError(f"fire_counts: latent indices must be in [0, d_sae={self.d_sae}) ({err})") from None
        if counts.shape[0] != self.d_sae:
            raise ValueError(f"fire_counts: latent indices must be in [0, d_sae={self.d_sae}), "
                             f"got one of {counts.shape[0] - 1}")
        return counts

    def to_dense(self) -> Tensor:
        """(*lead, d_sae) dense activations. Costs N·d_sae memory: for analysis, not training."""
        out = self.values.new_zeros(*self.values.shape[:-1], self.d_sae)
        return out.scatter_add_(-1, self.indices, self.values)

    def reshape(self, *lead: int) -> SparseLatents:
        w = self.width
        return SparseLatents(self.values.reshape(*lead, w), self.indices.reshape(*lead, w), self.d_sae)

    def detach(self) -> SparseLatents:
        return SparseLatents(self.values.detach(), self.indices, self.d_sae)

    @classmethod
    def from_dense(cls, z: Tensor, width: int | None = None) -> SparseLatents:
        """Compact form of a dense (*lead, d_sae) activation tensor (differentiable in z); width defaults
        to the max L0, at least 1 so that an all-zero batch still decodes (to b_dec)."""
        if width is None:
            width = max(1, int((z > 0).sum(-1).max()) if z.numel() else 0)
        values, indices = torch.topk(z, width, dim=-1)
        return cls(values.clamp_min(0), indices, z.shape[-1])


def nonzero_entries(z: Tensor) -> tuple[Tensor, Tensor]:
    """Dense (*lead, d_sae) → values, indices (*lead, w) holding every non-zero entry, signs kept;
    w = the largest count of a row, at least 1. Shorter rows are padded with some of their zero
    entries, which decode to nothing."""
    width = max(1, int((z != 0).sum(-1).max())) if z.numel() else 1
    indices = z.abs().topk(width, dim=-1).indices
    return z.gather(-1, indices), indices
