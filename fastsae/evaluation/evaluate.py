"""Evaluate SAEs (and baselines) at a model's site on token windows: reconstruction, sparsity, downstream.

Downstream metrics (causal LMs), next-token cross-entropy averaged over positions whose token is
not excluded (BOS/EOS/pad; the replacement is also applied only there, as in SAELens):

    ce_loss_without_sae           the clean model
    ce_loss_with_sae              the site's activation replaced by x̂
    ce_loss_with_ablation         ... replaced by 0 (zero ablation)
    ce_loss_with_mean_ablation    ... replaced by its mean over the eval tokens
    ce_loss_recovered             (ablation - with_sae) / (ablation - without_sae), zero ablation
                                  (SAELens's ce_loss_score)
    ce_loss_with_sae_and_error    x̂ + (x - x̂): must equal ce_loss_without_sae (a self-check of the splice)
    kl_div_with_sae, kl_div_with_ablation   E KL(p_clean || p_variant) over the next-token distributions
    kl_div_score                  (kl_with_ablation - kl_with_sae) / kl_with_ablation (SAELens)
    perplexity_without_sae, perplexity_with_sae, perplexity_increase = exp(ce_with_sae) - exp(ce_without_sae)

Encoder models (BERT, MiniLM) have no next-token loss; instead, with sentence embeddings the
attention-masked mean of the final hidden states (sentence-transformers' pooling):

    embedding_cossim_with_sae, embedding_cossim_with_ablation, embedding_cossim_with_mean_ablation,
    embedding_cossim_with_sae_and_error    E cos(e_clean, e_variant) over sequences
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..losses import kl_div
from ..model import capture, keep_mask, special_token_ids, splice
from .metrics import ReconstructionMetrics


def is_causal_lm(model: nn.Module) -> bool:
    """Next-token models (…ForCausalLM) can generate; encoders and masked LMs (BERT) cannot."""
    return bool(getattr(model, "can_generate", lambda: False)())


def _forward(model: nn.Module, ids: Tensor, causal: bool) -> Tensor:
    """Next-token log-probabilities (B, T-1, V) for a causal LM, else pooled embeddings (B, d)."""
    out = model(input_ids=ids)
    if causal:
        return F.log_softmax(out.logits[:, :-1].float(), dim=-1)
    return out.last_hidden_state.float().mean(dim=1)


def _ce(logp: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Per-position next-token cross-entropy at the masked positions."""
    return -logp.gather(-1, ids[:, 1:, None])[..., 0][mask]


