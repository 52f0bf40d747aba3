"""Each kind's loss written the naive way, as SAELens and dictionary_learning write it: the dense (N, d_sae)
activations and dense decodes. bench/kinds.py times a step on it against fastsae's; the weights are an SAE's.

    pre   = (x - b_dec [SAE only]) @ W_enc^T + b_enc                 (N, d_sae)
    z     = topk / batchtopk of relu(pre) | JumpReLU(pre, θ)         (N, d_sae) dense
    x̂     = z @ W_dec + b_dec [+ x @ W_skip^T]                       (N, d_in)
    loss  = ||y - x̂||² (Matryoshka: the mean over prefixes m of ||y - z[:, :m] @ W_dec[:m] - b_dec||²)
            + l1_coefficient · JumpReLU's sparsity term (step: L0; quadratic: 2/k·(L0 − k)²; tanh)

JumpReLU and its step are SAELens's autograd Functions: the rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth ε
gives θ the straight-through gradients −(θ/ε)·K((pre − θ)/ε)·g and −(1/ε)·K((pre − θ)/ε)·g (Rajamanoharan et
al. 2024), summed over the batch's dense (N, d_sae) tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TANH_SCALE = 4.0  # SAELens's jumprelu_tanh_scale, as fastsae.losses


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(threshold / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return (pre > threshold) * grad, grad_theta, None


class Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return torch.zeros_like(pre), (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0), None


def dense_latents(cfg, pre: Tensor, threshold: Tensor | None) -> Tensor:
    """(N, d_sae) pre-activations -> the dense activations z of cfg.activation."""
    if cfg.activation == "jumprelu":
        return JumpReLU.apply(pre, threshold, cfg.jumprelu_bandwidth)
    pre = F.relu(pre)
    if cfg.activation == "topk":
        vals, idx = pre.topk(cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals)
    if cfg.activation == "batchtopk":
        vals, idx = pre.flatten().topk(cfg.k * pre.shape[0])
        return torch.zeros_like(pre).flatten().scatter(-1, idx, vals).view_as(pre)
    return pre


def sparsity(cfg, pre: Tensor, z: Tensor, threshold: Tensor | None, W_dec: Tensor) -> Tensor | float:
    """JumpReLU's sparsity term (mean over rows), 0 for the other activations."""
    if cfg.activation != "jumprelu":
        return 0.0
    if cfg.jumprelu_sparsity == "tanh":
        norms = W_dec.norm(dim=1) if cfg.decoder_norm_l1 else 1.0
        return torch.tanh(TANH_SCALE * z * norms).sum(-1).mean()
    l0 = Step.apply(pre, threshold, cfg.jumprelu_bandwidth).sum(-1)  # (N,)
    if cfg.jumprelu_sparsity == "quadratic":
        l0 = 2.0 / cfg.k * (l0 - cfg.k) ** 2
    return l0.mean()


def naive_loss(sae, x: Tensor, y: Tensor) -> Tensor:
    """The loss of sae's kind on x (N, d_in) (a transcoder's target y; an SAE's is x), dense throughout."""
    cfg = sae.cfg
    if cfg.activation == "jumprelu" and cfg.jumprelu_sparsity == "l1":
        raise ValueError("naive_loss: jumprelu_sparsity='l1' (θ frozen) has no naive form here")
    target = y if cfg.kind in ("transcoder", "skip_transcoder") else x
    x_in = x - sae.b_dec if cfg.apply_b_dec_to_input else x
    threshold = getattr(sae, "threshold", None)
    pre = x_in @ sae.W_enc.T + sae.b_enc  # (N, d_sae)
    z = dense_latents(cfg, pre, threshold)
    skip = x @ sae.W_skip.T if cfg.kind == "skip_transcoder" else 0.0
    if cfg.matryoshka_widths is None:
        x_hat = z @ sae.W_dec + sae.b_dec + skip
        rec = (x_hat - target).pow(2).sum(-1).mean()
    else:  # one dense decode per prefix (dictionary_learning's MatryoshkaBatchTopKSAE, weights 1/P)
        rec = torch.stack([(z[:, :m] @ sae.W_dec[:m] + sae.b_dec + skip - target).pow(2).sum(-1).mean()
                           for m in cfg.matryoshka_widths]).mean()
    return rec + cfg.l1_coefficient * sparsity(cfg, pre, z, threshold, sae.W_dec)
