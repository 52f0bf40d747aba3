"""The straightforward evaluation: one whole forward of the model per variant and batch (clean, zero- and
mean-ablated, each decomposition with and without its error term), full log-softmax over the vocabulary.
`evaluate` computes the same numbers with the lower blocks run once and the head in chunks; this is
what tests and `bench/eval_speed.py` compare it with, and what runs for model families
fastsae.model.upper does not know. The metrics are defined in fastsae/evaluation/evaluate.py; the records
both paths fill are in variant_records.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..losses import kl_div
from ..model import capture, splice, splice_transcoder
from .variant_records import (
    MetricSums,
    evaluation_results,
    is_causal_lm,
    reconstruction_records,
    record_splice,
    scored_positions,
)


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
def evaluate_reference(model: nn.Module, site: str, windows: Tensor, decompositions: dict, *, batch_size: int = 8,
                       exclude_token_ids: list[int] | None = None, no_error_check: tuple[str, ...] = (),
                       progress: bool = True, out_site: str | None = None) -> dict[str, dict]:
    """evaluate(), one whole forward per variant: the same arguments and results.
    out_site: the decompositions are transcoders from site to out_site (fastsae.model.splice_transcoder);
    the ablations, and the activations their metrics compare with, are then out_site's."""
    device = next(model.parameters()).device
    causal = is_causal_lm(model)
    keep_all = scored_positions(model, windows, exclude_token_ids, causal)
    replaced = site if out_site is None else out_site
    mean = activation_mean(model, replaced, windows, keep_all, batch_size).float()
    recon = reconstruction_records(decompositions)
    sums = MetricSums()

    def variant(ids: Tensor, keep: Tensor, sae=None, **kw) -> tuple[Tensor, object]:
        spliced = (splice_transcoder(model, site, out_site, sae, **kw) if sae is not None and out_site is not None
                   else splice(model, replaced, sae, **kw))
        with spliced as sp:
            sp.keep = keep
            return _forward(model, ids, causal), sp

    bar = tqdm(total=windows.numel(), disable=not progress, desc="eval (reference)", unit="tok", unit_scale=True)
    for first in range(0, windows.shape[0], batch_size):
        ids = windows[first:first + batch_size].to(device)
        keep = keep_all[first:first + batch_size].to(device)
        clean = _forward(model, ids, causal)
        mask = keep[:, :-1] if causal else None
        sums.count += int(mask.sum()) if causal else ids.shape[0]
        if causal:
            sums.add("ce_loss_without_sae", _ce(clean, ids, mask))
        for key, kw in (("ablation", {"replace": "zero"}), ("mean_ablation", {"replace": mean})):
            _add_variant(sums, key, clean, variant(ids, keep, **kw)[0], ids, mask)
        for name, dec in decompositions.items():
            out, sp = variant(ids, keep, sae=dec, record=True)
            record_splice(recon[name], sp, keep)
            _add_variant(sums, f"{name}/", clean, out, ids, mask, sae=True)
            if name not in no_error_check:
                with_error = variant(ids, keep, sae=dec, error_term=True)[0]
                _add_variant(sums, f"{name}/", clean, with_error, ids, mask, sae=True, error=True)
        bar.update(ids.numel())
    bar.close()
    return evaluation_results(sums, recon, keep_all, windows, causal)


def _add_variant(sums: MetricSums, key: str, clean: Tensor, out: Tensor, ids: Tensor, mask: Tensor | None,
                 sae: bool = False, error: bool = False) -> None:
    """One variant's numbers against the clean forward: CE (and KL, but not for the error-term self-check)
    when mask (B, T-1) is given (a causal LM), else the embeddings' cosine similarity. key: the ablation's
    name, or "name/" for a decomposition (sae=True, its error-term forward with error=True)."""
    what = ("sae_and_error" if error else "sae") if sae else key
    prefix = key if sae else ""
    if mask is None:
        sums.add(f"{prefix}embedding_cossim_with_{what}", F.cosine_similarity(clean, out, dim=-1))
        return
    sums.add(f"{prefix}ce_loss_with_{what}", _ce(out, ids, mask))
    if not error:
        sums.add(f"{prefix}kl_div_with_{what}", _kl(clean, out, mask))
