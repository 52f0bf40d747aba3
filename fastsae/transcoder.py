"""Transcoders and skip transcoders: what `SAE` does differently when SAEConfig.kind is not "sae".

    z = act(W_enc x + b_enc)                    x (N, d_in): the input site's activation, e.g. mlp_in.6
    ŷ = W_dec z + b_dec  [+ W_skip x]           the output site's prediction, e.g. mlp_out.6; W_skip (d_in, d_in)
    loss = ||y - ŷ||² + the sparsity terms      y: the output site's activation, `SAE.forward(x, target=y)`

The encoder and the sparse decode are the SAE's own kernels, unchanged: only the target of the reconstruction
loss is y instead of x, and a skip transcoder adds the dense term W_skip x (a plain GEMM on every backend; its
gradients are autograd's). W_skip starts at zero, as in sparsify's SparseCoder and SAELens's SkipTranscoder, so
a skip transcoder starts as the transcoder it extends. The output width equals the input's (d_in): an MLP's
input and output sites are both d_model wide. b_dec is the output's bias, never subtracted from x
(SAEConfig refuses apply_b_dec_to_input=True for these kinds).

`SAE.decode(latents)` is the dictionary's part, W_dec z + b_dec, as in sparsify and SAELens: a latent edit
decodes the same for every kind. `SAE.forward` adds the skip term; `SAE.skip(x)` gives it alone.
"""

from __future__ import annotations

import torch
from torch import Tensor


def flatten_pair(sae, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, torch.Size]:
    """x (*lead, d_in) and the reconstruction target, checked and flattened: (N, d_in) each, and lead. The
    target is x for an SAE; a transcoder's y (*lead, d_in) must have x's dtype and device, finite if x must be."""
    cfg = sae.cfg
    x2, lead = sae.flatten_input(x)
    if cfg.kind in ("sae", "crosscoder"):  # a crosscoder rebuilds its input too: its sites side by side
        if target is not None:
            raise ValueError("target: an SAE (SAEConfig.kind='sae') rebuilds its input; pass target only to a "
                             "transcoder (SAEConfig(kind='transcoder' or 'skip_transcoder'))")
        return x2, x2, lead
    if target is None:
        raise ValueError(f"target: a {cfg.kind} predicts another site: call forward(x, target=y) with y the "
                         f"output site's activation, shape (..., d_in={cfg.d_in})")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != (*lead, cfg.d_in):
        raise ValueError(f"target must have x's shape {(*lead, cfg.d_in)}, got {tuple(target.shape)}")
    if target.dtype != x2.dtype or target.device != x2.device:
        raise ValueError(f"target must have x's dtype and device ({x2.dtype}, {x2.device}), "
                         f"got {target.dtype} on {target.device}")
    if sae.check_finite and not torch.isfinite(target).all():
        raise ValueError("target contains NaN or Inf values")
    return x2, target.reshape(-1, cfg.d_in), lead


def skip_term(sae, x: Tensor) -> Tensor:
    """W_skip x for every row: x (*lead, d_in) @ W_skip.T (d_in, d_out) -> (*lead, d_out), accumulated in fp32
    by the GEMM (float64 on the reference's float64 copies)."""
    if sae.cfg.kind != "skip_transcoder":
        raise ValueError(f"skip: only a skip_transcoder has W_skip, this is a {sae.cfg.kind!r}")
    return x @ sae.cast(sae.W_skip).T


def decode_with_skip(sae, values: Tensor, indices: Tensor, x2: Tensor, y2: Tensor) -> tuple[Tensor, Tensor | None]:
    """The prediction (N, d_in) of y2 and Matryoshka's per-prefix mse (P,) or None, the skip term included.
    Every Matryoshka prefix carries the skip term: their target is y - W_skip x, through which W_skip learns."""
    if sae.cfg.kind != "skip_transcoder":
        return sae._decode_flat(values, indices, y2)
    skip = sae.skip(x2)  # (N, d_in)
    x_hat, prefix_mse = sae._decode_flat(values, indices, y2 - skip)
    return x_hat + skip, prefix_mse


@torch.no_grad()
def fold_scales_(sae, scale: float, output_scale: float | None):
    """A transcoder trained on (s·x, t·y) becomes one that takes raw x and predicts raw y, exactly:
    act(W_enc s·x + b_enc) = act((s·W_enc) x + b_enc), and ŷ/t = (W_dec/t) z + b_dec/t + (s/t · W_skip) x.
    output_scale None: t = s. An SAE's output is its input: t must be s (then SAE.fold_input_scale_ folds it)."""
    if sae.cfg.kind in ("sae", "crosscoder"):  # a crosscoder's per-site scales: crosscoder.fold_site_scales_
        if output_scale != scale:
            raise ValueError(f"output_scale: an SAE's output is its input, so it must equal scale={scale}, "
                             f"got {output_scale}")
        return sae.fold_input_scale_(scale)
    output_scale = scale if output_scale is None else output_scale
    if not (0 < output_scale < float("inf")):
        raise ValueError(f"output_scale must be finite and > 0, got {output_scale}")
    sae.W_enc.mul_(scale)
    sae.W_dec.div_(output_scale)
    sae.b_dec.div_(output_scale)
    if sae.cfg.kind == "skip_transcoder":
        sae.W_skip.mul_(scale / output_scale)
    sae.metadata["input_scale_folded"] = sae.metadata.get("input_scale_folded", 1.0) * scale
    sae.metadata["output_scale_folded"] = sae.metadata.get("output_scale_folded", 1.0) * output_scale
    return sae