def _kl(clean: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """Per-position KL(p_clean || p) at the masked positions."""
    return kl_div(clean, logp)[mask]


@torch.no_grad()
def activation_mean(model: nn.Module, site: str, windows: Tensor, keep: Tensor, batch_size: int = 8) -> Tensor:
    """Mean activation at site over kept positions (float64), for mean ablation and baselines."""
    device = next(model.parameters()).device
    total, count = None, 0
    for first in range(0, windows.shape[0], batch_size):
        ids, k = windows[first:first + batch_size], keep[first:first + batch_size]
        x = capture(model, [site], input_ids=ids.to(device))[site][k.to(device)].double()
        total = x.sum(0) if total is None else total + x.sum(0)
        count += x.shape[0]
    return (total / count).cpu()


@torch.no_grad()
def evaluate(model: nn.Module, site: str, windows: Tensor, decompositions: dict, *, batch_size: int = 8,
             exclude_token_ids: list[int] | None = None, no_error_check: tuple[str, ...] = (),
             progress: bool = True) -> dict[str, dict]:
    """Metrics for every decomposition (name -> SAE or baseline) on windows (S, T) at site, sharing the
    clean and ablated forwards. Returns {name: metrics} plus the shared numbers under "model".
    no_error_check: names whose error-term forward (the splice self-check) is skipped, to save time."""
    device = next(model.parameters()).device
    causal = is_causal_lm(model)
    excluded = special_token_ids(model) if exclude_token_ids is None else exclude_token_ids
    keep_all = keep_mask(windows, excluded)
    scored = keep_all[:, :-1] if causal else keep_all  # causal: the last position predicts nothing here
    if not bool(scored.any()):
        raise ValueError(f"evaluate: every token of windows {tuple(windows.shape)} is excluded "
                         f"(exclude_token_ids={sorted(excluded)}): no position to score")
    mean = activation_mean(model, site, windows, keep_all, batch_size).float()
    recon = {name: ReconstructionMetrics(getattr(d, "d_codes", None) or d.cfg.d_sae)
             for name, d in decompositions.items()}
    sums: dict[str, float] = {}
    count = 0

    def add(key: str, value: Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value.double().sum())

    def variant(ids: Tensor, keep: Tensor, **kw) -> tuple[Tensor, object]:
        with splice(model, site, **kw) as sp:
            sp.keep = keep
            return _forward(model, ids, causal), sp

    bar = tqdm(total=windows.numel(), disable=not progress, desc="eval", unit="tok", unit_scale=True)
    for first in range(0, windows.shape[0], batch_size):
        ids = windows[first:first + batch_size].to(device)
        keep = keep_all[first:first + batch_size].to(device)
        clean = _forward(model, ids, causal)
        if causal:
            mask = keep[:, :-1]
            count += int(mask.sum())
            add("ce_loss_without_sae", _ce(clean, ids, mask))
            for key, kw in (("ablation", {"replace": "zero"}), ("mean_ablation", {"replace": mean})):
                logp, _ = variant(ids, keep, **kw)
                add(f"ce_loss_with_{key}", _ce(logp, ids, mask))
                add(f"kl_div_with_{key}", _kl(clean, logp, mask))
        else:
            count += ids.shape[0]
            for key, kw in (("ablation", {"replace": "zero"}), ("mean_ablation", {"replace": mean})):
                emb, _ = variant(ids, keep, **kw)
                add(f"embedding_cossim_with_{key}", F.cosine_similarity(clean, emb, dim=-1))
        for name, dec in decompositions.items():
            out, sp = variant(ids, keep, sae=dec, record=True)
            codes = sp.latents[0]
            codes = codes[keep] if isinstance(codes, Tensor) else (codes.values[keep], codes.indices[keep])
            recon[name].add(sp.activations[0][keep], sp.reconstructions[0][keep], codes)
            check = name not in no_error_check
            with_error = variant(ids, keep, sae=dec, error_term=True)[0] if check else None
            if causal:
                add(f"{name}/ce_loss_with_sae", _ce(out, ids, mask))
                add(f"{name}/kl_div_with_sae", _kl(clean, out, mask))
                if check:
                    add(f"{name}/ce_loss_with_sae_and_error", _ce(with_error, ids, mask))
            else:
                add(f"{name}/embedding_cossim_with_sae", F.cosine_similarity(clean, out, dim=-1))
                if check:
                    add(f"{name}/embedding_cossim_with_sae_and_error",
                        F.cosine_similarity(clean, with_error, dim=-1))
        bar.update(ids.numel())
    bar.close()
    means = {key: value / count for key, value in sums.items()}
    shared = {k: v for k, v in means.items() if "/" not in k}
    shared.update(tokens=int(keep_all.sum()), windows=windows.shape[0], context_size=windows.shape[1],
                  causal_lm=causal)
    results = {"model": shared}
    for name in decompositions:
        m = recon[name].compute()
        m.update({k.split("/", 1)[1]: v for k, v in means.items() if k.startswith(f"{name}/")})
        if causal:
            clean_ce, zero_ce, sae_ce = shared["ce_loss_without_sae"], shared["ce_loss_with_ablation"], \
                m["ce_loss_with_sae"]
            m["ce_loss_recovered"] = (zero_ce - sae_ce) / (zero_ce - clean_ce) if zero_ce != clean_ce else math.nan
            kl_zero = shared["kl_div_with_ablation"]
            m["kl_div_score"] = (kl_zero - m["kl_div_with_sae"]) / kl_zero if kl_zero else math.nan
            m["perplexity_without_sae"] = math.exp(clean_ce)
            m["perplexity_with_sae"] = math.exp(sae_ce)
            m["perplexity_increase"] = m["perplexity_with_sae"] - m["perplexity_without_sae"]
        m["density"] = recon[name].feature_density()
        results[name] = m
    return results


def matched_k(sae, x: Tensor) -> int:
    """The baselines' k: the SAE's mean L0 on x, rounded (at least 1)."""
    with torch.no_grad():
        latents = sae.encode(x.to(sae.dtype))
    return max(1, round(float((latents.values != 0).sum()) / x.shape[0]))


def evaluate_with_baselines(model: nn.Module, site: str, windows: Tensor, saes: dict, fit_x: Tensor | None,
                            kinds: tuple[str, ...] = ("pca", "ica", "neurons", "random"), **kwargs) -> dict:
    """evaluate() on the SAEs plus baselines fitted on fit_x (N, d) with the first SAE's width and L0.
    A baseline that cannot be fitted (ICA without scikit-learn) is reported under "skipped"."""
    from . import baselines

    decompositions = dict(saes)
    skipped = {}
    if kinds:
        if fit_x is None:
            raise ValueError("baselines need fit_x, activations to fit them on")
        first = next(iter(saes.values()))
        k = matched_k(first, fit_x)
        for kind in kinds:
            try:
                decompositions[kind] = baselines.fit(kind, fit_x, n=first.cfg.d_sae, k=k)
            except ImportError as err:
                skipped[kind] = str(err)
    results = evaluate(model, site, windows, decompositions, no_error_check=tuple(kinds), **kwargs)
    for kind in kinds:
        if kind in decompositions:
            results[kind]["n_directions"] = decompositions[kind].d_codes
            results[kind]["k"] = decompositions[kind].k
    if skipped:
        results["model"]["skipped_baselines"] = skipped
    return results
