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


def adam_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, lr: float,
              beta1: float, beta2: float, eps: float, rows: bool = False) -> None:
    """Adam with bias correction in float64, in place; rows=True keeps param's rows unit-norm (the gradient's
    component along each row removed before the update, the row renormalised after it). One cast on store."""
    w, g = param.double(), grad.double()
    if rows:
        g = g - (g * w).sum(1, keepdim=True) * w
    m = exp_avg.double() + (1.0 - beta1) * (g - exp_avg.double())
    v = beta2 * exp_avg_sq.double() + (1.0 - beta2) * g * g
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    w = w - lr / bc1 * m / (v.sqrt() / bc2**0.5 + eps)
    if rows:
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    param.copy_(w)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def resample_rows(latents: Tensor, directions: Tensor, W_dec: Tensor, W_enc: Tensor | None, b_enc: Tensor,
                  encoder_scale: float, state: dict[str, Tensor] | None = None) -> None:
    """Dead latents' rows rewritten (resampling): W_dec[i] = u, W_enc[i] = encoder_scale · u (float64), b_enc[i]
    = 0, and every Adam moment of those rows 0."""
    W_dec[latents] = directions.double().to(W_dec.dtype)
    if W_enc is not None:
        W_enc[latents] = (directions.double() * encoder_scale).to(W_enc.dtype)
    b_enc[latents] = 0
    for t in (state or {}).values():
        t[latents] = 0
