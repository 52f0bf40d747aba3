"""Crosscoders (acausal; Lindsey et al. 2024, "Sparse Crosscoders"): what `SAE` does differently when
SAEConfig.kind is "crosscoder".

One dictionary reads L = cfg.n_sites sites' activations of the same tokens (e.g. resid_post.3, .6, .9), each d
wide, and writes each of them back:

    z    = act(Σ_l W_enc^l (x_l - b_dec^l) + b_enc)          W_enc^l (d_sae, d): site l's encoder
    x̂_l  = W_dec^l z + b_dec^l                               W_dec^l (d_sae, d): site l's decoder
    loss = Σ_l ||x_l - x̂_l||² + λ Σ_i z_i Σ_l ||W_dec^l[i]||   (Anthropic's crosscoder loss)

This is an SAE on the concatenation x = [x_1 | ... | x_L] (d_in = L·d): Σ_l W_enc^l x_l = W_enc x with W_enc
(d_sae, L·d) the per-site encoders side by side, and W_dec (d_sae, L·d) holds the per-site decoders the same way.
So the encoder, the sparse decode, AuxK and Matryoshka are the SAE's own kernels, unchanged, and the mse (summed
over d_in) is already Σ_l. What differs is the sparsity weight: `fastsae.losses.decoder_norms` sums the per-site
norms instead of taking the whole row's.

The decoder constraint (normalize_decoder=True) keeps the whole row W_dec[i] unit-norm, as for an SAE, not
Σ_l ||W_dec^l[i]|| = 1. Anthropic trains crosscoders unconstrained: z_i and W_dec[i] trade scale freely (z_i·c with
W_dec[i]/c leaves both the reconstruction and z_i·Σ_l||W_dec^l[i]|| unchanged, the encoder row and bias absorbing c),
so fixing any one positive-homogeneous norm of the row picks one point of each such orbit and changes neither the
loss's values nor its minima. The whole-row norm is the one SAEAdam's fused step already keeps (inside the kernel);
under it a latent spread evenly over L sites still pays √L times one confined to a single site, the penalty's point.
normalize_decoder=False trains as Anthropic did.

Data: `ShuffledLoader(store, sites[0], ..., sites=sites)` serves the sites' rows side by side, each scaled by its own
norm_scale so layers of different norms weigh alike; `fold_site_scales_` folds those scales into the weights so
the saved crosscoder takes raw activations. Splicing: fastsae.model.splice_crosscoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .losses import variance_unexplained


def site_width(cfg) -> int:
    """d, the width of each of a crosscoder's sites (d_in // n_sites)."""
    return cfg.d_in // cfg.n_sites


def split_sites(cfg, x: Tensor) -> tuple[Tensor, ...]:
    """(..., d_in) -> n_sites views (..., d), site l's block of the concatenation."""
    if x.shape[-1] != cfg.d_in:
        raise ValueError(f"x must have shape (..., d_in={cfg.d_in}), got {tuple(x.shape)}")
    return x.split(site_width(cfg), dim=-1)


@torch.no_grad()
def site_fit(cfg, x: Tensor, x_hat: Tensor) -> dict[str, list[float]]:
    """Per site l: "mse" (mean over rows of Σ_d (x_l - x̂_l)²) and "fvu" (Σ||x_l - x̂_l||² / Σ||x_l - mean(x_l)||²),
    in float64, from x, x_hat (..., d_in) of a crosscoder. Their mse sum is the crosscoder's mse."""
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat must have x's shape {tuple(x.shape)}, got {tuple(x_hat.shape)}")
    out: dict[str, list[float]] = {"mse": [], "fvu": []}
    for xl, xl_hat in zip(split_sites(cfg, x), split_sites(cfg, x_hat), strict=True):
        xl, xl_hat = xl.reshape(-1, xl.shape[-1]).double(), xl_hat.reshape(-1, xl.shape[-1]).double()
        sq_resid, n = float((xl - xl_hat).square().sum()), xl.shape[0]
        out["mse"].append(sq_resid / n)
        out["fvu"].append(variance_unexplained(sq_resid, float(xl.square().sum()), xl.sum(0), n))
    return out


def check_scales(cfg, scales: Sequence[float]) -> tuple[float, ...]:
    """scales as a tuple of n_sites finite floats > 0, or a ValueError naming the argument."""
    scales = tuple(scales)
    if len(scales) != cfg.n_sites or not all(isinstance(s, (int, float)) and 0 < s < math.inf for s in scales):
        raise ValueError(f"scales must be {cfg.n_sites} finite numbers > 0 (one per site), got {list(scales)}")
    return tuple(float(s) for s in scales)


@torch.no_grad()
def fold_site_scales_(sae, scales: Sequence[float]):
    """A crosscoder trained on sites scaled by s_l (x_l' = s_l·x_l) becomes one that takes and rebuilds raw
    activations, exactly: W_enc^l (s_l x_l - b_dec^l) = (s_l W_enc^l)(x_l - b_dec^l/s_l), and x̂_l = x̂_l'/s_l =
    (W_dec^l/s_l) z + b_dec^l/s_l. Latent values are unchanged. Column blocks of every latent row: a ShardedSAE
    folds its own rows (and its whole b_dec) the same way. Returns sae."""
    cfg = sae.cfg
    if cfg.kind != "crosscoder":
        raise ValueError(f"fold_site_scales_: per-site scales are a crosscoder's, this is a {cfg.kind!r}")
    if cfg.tied:
        raise ValueError("fold_site_scales_: a tied crosscoder cannot scale its encoder and decoder apart")
    scales = check_scales(cfg, scales)
    d = site_width(cfg)
    for site, s in enumerate(scales):
        block = slice(site * d, (site + 1) * d)
        sae.W_enc[:, block].mul_(s)
        sae.W_dec[:, block].div_(s)
        sae.b_dec[block].div_(s)
    folded = sae.metadata.get("site_scales_folded", [1.0] * cfg.n_sites)
    sae.metadata["site_scales_folded"] = [a * b for a, b in zip(folded, scales, strict=True)]
    return sae
