"""What both evaluation paths share: which positions are scored, the per-position sums of every variant's
loss, the reconstruction metrics recorded from the splices, and the step from those to the results.

`fastsae.evaluation.evaluate` (the lower blocks once, a batched upper run) and
`fastsae.evaluation.whole_forward` (one whole forward per variant) fill the same records, so they return the
same metrics; the metrics are defined in evaluate.py's docstring.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..model import Splice, keep_mask, special_token_ids
from .metrics import ReconstructionMetrics


def is_causal_lm(model: nn.Module) -> bool:
    """Next-token models (…ForCausalLM) can generate; encoders and masked LMs (BERT) cannot."""
    return bool(getattr(model, "can_generate", lambda: False)())


def scored_positions(model: nn.Module, windows: Tensor, exclude_token_ids: list[int] | None, causal: bool) -> Tensor:
    """The (S, T) mask of positions that count; refuses windows where none does."""
    excluded = special_token_ids(model) if exclude_token_ids is None else exclude_token_ids
    keep_all = keep_mask(windows, excluded)
    scored = keep_all[:, :-1] if causal else keep_all  # causal: the last position predicts nothing here
    if not bool(scored.any()):
        raise ValueError(f"evaluate: every token of windows {tuple(windows.shape)} is excluded "
                         f"(exclude_token_ids={sorted(excluded)}): no position to score")
    return keep_all


class MetricSums:
    """Float64 sums of per-position (causal) or per-sequence (encoder) values by metric key ("name/key" for
    a decomposition's), and how many positions or sequences they cover."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.count = 0

    def add(self, key: str, value: Tensor) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + float(value.double().sum())


def reconstruction_records(decompositions: dict) -> dict[str, ReconstructionMetrics]:
    """An empty ReconstructionMetrics for every decomposition (name -> SAE or baseline)."""
    return {name: ReconstructionMetrics(getattr(d, "d_codes", None) or d.cfg.d_sae)
            for name, d in decompositions.items()}


def record_splice(recon: ReconstructionMetrics, sp: Splice, keep: Tensor) -> None:
    """Add a recording splice's one forward (at the kept positions) to recon."""
    codes = sp.latents[0]
    codes = codes[keep] if isinstance(codes, Tensor) else (codes.values[keep], codes.indices[keep])
    recon.add(sp.activations[0][keep], sp.reconstructions[0][keep], codes)


def evaluation_results(sums: MetricSums, recon: dict[str, ReconstructionMetrics], keep_all: Tensor,
                       windows: Tensor, causal: bool) -> dict[str, dict]:
    """The sums and the reconstruction metrics -> {name: metrics} plus the shared numbers under "model"."""
    means = {key: value / sums.count for key, value in sums.totals.items()}
    shared = {k: v for k, v in means.items() if "/" not in k}
    shared.update(tokens=int(keep_all.sum()), windows=windows.shape[0], context_size=windows.shape[1],
                  causal_lm=causal)
    results = {"model": shared}
    for name in recon:
        m = recon[name].compute()
        m.update({k.split("/", 1)[1]: v for k, v in means.items() if k.startswith(f"{name}/")})
        if causal:
            _add_loss_scores(m, shared)
        m["density"] = recon[name].feature_density()
        results[name] = m
    return results


def _add_loss_scores(m: dict, shared: dict) -> None:
    """A decomposition's ce_loss_recovered, kl_div_score and perplexities, from its CE and KL and the model's."""
    clean_ce, zero_ce, sae_ce = shared["ce_loss_without_sae"], shared["ce_loss_with_ablation"], m["ce_loss_with_sae"]
    m["ce_loss_recovered"] = (zero_ce - sae_ce) / (zero_ce - clean_ce) if zero_ce != clean_ce else math.nan
    kl_zero = shared["kl_div_with_ablation"]
    m["kl_div_score"] = (kl_zero - m["kl_div_with_sae"]) / kl_zero if kl_zero else math.nan
    m["perplexity_without_sae"] = math.exp(clean_ce)
    m["perplexity_with_sae"] = math.exp(sae_ce)
    m["perplexity_increase"] = m["perplexity_with_sae"] - m["perplexity_without_sae"]
