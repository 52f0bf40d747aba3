"""`SAEConfig`: one small, flat, self-validating dataclass for an SAE's shape and loss."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
SPARSITY_MODES = ("step", "tanh", "quadratic", "l1")  # JumpReLU's sparsity term (fastsae/ops/jumprelu.py)
# what the dictionary reads and writes (fastsae/transcoder.py, fastsae/crosscoder.py)
KINDS = ("sae", "transcoder", "skip_transcoder", "crosscoder")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    activation: str = "relu"
    # Active latents per row (topk) or per row on average over the batch (batchtopk); for
    # jumprelu with jumprelu_sparsity="quadratic", the target L0 t of the penalty 2/t·(L0 − t)².
    k: int | None = None
    # The sparsity coefficient: weight of the L1 term for relu, of the sparsity term for jumprelu
    # (jumprelu_sparsity's L0 or tanh, SAELens's l0_coefficient). None picks 5.0, the L1 coefficient of
    # Anthropic's April 2024 update for inputs scaled to E||x|| = sqrt(d_in) with mse summed over d_in;
    # TopK SAEs take their sparsity from k and use 0.
    l1_coefficient: float | None = None
    # Encoder weight is the decoder's transpose (the seed paper's tied SAEs).
    tied: bool = False
    # L1 weighted by each decoder row's norm (Anthropic, April 2024).
    decoder_norm_l1: bool = True
    # Keep decoder rows unit-norm (renormalised by the trainer after each step).
    normalize_decoder: bool = True
    # Subtract b_dec from the input before encoding.
    apply_b_dec_to_input: bool = True
    # Initial JumpReLU threshold θ, the same for every latent; θ is then trained (fastsae/ops/jumprelu.py).
    jumprelu_threshold: float = 1e-3
    # Width ε of the rectangle kernel of θ's straight-through gradient: 1e-3 as in Rajamanoharan et al. 2024.
    # Entries within ε/2 of θ carry θ's gradient and are kept beside the active ones, so memory grows with ε.
    jumprelu_bandwidth: float = 1e-3
    # JumpReLU's sparsity term: "step" (L0 through the step's STE, DeepMind), "tanh" (Σ tanh(4·z·||W_dec||),
    # Anthropic; 4 is SAELens's jumprelu_tanh_scale), "quadratic" (2/k·(L0 − k)², Gemma Scope 2), or "l1": the
    # relu L1 term with θ frozen at jumprelu_threshold (fastsae before θ was trained).
    jumprelu_sparsity: str = "step"
    # Weights and activations; accumulation is always fp32.
    dtype: str = "float32"
    # Matryoshka SAE (Nabeshima 2024; Bussmann et al. 2025): the reconstruction loss is the mean over these
    # nested prefixes of the dictionary (the first m latents, strictly increasing) of each one's mse; d_sae is
    # appended when the last is smaller, as SAELens does. None: a plain SAE.
    matryoshka_widths: tuple[int, ...] | None = None
    # "sae" rebuilds its input; a "transcoder" reads one site (x, e.g. mlp_in.6) and predicts another (the
    # target y, mlp_out.6) of the same width d_in; "skip_transcoder" adds a learned dense map: ŷ = W_dec z + b_dec
    # + W_skip x (fastsae/transcoder.py). A transcoder's b_dec is the output's bias: apply_b_dec_to_input=False.
    # A "crosscoder" (acausal, Lindsey et al. 2024) is an SAE on n_sites sites' activations side by side, with
    # the sparsity weighted by the sum of each latent's per-site decoder norms (fastsae/crosscoder.py).
    kind: str = "sae"
    # The sites a "crosscoder" reads and rebuilds (e.g. resid_post.3, .6, .9; fastsae/crosscoder.py): d_in is
    # then their concatenated width n_sites·d. 1 for every other kind; a crosscoder needs >= 2.
    n_sites: int = 1

    def __post_init__(self):
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"SAEConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation in ("topk", "batchtopk"):
            if self.k is None or isinstance(self.k, bool) or not isinstance(self.k, int):
                raise ValueError(f"SAEConfig.k must be an int for activation={self.activation!r}, got {self.k!r}")
            if not 1 <= self.k <= self.d_sae:
                raise ValueError(f"SAEConfig.k must satisfy 1 <= k <= d_sae={self.d_sae}, got {self.k}")
            if self.l1_coefficient is None:
                self.l1_coefficient = 0.0
            if self.l1_coefficient != 0.0:
                raise ValueError(
                    f"SAEConfig.l1_coefficient must be 0 for activation={self.activation!r} "
                    f"(sparsity comes from k), got {self.l1_coefficient}"
                )
        elif self.activation == "jumprelu" and self.jumprelu_sparsity == "quadratic":
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
                raise ValueError(f"SAEConfig.k (the target L0) must be an int in [1, d_sae={self.d_sae}] for "
                                 f"jumprelu_sparsity='quadratic', got {self.k!r}")
        else:
            if self.k is not None:
                raise ValueError(f"SAEConfig.k is only used by topk/batchtopk, got k={self.k} "
                                 f"with activation={self.activation!r}")
        if self.l1_coefficient is None:
            self.l1_coefficient = 5.0
        if not (self.l1_coefficient >= 0.0 and self.l1_coefficient < float("inf")):
            raise ValueError(f"SAEConfig.l1_coefficient must be finite and >= 0, got {self.l1_coefficient}")
        if self.activation == "jumprelu" and not self.jumprelu_threshold > 0:
            raise ValueError(f"SAEConfig.jumprelu_threshold must be > 0, got {self.jumprelu_threshold}")
        bandwidth = self.jumprelu_bandwidth
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not 0 < bandwidth < float("inf"):
            raise ValueError(f"SAEConfig.jumprelu_bandwidth must be a finite float > 0, got {bandwidth!r}")
        if self.jumprelu_sparsity not in SPARSITY_MODES:
            raise ValueError(f"SAEConfig.jumprelu_sparsity must be one of {SPARSITY_MODES}, "
                             f"got {self.jumprelu_sparsity!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"SAEConfig.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.kind not in KINDS:
            raise ValueError(f"SAEConfig.kind must be one of {KINDS}, got {self.kind!r}")
        _check_sites(self)
        if self.kind in ("transcoder", "skip_transcoder") and (self.apply_b_dec_to_input or self.tied):
            raise ValueError(f"SAEConfig.kind={self.kind!r} needs apply_b_dec_to_input=False and tied=False: b_dec "
                             f"is the output's bias, not the input's centre, and W_enc reads another site than W_dec "
                             f"writes (got apply_b_dec_to_input={self.apply_b_dec_to_input}, tied={self.tied})")
        if self.matryoshka_widths is not None:
            self.matryoshka_widths = _matryoshka_widths(self.matryoshka_widths, self.d_sae)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"SAEConfig got unknown fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        if d.get("activation") == "jumprelu" and "jumprelu_sparsity" not in d:
            d = {**d, "jumprelu_sparsity": "l1"}  # written before θ trained: resuming it keeps its frozen-θ L1 loss
        return cls(**d)


def _check_sites(cfg: SAEConfig) -> None:
    """n_sites: an int, >= 2 for a crosscoder (one site is an SAE), 1 for other kinds, dividing d_in."""
    n = cfg.n_sites
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"SAEConfig.n_sites must be a positive int, got {n!r}")
    if (cfg.kind == "crosscoder") != (n > 1):
        raise ValueError(f"SAEConfig.n_sites must be >= 2 for kind='crosscoder' and 1 for any other kind, got "
                         f"n_sites={n} with kind={cfg.kind!r}")
    if cfg.d_in % n:
        raise ValueError(f"SAEConfig.d_in={cfg.d_in} must be divisible by n_sites={n}: a crosscoder reads "
                         f"n_sites sites of equal width, concatenated")


def _matryoshka_widths(widths, d_sae: int) -> tuple[int, ...]:
    """widths as a strictly increasing tuple of ints in [1, d_sae] ending with d_sae (appended if missing)."""
    name = "SAEConfig.matryoshka_widths"
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (list, tuple)) or not widths \
            or any(isinstance(m, bool) or not isinstance(m, int) for m in widths):
        raise ValueError(f"{name} must be a non-empty list of ints, got {widths!r}")
    if any(a >= b for a, b in zip(widths, widths[1:], strict=False)):
        raise ValueError(f"{name} must be strictly increasing (no duplicates), got {list(widths)}")
    if widths[0] < 1 or widths[-1] > d_sae:
        raise ValueError(f"{name} must lie in [1, d_sae={d_sae}], got {list(widths)}")
    return tuple(widths) if widths[-1] == d_sae else (*widths, d_sae)
