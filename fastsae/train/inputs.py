"""What the trainer takes from its batches, checked before anything is changed.

A bad batch must leave the caller's SAE as it was: `init_b_dec_mean_` checks the first batch (type,
width, finiteness) before it writes b_dec, so a NaN batch refused by the forward does not leave a NaN
b_dec behind.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sae import SAE


def check_batch(batch: object, step: int) -> Tensor:
    """batch as a Tensor, or a TypeError naming the batches argument and what was expected."""
    if not isinstance(batch, Tensor):
        hint = " (wrap numpy arrays with torch.from_numpy)" if type(batch).__module__ == "numpy" else ""
        raise TypeError(f"batches must yield torch.Tensor activations (..., d_in) or token ids, got "
                        f"{type(batch).__module__}.{type(batch).__name__} at step {step}{hint}")
    return batch


@torch.no_grad()
def init_b_dec_mean_(sae: SAE, batch: Tensor, rows_mean=lambda rows: rows.double().mean(0)) -> None:
    """b_dec = the batch's mean row (TrainConfig b_dec_init='mean'), in float64; the SAE is untouched
    unless the batch is a finite (..., d_in) tensor. rows_mean: (rows, d_in) -> (d_in,) float64 (the
    data-parallel trainer averages over every rank's rows)."""
    d_in = sae.cfg.d_in
    if batch.dim() < 1 or batch.shape[-1] != d_in or batch.numel() == 0:
        raise ValueError(f"b_dec_init='mean': the first batch must have shape (..., d_in={d_in}), "
                         f"got {tuple(batch.shape)}")
    mean = rows_mean(batch.reshape(-1, d_in))  # (d_in,)
    if not torch.isfinite(mean).all():
        raise ValueError("b_dec_init='mean': the first batch contains NaN or Inf values; b_dec is left as it was")
    sae.b_dec.copy_(mean.to(sae.b_dec.dtype))


def split_batch(sae: SAE, batch: object, step: int) -> tuple[Tensor, Tensor | None]:
    """(x, target): an SAE's batch is x, its target None; a transcoder's is an (x, y) pair, the input and output
    sites' activations of the same tokens (`ShuffledLoader(..., target_site=...)` serves them aligned)."""
    if sae.cfg.kind in ("sae", "crosscoder"):  # a crosscoder's batch: its sites' rows side by side
        return check_batch(batch, step), None
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"batches must yield (x, y) pairs for a {sae.cfg.kind} (the input and output sites' "
                        f"activations), got {type(batch).__name__} at step {step}")
    return check_batch(batch[0], step), check_batch(batch[1], step)


def check_transcoder_training(sae: SAE, resample_every: int, kl) -> None:
    """What a transcoder cannot train with yet: resampling (its pool holds inputs without their targets) and the
    KL term (a splice that reads one site and writes another)."""
    if sae.cfg.kind == "crosscoder" and kl is not None:
        raise ValueError("a crosscoder trains without a SpliceKL (a splice of one site; not supported yet)")
    if sae.cfg.kind not in ("sae", "crosscoder") and (resample_every or kl is not None):
        raise ValueError(f"a {sae.cfg.kind} trains without DeadLatentConfig.resample_every and without a SpliceKL "
                         f"(not supported yet: use AuxK, DeadLatentConfig.auxk_coefficient, for dead latents)")


def freeze_b_dec(sae: SAE, b_dec_init: str) -> None:
    """b_dec_init='none' (no decoder bias, Cunningham et al. 2023): b_dec must be 0 and is taken out of training
    (requires_grad False, so the optimizer never holds it), so it stays exactly 0."""
    if b_dec_init != "none":
        return
    if bool(sae.b_dec.detach().ne(0).any()):
        raise ValueError("TrainConfig.b_dec_init='none' trains without a decoder bias: the SAE's b_dec must be all "
                         "0, got a non-zero b_dec")
    sae.b_dec.requires_grad_(False)
