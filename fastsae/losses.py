"""The loss an SAE trains on, and the measures of fit training and evaluation share: each written once, here.

    loss = mse + l1_coefficient · (l1 or l0) + auxk_coefficient · auxk + kl_coefficient · kl
    mse  = mean over rows of Σ_d (x - x_hat)²
           Matryoshka SAEs train on the mean over their P nested prefixes of each prefix's mse instead
           (`prefix_mse`, ops/matryoshka.py; the mean, as dictionary_learning's default weights 1/P, so that
           P = 1 is the plain loss and the coefficients keep their scale); mse stays the whole dictionary's
    l1   = mean over rows of Σ_i z_i · w_i, w_i = ||W_dec[i]|| (Anthropic, April 2024) or 1     relu/jumprelu
           (a crosscoder's w_i = Σ_l ||W_dec^l[i]||, the sum of its per-site norms: `decoder_norms`)
    l0   = JumpReLU's sparsity term, mean over rows of: L0 (step) | 2/t·(L0 − t)² (quadratic) |          jumprelu
           Σ_i tanh(c·z_i·w_i) (tanh); θ's gradients are the straight-through estimators of fastsae/ops/jumprelu.py
    auxk = mse of the top k_aux dead latents' reconstruction of the residual x - x_hat            topk/batchtopk
           (Gao et al. 2024; `SAE` computes it, it needs the encoder)
    kl   = mean over positions of KL(p_clean || p_spliced), the model's next-token distributions
    fvu  = Σ||x - x_hat||² / Σ||x - mean(x)||²  (fraction of variance unexplained; 1 - explained variance)

`SAE.forward`, `SAEEnsemble` and the trainers all build their loss with `loss_terms`, so
`SAEOutput.loss` is the loss that is trained (the trainer passes its warmed-up coefficients).
Sums accumulate in fp32 (fp64 for float64 inputs, as the reference backend uses).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import SAEConfig
from .ops.jumprelu import StepL0

TANH_SCALE = 4.0  # c of the tanh sparsity term: SAELens's jumprelu_tanh_scale default


@dataclass(frozen=True)
class LossCoefficients:
    l1: float = 0.0
    auxk: float = 0.0
    kl: float = 0.0

    def __post_init__(self):
        for name in ("l1", "auxk", "kl"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < math.inf):
                raise ValueError(f"LossCoefficients.{name} must be finite and >= 0, got {value!r}")


@dataclass
class LossTerms:
    mse: Tensor  # scalar
    l1: Tensor | None  # scalar (relu/jumprelu)
    auxk: Tensor | None  # scalar (topk/batchtopk trained with AuxK)
    kl: Tensor | None  # scalar (training through a spliced model)
    loss: Tensor  # the weighted sum above
    prefix_mse: Tensor | None = None  # (P,) each Matryoshka prefix's mse (the last is mse)
    l0: Tensor | None = None  # scalar (jumprelu's sparsity term, weighted by the l1 coefficient)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for the float64 reference."""
    return torch.promote_types(dtype, torch.float32)


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over rows of Σ_d (x - x_hat)²; x, x_hat (N, d)."""
    acc = accumulation_dtype(x.dtype)
    return (x_hat.to(acc) - x.to(acc)).pow(2).sum(-1).mean()


def decoder_norms(cfg: SAEConfig, W_dec: Tensor) -> Tensor:
    """Each latent's decoder norm, the weight of its sparsity term: W_dec (d_sae, d_in) -> (d_sae,) in the
    accumulation dtype, differentiable. ||W_dec[i]|| for an SAE or transcoder; for a crosscoder the sum over its
    n_sites sites of the per-site norms Σ_l ||W_dec^l[i]|| (Anthropic's crosscoder loss: a latent that writes to
    L sites pays as L per-site SAE latents would, not as one row of the concatenation)."""
    W = W_dec.to(accumulation_dtype(W_dec.dtype))
    if cfg.kind != "crosscoder":
        return W.norm(dim=1)
    return W.reshape(W.shape[0], cfg.n_sites, -1).norm(dim=2).sum(1)  # (d_sae, n_sites) -> (d_sae,)


def l1_penalty(values: Tensor, indices: Tensor, W_dec: Tensor | None = None, *, norms: Tensor | None = None) -> Tensor:
    """Mean over rows of Σ_j z_j · ||W_dec[idx_j]|| (values, indices (N, w) of the compact latents);
    W_dec None weighs every latent 1; norms (d_sae,) (`decoder_norms`) gives the weights instead of W_dec's rows."""
    acc = accumulation_dtype(values.dtype)
    z = values.to(acc)
    if W_dec is not None:
        norms = W_dec.to(acc).norm(dim=1)
    if norms is not None:
        z = z * norms.to(acc)[indices]
    return z.sum(-1).mean()


