"""The straightforward evaluation: one whole forward of the model per variant and batch (clean, zero- and
mean-ablated, each decomposition with and without its error term), full log-softmax over the vocabulary.
`evaluate` computes the same numbers with the lower blocks run once and the head in chunks; this is
what tests and `bench/eval_speed.py` compare it with, and what runs for model families
fastsae.model.upper does not know. The metrics are defined in fastsae/evaluation/evaluate.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..losses import kl_div
from ..model import capture, splice
from .evaluate import _keep, _recon, _record, _results, is_causal_lm


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
                       progress: bool = True) -> dict[str, dict]:
    """evaluate(), one whole forward per variant: the same arguments and results."""
    device = next(model.parameters()).device
    causal = is_causal_lm(model)
    keep_all = _keep(model, windows, exclude_token_ids, causal)
    mean = activation_mean(model, site, windows, keep_all, batch_size).float()
    recon = _recon(decompositions)
    sums: dict[str, float] = {}
    count = 0

    def add(key: str, value: Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value.double().sum())

    def variant(ids: Tensor, keep: Tensor, **kw) -> tuple[Tensor, object]:
        with splice(model, site, **kw) as sp:
            sp.keep = keep
            return _forward(model, ids, causal), sp

    bar = tqdm(total=windows.numel(), disable=not progress, desc="eval (reference)", unit="tok", unit_scale=True)
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
            _record(recon[name], sp, keep)
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
    return _results(sums, count, recon, keep_all, windows, causal)
