"""Latent-sharded forms of the terms beyond the plain encode and decode (those are ops/distributed.py): JumpReLU's
encoder with θ trained and the Matryoshka prefix losses. The sparsity terms' sharded form is
train/sharded.py's `sparsity_terms` (it builds on fastsae.losses, a layer above the ops).

Each rank computes on its own latents; the collectives join the partial sums over latents before any
non-linear function of them is taken, so every rank holds the single-process value:

  encode_jumprelu  the backend's encoder over this rank's slice with θ's straight-through estimator
                   (ops/jumprelu.py). θ is per latent: each rank holds its slice and θ's gradient is a sum
                   over that latent's slots, all local. The window and the indices the STE saved are this
                   rank's (local), the indices returned global.
  sparsity_terms   (in train/sharded.py) L1, the step's L0 and tanh are sums over latents of each row: each
                   rank's mean over rows, summed over the group (`sum_shards`, whose backward hands each rank
                   the common gradient).
                   quadratic-L0, 2/k·(L0 − k)², squares each row's *total* L0: the per-row counts (N,) are
                   summed over the group first, then squared.
  decode_prefixes  the prefixes are over global latent indices: each rank decodes its own entries bucket by
                   bucket (bucket b: the latents in [m_{b-1}, m_b)), one all-reduce adds every rank's
                   (P, N, d_in) bucket sums, and their running sums are the prefixes' reconstructions. The
                   backward is autograd's through the backend's decode, with `sum_shards`'s identity backward.

Their reference is the single-process SAE (tests/train/test_sharded_kinds.py checks loss, every gradient and
an optimizer step against it on two gloo ranks).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backend_for
from .distributed import LatentShard, sum_shards


def encode_jumprelu(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, bandwidth: float,
                    shard: LatentShard) -> tuple[Tensor, Tensor, Tensor]:
    """JumpReLU with θ trained over this rank's latents: x_c (N, d_in) centred and `replicate`d, W_enc (n, d_in),
    b_enc (n,), threshold (n,) this rank's rows → values (N, w) (active and halo slots, ThresholdSTE attached),
    global indices (N, w), window (N, w) bool."""
    values, local, window = backend_for(x_c.device).encode_jumprelu(x_c, W_enc, b_enc, threshold, bandwidth)
    return values, local + shard.start, window


def decode_prefixes(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, target: Tensor,
                    widths: tuple[int, ...], shard: LatentShard) -> tuple[Tensor, Tensor]:
    """The Matryoshka decode, latent-sharded: values, indices (N, w) with global indices (other ranks' entries
    are skipped), W_dec (n, d_in) this rank's rows, b_dec (d_in,), target (N, d_in), widths (P,) global prefix
    widths → x_hat (N, d_in) in values' dtype, each prefix's mse of target (P,) in the accumulation dtype.

    Memory: P partial reconstructions (P, N, d_in) in fp32 per rank and in the all-reduce, P times the plain
    sharded decode's; the single-process fused pass (ops/matryoshka.py) keeps none, but its running sum crosses
    the ranks' latent ranges, so sharded it would need one collective per prefix. P is a handful."""
    if shard.group is None:  # every latent is here: the single-device fused pass
        x_hat, losses = backend_for(values.device).matryoshka_decode(values, indices - shard.start, W_dec, b_dec,
                                                                     target, widths)
        return x_hat.to(values.dtype), losses
    ops = backend_for(values.device)
    acc = torch.promote_types(values.dtype, torch.float32)
    start = shard.start
    own = (indices >= start) & (indices < start + W_dec.shape[0])
    local = torch.where(own, indices - start, torch.zeros_like(indices))
    bucket = torch.bucketize(indices, torch.tensor(widths, dtype=indices.dtype, device=indices.device), right=True)
    no_bias = torch.zeros(W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
    parts = torch.stack([ops.decode(values * (own & (bucket == b)), local, W_dec, no_bias).to(acc)
                         for b in range(len(widths))])  # (P, N, d_in): this rank's entries of each bucket
    prefix = sum_shards(parts, shard.group).cumsum(0)  # x̂_p − b_dec, every rank's latents below m_p
    losses = (target.to(acc) - b_dec.to(acc) - prefix).square().sum(-1).mean(-1)  # (P,)
    return (prefix[-1] + b_dec.to(acc)).to(values.dtype), losses