def jumprelu_sparsity(values: Tensor, indices: Tensor, window: Tensor | None, threshold: Tensor, mode: str,
                      bandwidth: float, W_dec: Tensor | None = None, target_l0: int | None = None,
                      tanh_scale: float = TANH_SCALE, norms: Tensor | None = None) -> Tensor:
    """JumpReLU's sparsity term, mean over rows (values, indices (N, w) from an encoder; window (N, w) the
    slots within ε/2 of θ that `encode_jumprelu` gives, or None: the value without θ's STE). step and
    quadratic reach θ through the step's STE (StepL0); tanh, a function of z, through the values' own
    (ThresholdSTE). W_dec None weighs every latent 1 in tanh; norms (d_sae,) weighs it instead of W_dec's rows."""
    if mode == "tanh":
        acc = accumulation_dtype(values.dtype)
        if W_dec is not None:
            norms = W_dec.to(acc).norm(dim=1)
        z = values.to(acc) if norms is None else values.to(acc) * norms.to(acc)[indices]
        return torch.tanh(tanh_scale * z).sum(-1).mean()
    if mode not in ("step", "quadratic"):
        raise ValueError(f"mode must be 'step', 'tanh' or 'quadratic', got {mode!r}")
    if window is None:
        l0 = (values > 0).sum(-1).to(accumulation_dtype(values.dtype))
    else:
        l0 = StepL0.apply(values, indices, window, threshold, bandwidth)  # (N,)
    if mode == "quadratic":
        if isinstance(target_l0, bool) or not isinstance(target_l0, int) or target_l0 < 1:
            raise ValueError(f"target_l0 must be an int >= 1 for mode='quadratic', got {target_l0!r}")
        l0 = 2.0 / target_l0 * (l0 - target_l0) ** 2
    return l0.mean()


def sparsity_terms(cfg: SAEConfig, values: Tensor, indices: Tensor, window: Tensor | None, threshold: Tensor | None,
                   W_dec: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(l1, l0) of an SAE with config cfg: relu's L1, jumprelu's sparsity term (window: what encode_flat gave
    with the latents, None when θ is not trained), None for the other activations."""
    weighted = cfg.decoder_norm_l1 and (cfg.activation == "relu" or cfg.jumprelu_sparsity in ("l1", "tanh"))
    norms = decoder_norms(cfg, W_dec) if weighted else None  # (d_sae,): per-site norms summed for a crosscoder
    if cfg.activation == "relu" or (cfg.activation == "jumprelu" and cfg.jumprelu_sparsity == "l1"):
        return l1_penalty(values, indices, norms=norms), None
    if cfg.activation == "jumprelu":
        return None, jumprelu_sparsity(values, indices, window, threshold, cfg.jumprelu_sparsity,
                                       cfg.jumprelu_bandwidth, target_l0=cfg.k, norms=norms)
    return None, None


def loss_terms(x: Tensor, x_hat: Tensor, coefficients: LossCoefficients, *, l1: Tensor | None = None,
               auxk: Tensor | None = None, kl: Callable[[Tensor], Tensor] | Tensor | None = None,
               prefix_mse: Tensor | None = None, l0: Tensor | None = None) -> LossTerms:
    """The terms and their weighted sum for one SAE on x (N, d_in). A term left None is not in the loss;
    kl may be a function of x_hat that returns the KL term (what `SpliceKL` gives). prefix_mse (P,), a
    Matryoshka SAE's per-prefix mse (the last the whole dictionary's), replaces mse in the loss by its mean;
    l0, JumpReLU's sparsity term (`jumprelu_sparsity`), is weighted by coefficients.l1, the sparsity coefficient."""
    rec = mse(x, x_hat) if prefix_mse is None else prefix_mse[-1]
    loss = rec if prefix_mse is None else prefix_mse.mean()
    if l1 is not None:
        loss = loss + coefficients.l1 * l1
    if l0 is not None:
        loss = loss + coefficients.l1 * l0
    if auxk is not None:
        loss = loss + coefficients.auxk * auxk
    if callable(kl):
        kl = kl(x_hat)
    if kl is not None:
        loss = loss + coefficients.kl * kl
    return LossTerms(rec, l1, auxk, kl, loss, prefix_mse, l0)


def kl_div(clean_logprobs: Tensor, logprobs: Tensor) -> Tensor:
    """KL(p_clean || p) per position: (..., vocab) log-probabilities -> (...)."""
    return (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(-1)


def variance_unexplained(sq_resid: float, sq_norm: float, sum_x: Tensor, n: int) -> float:
    """FVU from float64 sums over n rows: Σ||x - x_hat||², Σ||x||², Σx. The centred variance
    Σ||x||² - ||Σx||²/n is taken in float64, so a large common offset (a residual stream) costs no precision
    worth counting. A constant x (no variance) gives 0 when it is reconstructed exactly, else 1."""
    variance = sq_norm / n - float((sum_x.double() / n).square().sum())
    mean_sq_resid = sq_resid / n
    if variance > 1e-12:
        return mean_sq_resid / variance
    return float(mean_sq_resid >= 1e-12)


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained over the rows of one batch (x, x_hat (..., d))."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    x_hat = x_hat.detach().reshape(-1, x.shape[-1]).double()
    return variance_unexplained(float((x - x_hat).square().sum()), float(x.square().sum()), x.sum(0), x.shape[0])
