"""The Matryoshka loss's fused sparse decode (Nabeshima 2024; Bussmann et al. 2025): every nested prefix's
reconstruction error in one pass over the active latents, forward and backward, on the torch path.

For prefix widths m_0 < m_1 < … < m_{P-1} = d_sae (the first m_p latents of the dictionary):

    x̂_p    = b_dec + Σ_{j: idx[n, j] < m_p} v[n, j] · W_dec[idx[n, j]]            (N, d_in)
    loss_p = mean over rows of ||x - x̂_p||²                                        (P,)

An entry (n, j) belongs to every prefix from its *bucket* b = #{p: m_p <= idx[n, j]} on. The prefixes share
the work: bucket by bucket, the rows' partial sums grow by that bucket's entries (one `F.embedding_bag` over
them, so each active latent is gathered once in all), and loss_p is read off the running sum. The backward
walks the buckets from the last, with the suffix sum of the prefixes' residual gradients

    R_b[n] = g_x̂[n] + Σ_{p >= b} c_p · (x̂_p[n] - x[n]),   c_p = 2 · g_loss[p] / N

    ∂/∂v[n, j]   = <R_b[n], W_dec[idx[n, j]]>      b the entry's bucket
    ∂/∂W_dec[i]  = Σ_{entries of latent i} v · R_b[row]   (bucket b owns rows m_{b-1}:m_b of the gradient)
    ∂/∂b_dec     = Σ_n R_0[n],    ∂/∂x = -Σ_p c_p (x̂_p - x)

and x̂_{b-1} = x̂_b minus bucket b's sum, recomputed (one more gather). Extra memory: a few (N, d_in) buffers,
never one reconstruction per prefix (P · N · d_in). The loop is over the P prefixes (a handful), not rows.
The float64 reference is `reference.matryoshka_decode`, the naive sum of per-prefix dense decodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_widths(widths, d_sae: int, name: str = "widths") -> tuple[int, ...]:
    """widths as a tuple of ints, strictly increasing, in [1, d_sae], the last d_sae; else a ValueError naming
    the argument."""
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints, got {widths!r}")
    widths = tuple(widths)
    if not widths or any(isinstance(m, bool) or not isinstance(m, int) for m in widths):
        raise ValueError(f"{name} must be a non-empty sequence of ints, got {widths!r}")
    if any(a >= b for a, b in zip(widths, widths[1:], strict=False)):
        raise ValueError(f"{name} must be strictly increasing (no duplicates), got {widths!r}")
    if widths[0] < 1 or widths[-1] != d_sae:
        raise ValueError(f"{name} must lie in [1, d_sae={d_sae}] and end with d_sae={d_sae}, got {widths!r}")
    return widths


def _acc(t: Tensor) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16, fp64 for float64 (the reference's own inputs in tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def _buckets(indices: Tensor, widths: tuple[int, ...]) -> Tensor:
    """(N, w) latent indices -> (N, w) int64 bucket, the first prefix holding each."""
    bounds = torch.tensor(widths, dtype=indices.dtype, device=indices.device)
    return torch.bucketize(indices, bounds, right=True)


def _by_bucket(values: Tensor, indices: Tensor, widths: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """The (N, w) entries grouped by bucket, row-major inside one (one sort for every prefix): latent indices
    (N·w,), values (N·w,), and bag offsets (P · N + 1,) int64, bucket b row n's entries at
    offsets[b·N + n]:offsets[b·N + n + 1]."""
    (n, w), n_buckets = indices.shape, len(widths)
    rows = torch.arange(n, device=indices.device).repeat_interleave(w)  # (N·w,) each entry's row
    key = _buckets(indices, widths).reshape(-1) * n + rows
    order = torch.argsort(key, stable=True)
    offsets = torch.zeros(n_buckets * n + 1, dtype=torch.int64, device=indices.device)
    offsets[1:] = torch.cumsum(torch.bincount(key, minlength=n_buckets * n), 0)
    return indices.reshape(-1)[order], values.reshape(-1)[order], offsets


def _bucket_sum(grouped: tuple[Tensor, Tensor, Tensor], b: int, n: int, W: Tensor) -> Tensor:
    """Σ over each row's entries in bucket b of v · W[idx]: (N, d_in) in the accumulation dtype."""
    latents, values, offsets = grouped
    bags = offsets[b * n:(b + 1) * n + 1]
    lo, hi = int(bags[0]), int(bags[-1])
    return F.embedding_bag(latents[lo:hi], W, bags - lo, mode="sum", per_sample_weights=values[lo:hi].to(W.dtype),
                           include_last_offset=True).to(_acc(W))


