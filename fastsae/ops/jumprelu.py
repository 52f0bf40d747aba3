"""JumpReLU trained through its threshold θ: the straight-through estimators of Rajamanoharan et al. 2024
("Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU SAEs"), with no (N, d_sae) tensor.

    z_i = pre_i · H(pre_i − θ_i)
    ∂z_i/∂pre_i          = H(pre_i − θ_i)                        SparseEncode's mask (value > 0)
    ∂z_i/∂θ_i            = −(θ_i/ε) · K((pre_i − θ_i)/ε)         K(u) = 1[|u| < 1/2], ε the bandwidth
    ∂H(pre_i − θ_i)/∂θ_i = −(1/ε) · K((pre_i − θ_i)/ε)           the L0 term's step

Only entries within ε/2 of θ have a θ gradient. Those below θ (z = 0) are not in the sparse output, yet
the loss's gradient with respect to their z is not zero: <∂L/∂x_hat, W_dec[i]>, plus the sparsity term's
slope at 0 (tanh's). So the encoder keeps them: it selects pre > θ − ε/2 (the fused threshold encoder
with its threshold lowered by ε/2), returns the entries in (θ − ε/2, θ] as slots of value 0 (the *halo*)
beside the active ones, and a bool `window` (N, w) marking the slots within ε/2 of θ. Every function of
(values, indices) — decode, L1, tanh — then gives the exact ∂L/∂z at each slot that has a θ gradient, and

    ∂L/∂θ_i = −(θ_i/ε) · Σ_{window slots (n, j) of latent i} ∂L/∂z[n, j]     (ThresholdSTE)
            − (1/ε)    · Σ_{window slots (n, j) of latent i} ∂L/∂l0[n]        (StepL0)

are sums over the N·w slots: memory O(N·(active + halo)), and exact, the dense estimator's sum term for
term (in another order). The halo is ~ε·density(θ) of a row: with ε 1e-3 and unit-scale pre-activations,
~0.04% of d_sae. Halo slots pass no gradient to pre (the step has none there), which SparseEncode's
value > 0 mask already gives. The per-latent sums are `torch_backend.segment_rows_sum`: sorted by
latent, no atomics, the same bits on every run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .latent_groups import latent_segments


def check_bandwidth(bandwidth: float) -> None:
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not 0 < bandwidth < float("inf"):
        raise ValueError(f"bandwidth (JumpReLU's ε) must be a finite float > 0, got {bandwidth!r}")


def split_window(pre: Tensor, indices: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor, Tensor]:
    """Slots selected with pre > θ − ε/2 (padding: pre −inf, or 0 when θ − ε/2 >= 0) → values pre·1[pre > θ]
    (the halo 0), indices, window 1[|pre − θ| < ε/2] (N, w) bool."""
    check_bandwidth(bandwidth)
    theta = threshold.detach().to(torch.promote_types(pre.dtype, torch.float32))[indices]  # (N, w)
    p = pre.to(theta.dtype)
    window = (p > theta - bandwidth / 2) & (p < theta + bandwidth / 2)
    values = torch.where(p > theta, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
    return values, indices, window


def _latent_sums(indices: Tensor, coef: Tensor, d_sae: int) -> Tensor:
    """Σ_{(n, j): indices[n, j] = i} coef[n, j] → (d_sae,) fp32 (fp64 for fp64 coef), in latent-sorted order."""
    if coef.dtype == torch.float64:
        return torch.zeros(d_sae, dtype=torch.float64, device=coef.device).index_add_(
            0, indices.reshape(-1), coef.reshape(-1))
    rows, c, offsets = latent_segments(indices, coef.float(), d_sae)
    if c.numel() == 0:
        return torch.zeros(d_sae, dtype=torch.float32, device=coef.device)
    # one bag per latent over its entries: the segment sum of c
    return torch.nn.functional.embedding_bag(torch.arange(c.numel(), device=c.device), c[:, None], offsets,
                                             mode="sum", include_last_offset=True)[:, 0]


class ThresholdSTE(torch.autograd.Function):
    """values (N, w) → the same values; the backward adds θ's reconstruction gradient −(θ_i/ε)·Σ_window ∂L/∂z."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, window: Tensor, threshold: Tensor, bandwidth: float):
        ctx.save_for_backward(indices, window, threshold)
        ctx.bandwidth = bandwidth
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        indices, window, threshold = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[3]:
            sums = _latent_sums(indices, grad * window, threshold.shape[0])
            grad_theta = (-threshold.detach().to(sums.dtype) / ctx.bandwidth * sums).to(threshold.dtype)
        return grad, None, None, grad_theta, None


class StepL0(torch.autograd.Function):
    """Each row's count of active slots (N,) (values > 0), with the step's STE to θ: ∂l0[n]/∂θ_i =
    −(1/ε)·(row n's window slots of latent i). No gradient to the values (H has none off its step)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, window: Tensor, threshold: Tensor, bandwidth: float):
        ctx.save_for_backward(indices, window, threshold)
        ctx.bandwidth = bandwidth
        return (values > 0).sum(-1).to(torch.promote_types(values.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad: Tensor):
        indices, window, threshold = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[3]:
            sums = _latent_sums(indices, grad[:, None] * window, threshold.shape[0])
            grad_theta = (-sums / ctx.bandwidth).to(threshold.dtype)
        return None, None, None, grad_theta, None


def attach_threshold(values: Tensor, indices: Tensor, window: Tensor, threshold: Tensor,
                     bandwidth: float) -> Tensor:
    """values with θ's reconstruction STE attached (ThresholdSTE), when θ asks for a gradient."""
    if not (threshold.requires_grad and torch.is_grad_enabled()):
        return values
    return ThresholdSTE.apply(values, indices, window, threshold, bandwidth)
