"""The float64 dense reference: the ground truth every other backend is tested against.

Plain autograd through dense (N, d_sae) tensors: slow and memory-hungry on
purpose, so that it is obviously right. Outputs are cast back to the input's dtype.

Besides the backend contract (the encoders, decode, adam_step, resample_rows) it holds the
references of the pieces the other backends' backwards are built from: `linear` (every
encoder's GEMM), `gather_rows` and `segment_sum` (the two `_autograd.SparsePrims`), and
`decode_value_grad` (decode's gradient with respect to its values). The table in
`fastsae/ops/__init__.py` names the kernel, torch path and tests of each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .matryoshka import check_widths  # the same refusal of bad widths as every backend


def linear(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """x @ W.T + b in float64: (N, d_in), (d_out, d_in), (d_out,) -> (N, d_out) float64 (not cast back: it is the
    pre-activations the encoders select from, and ops/cpu_gemm.py's `linear` is tested against it)."""
    out = x.double() @ W.double().T
    return out if b is None else out + b.double()


def _pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    return linear(x, W_enc, b_enc)  # (N, d_sae)


def _compact(z: Tensor, dtype: torch.dtype, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Values and indices of each row's `width` largest entries (default: the batch's max L0, at least 1), the
    compact form `SparseLatents.from_dense` makes; written out here because ops sits above the modules layer."""
    if width is None:
        width = max(1, int((z > 0).sum(-1).max()) if z.numel() else 0)
    values, indices = torch.topk(z, width, dim=-1)
    return values.clamp_min(0).to(dtype), indices


def encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    z = torch.relu(_pre_activations(x, W_enc, b_enc))
    return _compact(z, x.dtype, width=k)


def encode_threshold(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor | None) -> tuple[Tensor, Tensor]:
    """ReLU when threshold is None, else JumpReLU: z = pre · 1[pre > threshold] (threshold (d_sae,), > 0)."""
    pre = _pre_activations(x, W_enc, b_enc)
    theta = torch.zeros((), dtype=pre.dtype) if threshold is None else threshold.detach().double()
    z = pre * (pre > theta)
    return _compact(z, x.dtype)


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u)


class Step(torch.autograd.Function):
    """H(pre − θ), dense: ∂/∂θ = −(1/ε)·K((pre − θ)/ε) summed over rows, nothing to pre (Rajamanoharan et al.
    2024, eq. 11; SAELens's `Step`)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        ste = _rectangle((pre - theta) / ctx.bandwidth) / ctx.bandwidth * grad
        return None, -ste.sum(0), None


class JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ), dense: ∂/∂pre = H(pre − θ), ∂/∂θ = −(θ/ε)·K((pre − θ)/ε) (SAELens's `JumpReLU`)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        ste = theta / ctx.bandwidth * _rectangle((pre - theta) / ctx.bandwidth) * grad
        return (pre > theta) * grad, -ste.sum(0), None


def encode_jumprelu(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor,
                    bandwidth: float) -> tuple[Tensor, Tensor, Tensor]:
    """The backend contract of ops/jumprelu.py, densely: the slots with pre > θ − ε/2 (the active latents and
    the halo, value 0) gathered from the dense JumpReLU above, and the window 1[|pre − θ| < ε/2] (N, w)."""
    if not bandwidth > 0:
        raise ValueError(f"bandwidth (JumpReLU's ε) must be > 0, got {bandwidth!r}")
    pre = _pre_activations(x, W_enc, b_enc)
    theta = threshold.double()
    z = JumpReLU.apply(pre, theta, bandwidth)
    keep = pre > theta.detach() - bandwidth / 2
    width = max(1, int(keep.sum(-1).max()))
    slots = torch.topk(torch.where(keep, pre.detach(), -torch.inf), width, dim=-1).indices  # (N, w)
    window = keep.gather(1, slots) & ((pre.detach() - theta.detach()).abs() < bandwidth / 2).gather(1, slots)
    return z.gather(1, slots).to(x.dtype), slots, window


def jumprelu_loss(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, threshold: Tensor, *,
                  bandwidth: float, mode: str, coefficient: float, target_l0: int | None = None,
                  tanh_scale: float = 4.0, decoder_norm: bool = True) -> Tensor:
    """The whole JumpReLU training loss in float64 through dense (N, d_sae) tensors, as SAELens's
    JumpReLUTrainingSAE computes it: mse (mean over rows of Σ_d) + coefficient · mean over rows of the
    sparsity term — step: L0 = Σ_i H(pre_i − θ_i); quadratic: 2/t·(L0 − t)², t = target_l0 (Gemma Scope 2);
    tanh: Σ_i tanh(c · z_i · ||W_dec[i]||) (Anthropic). x is the raw input (b_dec subtracted here)."""
    x, theta = x.double(), threshold.double()
    pre = _pre_activations(x - b_dec.double(), W_enc, b_enc)  # (N, d_sae)
    z = JumpReLU.apply(pre, theta, bandwidth)
    x_hat = z @ W_dec.double() + b_dec.double()
    mse = (x_hat - x).pow(2).sum(-1).mean()
    if mode == "tanh":
        norms = W_dec.double().norm(dim=1) if decoder_norm else torch.ones_like(theta)
        per_row = torch.tanh(tanh_scale * z * norms).sum(-1)
    else:
        per_row = Step.apply(pre, theta, bandwidth).sum(-1)
        if mode == "quadratic":
            per_row = 2.0 / target_l0 * (per_row - target_l0) ** 2
    return mse + coefficient * per_row.mean()


def encode_batchtopk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Active iff relu(pre) >= tau and > 0, tau the (N·k)-th largest relu(pre) in the batch."""
    z = torch.relu(_pre_activations(x, W_enc, b_enc))
    tau = torch.topk(z.detach().reshape(-1), min(k * z.shape[0], z.numel())).values[-1]
    z = z * ((z >= tau) & (z > 0))
    values, indices = _compact(z, x.dtype)
    return values, indices, tau.float()


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    z = _scatter(values, indices, W_dec.shape[0])  # (N, d_sae) float64
    return (z @ W_dec.double() + b_dec.double()).to(values.dtype)


def matryoshka_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor,
                      widths: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The Matryoshka loss's decode, naively: one dense decode per prefix of widths (the first m_p latents),
    x_hat (N, d_in) of the whole dictionary in values' dtype and loss (P,) float64, loss_p the mean over rows of
    ||x - x̂_p||²; the ops/matryoshka.py docstring has the formulas its fused version shares the work of."""
    widths = check_widths(widths, W_dec.shape[0])
    z = _scatter(values, indices, W_dec.shape[0])  # (N, d_sae)
    W, b, target = W_dec.double(), b_dec.double(), x.double()
    x_hats = [z[:, :m] @ W[:m] + b for m in widths]  # P dense (N, d_in): obviously right, not frugal
    losses = torch.stack([(target - x_hat).square().sum(1).mean() for x_hat in x_hats])
    return x_hats[-1].to(values.dtype), losses


def _scatter(coef: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """(N, d_sae) float64 with coef (N, w) added at each row's indices."""
    rows = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
    z = torch.zeros(indices.shape[0], d_sae, dtype=torch.float64, device=coef.device)
    return z.index_put_((rows, indices), coef.double(), accumulate=True)


def gather_rows(coef: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """Σ_j coef[n, j] · W[indices[n, j]]: (N, w), (N, w), (d_sae, d) -> (N, d) in coef's dtype.

    Decode without its bias, and the encoders' input gradient (coef the masked value gradient, W = W_enc):
    `SparsePrims.gather_rows`."""
    z = _scatter(coef, indices, W.shape[0])  # (N, d_sae)
    return (z @ W.double()).to(coef.dtype)


def decode_value_grad(grad: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """d loss / d values of decode, given grad = d loss / d x_hat (N, d_in): <grad[n], W_dec[indices[n, j]]>,
    (N, w) in W_dec's dtype. Densely: the gradient of the dense z, grad @ W_dec^T (N, d_sae), read at the
    indices (padding slots included: their gradient is the index's, as in every backend)."""
    return (grad.double() @ W_dec.double().T).gather(1, indices).to(W_dec.dtype)


def segment_sum(indices: Tensor, coef: Tensor, y: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """out[i] = Σ_{(n, j): indices[n, j] = i} coef[n, j] · y[n] (d_sae, d) in y's dtype, and Σ of those coef
    (d_sae,) in coef's dtype: `SparsePrims.segment_sum`, kernels/segment_reduce.py.

    The decoder's weight gradient is out with coef = values, y = grad of x_hat; the encoder's weight and bias
    gradients are out and the sums with coef = the masked value gradient, y = x. Densely: Z^T y, Z the
    (N, d_sae) matrix holding each row's coef at its indices (repeated indices add up)."""
    z = _scatter(coef, indices, d_sae)
    return (z.T @ y.double()).to(y.dtype), z.sum(0).to(coef.dtype)


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