def forward(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor,
            widths: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """x_hat (N, d_in) of the whole dictionary in W_dec's dtype, and loss (P,) in the accumulation dtype (fp32,
    fp64 for float64), as the running partial sums."""
    grouped, n, acc = _by_bucket(values, indices, widths), x.shape[0], _acc(W_dec)
    target = x.to(acc) - b_dec.to(acc)  # (N, d_in): x - x̂_p = target - partial_p
    partial = torch.zeros_like(target)
    losses = []
    for b in range(len(widths)):
        partial += _bucket_sum(grouped, b, n, W_dec)
        losses.append((target - partial).square().sum(1).mean())
    x_hat = (partial + b_dec.to(acc)).to(W_dec.dtype)
    return x_hat, torch.stack(losses)


def _entry_dots(R: Tensor, rows: Tensor, latents: Tensor, W: Tensor) -> Tensor:
    """<R[rows[e]], W[latents[e]]> (E,): embedding_bag's per-sample-weight gradient, one dot per entry with no
    (E, d_in) gather (as row_select.rows_dot; W's rows act as the bags' gradients, R as the table)."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        W, R.contiguous(), rows, torch.zeros(W.shape[0], dtype=torch.int64, device=W.device), latents, 0, -1)


def backward(grad_x_hat: Tensor | None, grad_loss: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor,
             b_dec: Tensor, x: Tensor, x_hat: Tensor, widths: tuple[int, ...]
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_values (N, w), grad_W (d_sae, d_in), grad_b (d_in,), grad_x (N, d_in), as in the module docstring.
    Every entry gets its gradient, padding included (its index's, as decode gives)."""
    n, w = indices.shape
    grouped, acc = _by_bucket(values, indices, widths), _acc(W_dec)
    coef = grad_loss.to(acc) * (2.0 / n)  # (P,)
    cur = x_hat.to(acc)  # x̂_b, walked down from the whole dictionary (b = P-1)
    R = torch.zeros_like(cur) if grad_x_hat is None else grad_x_hat.to(acc)
    res_sum = torch.zeros_like(cur)  # Σ_{p >= b} c_p (x̂_p - x)
    # entries sorted by latent: each bucket's entries are one contiguous run, and each W row is read once
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    starts = torch.searchsorted(flat[order], torch.tensor((0,) + widths, dtype=flat.dtype, device=flat.device))
    grad_values = torch.empty(n * w, dtype=acc, device=values.device)
    grad_W = torch.zeros(W_dec.shape, dtype=acc, device=W_dec.device)
    lo = (0,) + widths
    for b in reversed(range(len(widths))):
        res_sum += coef[b] * (cur - x.to(acc))
        R_b = R + res_sum  # (N, d_in)
        entries = order[starts[b]:starts[b + 1]]  # (E_b,) flat positions, latent-major
        rows, latents = entries // w, flat[entries]
        grad_values[entries] = _entry_dots(R_b.to(W_dec.dtype), rows, latents, W_dec).to(acc)
        seg = torch.zeros(lo[b + 1] - lo[b] + 1, dtype=torch.int64, device=flat.device)
        seg[1:] = torch.cumsum(torch.bincount(latents - lo[b], minlength=lo[b + 1] - lo[b]), 0)
        grad_W[lo[b]:lo[b + 1]] = F.embedding_bag(rows, R_b, seg, mode="sum", include_last_offset=True,
                                                  per_sample_weights=values.reshape(-1)[entries].to(acc))
        if b:
            cur = cur - _bucket_sum(grouped, b, n, W_dec)
    grad_b = (R + res_sum).sum(0)
    return (grad_values.view(n, w).to(values.dtype), grad_W.to(W_dec.dtype), grad_b.to(b_dec.dtype),
            (-res_sum).to(x.dtype))


class _MatryoshkaDecode(torch.autograd.Function):
    """fused: the forward pass, this module's `forward` or the Triton kernel (triton_backend); the backward is
    this module's on any device."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor,
                widths: tuple[int, ...], fused=forward):
        x_hat, losses = fused(values, indices, W_dec, b_dec, x, widths)
        ctx.save_for_backward(values, indices, W_dec, b_dec, x, x_hat)
        ctx.widths = widths
        return x_hat, losses

    @staticmethod
    def backward(ctx, grad_x_hat: Tensor | None, grad_loss: Tensor | None):
        values, indices, W_dec, b_dec, x, x_hat = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros(len(ctx.widths), dtype=_acc(W_dec), device=x.device)
        grads = backward(grad_x_hat, grad_loss, values, indices, W_dec, b_dec, x, x_hat, ctx.widths)
        (grad_values, grad_W, grad_b, grad_x), need = grads, ctx.needs_input_grad
        return (grad_values if need[0] else None, None, grad_W if need[2] else None, grad_b if need[3] else None,
                grad_x if need[4] else None, None, None)


def matryoshka_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor,
                      widths: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """values, indices (N, w), W_dec (d_sae, d_in), b_dec (d_in,), x (N, d_in), widths (P,) -> x_hat (N, d_in)
    (the whole dictionary's decode), loss (P,) fp32 (fp64 for float64): each prefix's mean over rows of ||x - x̂_p||²."""
    widths = check_widths(widths, W_dec.shape[0])
    if x.shape != (values.shape[0], W_dec.shape[1]):
        raise ValueError(f"matryoshka_decode: x must be (N, d_in) = {(values.shape[0], W_dec.shape[1])}, "
                         f"got {tuple(x.shape)}")
    return _MatryoshkaDecode.apply(values, indices, W_dec, b_dec, x, widths)
