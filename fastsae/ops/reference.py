"""The float64 dense reference: the ground truth every other backend is tested against.

Plain autograd through dense (N, d_sae) tensors: slow and memory-hungry on
purpose, so that it is obviously right. Outputs are cast back to the input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..latents import SparseLatents


def _pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    return x.double() @ W_enc.double().T + b_enc.double()  # (N, d_sae)


def _compact(z: Tensor, dtype: torch.dtype, width: int | None = None) -> tuple[Tensor, Tensor]:
    lat = SparseLatents.from_dense(z, width)
    return lat.values.to(dtype), lat.indices


def encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    z = torch.relu(_pre_activations(x, W_enc, b_enc))
    return _compact(z, x.dtype, width=k)


def encode_threshold(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor | None) -> tuple[Tensor, Tensor]:
    """ReLU when threshold is None, else JumpReLU: z = pre · 1[pre > threshold] (threshold (d_sae,), > 0)."""
    pre = _pre_activations(x, W_enc, b_enc)
    theta = torch.zeros((), dtype=pre.dtype) if threshold is None else threshold.detach().double()
    z = pre * (pre > theta)
    return _compact(z, x.dtype)


def encode_batchtopk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Active iff relu(pre) >= tau and > 0, tau the (N·k)-th largest relu(pre) in the batch."""
    z = torch.relu(_pre_activations(x, W_enc, b_enc))
    tau = torch.topk(z.detach().reshape(-1), min(k * z.shape[0], z.numel())).values[-1]
    z = z * ((z >= tau) & (z > 0))
    values, indices = _compact(z, x.dtype)
    return values, indices, tau.float()


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    z = SparseLatents(values.double(), indices, W_dec.shape[0]).to_dense()  # (N, d_sae)
    return (z @ W_dec.double() + b_dec.double()).to(values.dtype)
